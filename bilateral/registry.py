"""The registry of stages (kinds of run) and of results sections: a leaf that imports only config.

A stage module declares its stages with `register(Stage(...))` when it is imported (the built-in
ones in stages.py, the corpus callosum's in callosum.py); plan.py is the one module that names
those modules, so importing `bilateral.plan` gives the whole study. Nothing here knows a stage by
name: config.py validates `stage_epochs` through the check this module adds to it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from . import config as C

PHASES = ("hemispheres", "bilateral", "baselines", "callosum")  # a notebook trains each phase

# Fields only some stages use. A stage's config resets the ones it does not use to their
# defaults, so they neither appear in its record nor make two identical runs look different.
OPTIONAL = ("condition", "side", "backbone", "augment", "head_augment", "member", "ensemble_size")
KWTA_FIELDS = ("kwta_k", "kwta_k_batch", "kwta_eval")  # used under conditions C and D only
PYRAMID_FIELDS = ("pyramid_floor",)                   # used under conditions B and D only
VARIANT_FIELDS = ("condition", "side", "member", "ensemble_size", "callosum")  # what `--set` picks a run by


@dataclass(frozen=True)
class Stage:
    """One kind of run. `build(cfg, hier, upstream)` makes its untrained model; `upstream` is
    the list of the trained models of its upstream runs, loaded by the runner in the order of
    `upstream(cfg)` (a bilateral builder is handed its two hemispheres), so a builder never
    fetches another run itself."""
    name: str
    phase: str                                   # one of PHASES: which notebook trains it
    title: str                                   # the kind of model, in tables and --help
    help: str                                    # one line for --help
    uses: tuple[str, ...]                        # which OPTIONAL fields it uses
    run_name: Callable[[C.Config], str]          # its folder: <stage>/<run_name>/seed=<k>
    label: Callable[[C.Config], str]             # how notebooks and figures call one run
    variants: Callable[[C.Config], list[dict]]   # the runs a study asks for (config overrides)
    epoch_cost: Callable[[C.Config], float]      # per epoch, in ResNet-9 epochs
    build: Callable | None = None                # (cfg, hier, upstream models) -> model; None: no training
    heads: Callable[[C.Config], tuple] = lambda cfg: ("fine", "coarse")
    upstream: Callable[[C.Config], list[tuple[str, dict]]] = lambda cfg: []
    fixed_cost: Callable[[C.Config], float] = lambda cfg: 0.0  # once per run
    recipe: str = "default"                      # "hemisphere": the recipe's hemisphere weight decay
    heads_only: bool = False                     # trains heads on frozen `features` (cacheable)
    owns: tuple[str, ...] = ()                   # config fields no other stage uses


STAGES: dict[str, Stage] = {}

# Results sections of plug-ins: each takes {model key: {metric: {seed: value}}} (the report's
# per-seed accuracies) and returns markdown lines for results.md ([] when it has nothing).
SECTIONS: list[Callable[[dict], list[str]]] = []


def register(spec: Stage) -> Stage:
    """Add (or replace) a stage; the study plans it from then on."""
    if spec.phase not in PHASES:
        raise ValueError(f"stage {spec.name}: unknown phase {spec.phase!r}; phases: {', '.join(PHASES)}")
    unknown = set(spec.uses) - set(OPTIONAL) | set(spec.owns) - set(C.FIELD_TYPES)
    if unknown:
        raise ValueError(f"stage {spec.name}: unknown fields {sorted(unknown)} in uses/owns; "
                         f"uses: some of {', '.join(OPTIONAL)}; owns: config fields")
    STAGES[spec.name] = spec
    # one order whatever the order of imports: by phase, then as registered (tables follow it)
    ordered = sorted(STAGES.values(), key=lambda t: PHASES.index(t.phase))
    STAGES.clear()
    STAGES.update((t.name, t) for t in ordered)
    return spec


def register_section(section: Callable[[dict], list[str]]) -> Callable:
    """Add a results.md section (once, however often its module is imported)."""
    if section not in SECTIONS:
        SECTIONS.append(section)
    return section


def spec(stage: str) -> Stage:
    if stage not in STAGES:
        raise C.ConfigError(f"unknown stage {C.short(stage)}; allowed: {', '.join(STAGES)}")
    return STAGES[stage]


def stage_config(cfg: C.Config, stage: str) -> C.Config:
    """cfg with the fields `stage` does not use reset to their defaults."""
    s, d = spec(stage), C.Config()
    optional = set(OPTIONAL).union(*(t.owns for t in STAGES.values()))
    unused = optional - set(s.uses) - set(s.owns)
    cond = cfg.condition if "condition" in s.uses else d.condition
    if cond not in ("C", "D"):
        unused |= set(KWTA_FIELDS)
    if cond not in ("B", "D") or ("side" in s.uses and cfg.side == "right"):
        unused |= set(PYRAMID_FIELDS)  # the pyramid is B's and D's left hemisphere only
    if s.recipe == "hemisphere" or not s.build:  # hemispheres have the larger decay either way
        unused |= {"weight_decay_equal"}
    # a run's budget and its upstream runs' budgets (a bilateral model rebuilds its hemispheres
    # from its own config), never an unrelated stage's: that would change its identity for nothing
    chain = upstream_stages(cfg, stage)
    epochs = {k: v for k, v in cfg.stage_epochs.items() if k in chain}
    return dataclasses.replace(cfg, stage_epochs=epochs, **{k: getattr(d, k) for k in unused})


def upstream_stages(cfg: C.Config, stage: str) -> set[str]:
    """`stage` and every stage it is built on, transitively (ensemble: unilateral)."""
    out, todo = set(), [stage]
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo += [u for u, _ in spec(s).upstream(cfg)]
    return out


def check_stage_epochs(cfg: C.Config):
    """config.validate's check of `stage_epochs`: every key a stage that trains (an ensemble
    trains nothing), every budget positive."""
    trained = [s for s, st in STAGES.items() if st.build]
    for stage, n in cfg.stage_epochs.items():
        if stage not in trained:
            raise C.ConfigError(f"stage_epochs: unknown stage {C.short(stage)}; "
                                f"allowed: {', '.join(trained)}")
        if n <= 0:
            raise C.ConfigError(f"stage_epochs: {stage} must be positive, got {n}")


C.CHECKS.append(check_stage_epochs)
