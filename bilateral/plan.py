"""The study as a plan of runs: every kind of run declared once, and the runs a study holds.

Read top to bottom:
1. `Stage`: one kind of run (hemisphere, bilateral, ...): the config fields it uses, its name,
   label, heads, builder, recipe group, phase, upstream runs and relative cost. `register` adds
   one, so a later module (e.g. bilateral/callosum.py) adds a stage without editing this file.
2. `Run`: (stage, config, seed) and all that is known of it on disk: folder, status, metrics,
   history, model, upstream runs, cost. `Run.train()` makes it (stages.run_stage).
3. Provenance: a run built on other runs records the sha256 of their model.pt files in its
   config.json; when one of those files changes (retrained) the dependant is stale.
4. `plan(cfg, seeds)`: the whole study as a list of runs in dependency order; `phase_runs` the
   runs of one phase of one seed (what a notebook trains); `describe` prints a plan
   (`python -m bilateral plan`).

Statuses: missing (no record), in_progress (started, not finished), finished, stale (a record is
there but it is not the run the plan asks for: the folder holds another config, or an upstream
model.pt is not the one it was built on). Training a stale run or loading its model refuses
(without --force), and the notebooks (read_runs) and the report leave it out. `plan` prints a
stale run's status with the reason and counts it, and every run downstream of a run still to
train, as still to train. A retraining that writes the same model.pt again (training is
deterministic on a CPU) leaves its dependants current.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import config as C
from . import runs, stages, train

PHASES = ("hemispheres", "bilateral", "baselines", "callosum")  # callosum: bilateral/callosum.py
STATUSES = ("finished", "in_progress", "stale", "missing")

# Fields only some stages use. A stage's config resets the ones it does not use to their
# defaults, so they neither appear in its record nor make two identical runs look different.
OPTIONAL = ("condition", "side", "backbone", "augment", "head_augment", "member", "ensemble_size")
KWTA_FIELDS = ("kwta_k", "kwta_k_batch", "kwta_eval")  # used under conditions C and D only
VARIANT_FIELDS = ("condition", "side", "member", "ensemble_size", "callosum")  # what `--set` picks a run by

# Relative training cost per epoch, measured on CPU at width 1 (ResNet-9 = 1), see README.
# VGG-11: 0.83 per step at batch 64 (one measurement on a shared CPU; its FLOPs ratio is 0.72).
BACKBONE_COST = {"resnet9": 1.0, "resnet9_pyramid": 4.2, "resnet18": 1.5, "resnet34": 2.9,
                 "vgg11": 0.8}
KWTA_COST = {"resnet9": 1.6, "resnet9_pyramid": 6.2}
CACHED_HEADS_COST = 0.02  # an epoch of the bilateral heads on cached features


# ------------------------------------------------------------------------------- 1. stages

@dataclass(frozen=True)
class Stage:
    name: str
    phase: str                                   # one of PHASES: which notebook trains it
    title: str                                   # the kind of model, in tables and --help
    help: str                                    # one line for --help
    uses: tuple[str, ...]                        # which OPTIONAL fields it uses
    run_name: Callable[[C.Config], str]          # its folder: <stage>/<run_name>/seed=<k>
    label: Callable[[C.Config], str]             # how notebooks and figures call one run
    variants: Callable[[C.Config], list[dict]]   # the runs a study asks for (config overrides)
    epoch_cost: Callable[[C.Config], float]      # per epoch, in ResNet-9 epochs
    build: Callable | None = None                # (cfg, hier, seed) -> model; None: no training
    heads: Callable[[C.Config], tuple] = lambda cfg: ("fine", "coarse")
    upstream: Callable[[C.Config], list[tuple[str, dict]]] = lambda cfg: []
    fixed_cost: Callable[[C.Config], float] = lambda cfg: 0.0  # once per run
    recipe: str = "default"                      # "hemisphere": the recipe's hemisphere weight decay
    heads_only: bool = False                     # trains heads on frozen `features` (cacheable)
    owns: tuple[str, ...] = ()                   # config fields no other stage uses


STAGES: dict[str, Stage] = {}


def register(spec: Stage) -> Stage:
    """Add (or replace) a stage; the study plans it from then on."""
    if spec.phase not in PHASES:
        raise ValueError(f"stage {spec.name}: unknown phase {spec.phase!r}; phases: {', '.join(PHASES)}")
    unknown = set(spec.uses) - set(OPTIONAL) | set(spec.owns) - set(C.FIELD_TYPES)
    if unknown:
        raise ValueError(f"stage {spec.name}: unknown fields {sorted(unknown)} in uses/owns; "
                         f"uses: some of {', '.join(OPTIONAL)}; owns: config fields")
    STAGES[spec.name] = spec
    return spec


def spec(stage: str) -> Stage:
    if stage not in STAGES:
        raise C.ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    return STAGES[stage]


def stage_config(cfg: C.Config, stage: str) -> C.Config:
    """cfg with the fields `stage` does not use reset to their defaults."""
    s, d = spec(stage), C.Config()
    optional = set(OPTIONAL).union(*(t.owns for t in STAGES.values()))
    unused = optional - set(s.uses) - set(s.owns)
    cond = cfg.condition if "condition" in s.uses else d.condition
    if cond not in ("C", "D"):
        unused |= set(KWTA_FIELDS)
    if s.recipe == "hemisphere" or not s.build:  # hemispheres have the larger decay either way
        unused |= {"weight_decay_equal"}
    own_epochs = {k: v for k, v in cfg.stage_epochs.items() if k == stage}  # not others' budgets
    return dataclasses.replace(cfg, stage_epochs=own_epochs, **{k: getattr(d, k) for k in unused})


def hemisphere_cost(cfg: C.Config, side: str) -> float:
    name, kwta = stages.hemisphere_arch(cfg, side)
    return (KWTA_COST if kwta else BACKBONE_COST)[name]


def _pair_cost(cfg):
    return hemisphere_cost(cfg, "left") + hemisphere_cost(cfg, "right")


def _bilateral_epoch_cost(cfg):
    # with head augmentation the frozen hemispheres run forward (about a third of a training
    # step) every epoch; without, once (fixed_cost) and the heads train on cached features
    return _pair_cost(cfg) / 3 if cfg.head_augment else CACHED_HEADS_COST


register(Stage(
    "hemisphere", "hemispheres", "hemisphere",
    "one backbone, one head: left = fine labels, right = coarse (--set side=...)",
    uses=("condition", "side", "backbone", "augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}-{c.side}",
    label=lambda c: f"{c.condition} {c.side}",
    variants=lambda c: [dict(condition=k, side=s) for k in c.conditions for s in C.SIDES],
    epoch_cost=lambda c: hemisphere_cost(c, c.side),
    build=lambda c, hier, seed: stages.hemisphere_model(c, c.side, hier),
    heads=lambda c: ("fine",) if c.side == "left" else ("coarse",),
    recipe="hemisphere"))

register(Stage(
    "bilateral", "bilateral", "bilateral (specialised)",
    "frozen left + right hemispheres of this seed and condition, two new heads",
    uses=("condition", "backbone", "augment", "head_augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}",
    label=lambda c: f"{c.condition} bilateral",
    variants=lambda c: [dict(condition=k) for k in c.conditions],
    epoch_cost=_bilateral_epoch_cost,
    fixed_cost=lambda c: 0.0 if c.head_augment else _pair_cost(c) / 3,
    build=lambda c, hier, seed: stages.load_bilateral(c, seed, hier),
    upstream=lambda c: [("hemisphere", dict(side=s)) for s in C.SIDES],
    heads_only=True))

register(Stage(
    "bilateral_unspecialised", "baselines", "bilateral, no specialisation",
    "the same two-hemisphere model trained end to end from scratch",
    uses=("condition", "backbone", "augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}",
    label=lambda c: "bilateral, no specialisation",
    variants=lambda c: [dict(condition="A")],
    epoch_cost=_pair_cost,
    build=lambda c, hier, seed: stages.unspecialised_model(c, hier)))

register(Stage(
    "unilateral", "baselines", "unilateral dual-head",
    "one backbone with both heads (--set member=i for the ensemble pool)",
    uses=("backbone", "augment", "member"),
    run_name=lambda c: f"{c.backbone}-m{c.member}",
    label=lambda c: f"unilateral m{c.member}",
    variants=lambda c: [dict(member=m) for m in range(c.pool_size)],
    epoch_cost=lambda c: BACKBONE_COST[c.backbone],
    build=lambda c, hier, seed: stages.dual_head_model(c.backbone, c, hier)))

for _depth, _size in (("18", "about the bilateral model's size"),
                      ("34", "about twice the bilateral model's size")):
    register(Stage(
        f"resnet{_depth}", "baselines", f"ResNet-{_depth} dual-head",
        f"ResNet-{_depth} dual-head baseline ({_size})",
        uses=("augment",),
        run_name=lambda c, n=f"resnet{_depth}": n,
        label=lambda c, d=_depth: f"ResNet-{d}",
        variants=lambda c: [{}],
        epoch_cost=lambda c, n=f"resnet{_depth}": BACKBONE_COST[n],
        build=lambda c, hier, seed, n=f"resnet{_depth}": stages.dual_head_model(n, c, hier)))

register(Stage(
    "ensemble", "baselines", "ensemble",
    "top-k unilateral pool members by validation accuracy, logits averaged",
    uses=("backbone", "augment", "ensemble_size"),   # augment: that of its pool
    run_name=lambda c: f"{c.backbone}-k{c.ensemble_size}",
    label=lambda c: f"ensemble k={c.ensemble_size}",
    variants=lambda c: [dict(ensemble_size=k) for k in c.ensemble_sizes],
    epoch_cost=lambda c: 0.0,
    upstream=lambda c: [("unilateral", dict(member=m)) for m in range(c.pool_size)]))


# ---------------------------------------------------------------------------------- 2. runs

@dataclass(frozen=True, eq=False)
class Run:
    """One training run: a stage, its config (reduced to the fields the stage uses) and a seed.
    Two Runs are the same run when they have the same folder."""
    stage: str
    cfg: C.Config
    seed: int

    def __post_init__(self):
        object.__setattr__(self, "cfg", stage_config(self.cfg, self.stage))

    def __eq__(self, other):
        return isinstance(other, Run) and self.path == other.path

    def __hash__(self):
        return hash(self.path)

    def __repr__(self):
        return f"Run({self.key})"

    def __reduce__(self):
        # a worker process that unpickles a run of a stage registered by another module
        # (bilateral/callosum.py, say) imports that module first
        return _unpickle_run, (self.stage, self.cfg, self.seed, self.spec.variants.__module__)

    @property
    def spec(self) -> Stage:
        return spec(self.stage)

    @property
    def name(self) -> str:
        return self.spec.run_name(self.cfg)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}/seed={self.seed}"

    @property
    def path(self) -> Path:
        return runs.run_dir(self.cfg, self.stage, self.name, self.seed)

    @property
    def label(self) -> str:
        return self.spec.label(self.cfg)

    @property
    def heads(self) -> tuple:
        return self.spec.heads(self.cfg)

    @property
    def phase(self) -> str:
        return self.spec.phase

    def upstream(self) -> list[Run]:
        """The runs this one is built on (bilateral: its hemispheres; ensemble: its pool)."""
        return [Run(s, dataclasses.replace(self.cfg, **o), self.seed)
                for s, o in self.spec.upstream(self.cfg)]

    def epochs(self) -> int:
        return train.hyper(self.cfg, self.stage).epochs if self.spec.build else 0

    def cost(self) -> float:
        """Estimated training cost in ResNet-9 epochs (epochs x relative cost per epoch)."""
        return self.epochs() * self.spec.epoch_cost(self.cfg) + self.spec.fixed_cost(self.cfg)

    # -------------------------------------------------------------------- on disk

    def record(self) -> dict | None:
        """config.json (written when training starts), or None."""
        f = self.path / "config.json"
        return runs.read_json(f) if f.exists() else None

    def status(self) -> str:
        rec = self.record()
        if rec is None:
            return "missing"
        if self.stale_reasons(rec):
            return "stale"
        return "finished" if runs.finished(self.path) else "in_progress"

    def stale_reasons(self, rec: dict | None = None) -> list[str]:
        """Why the record on disk is not this run (empty: it is, or there is none)."""
        rec = rec or self.record()
        if rec is None:
            return []
        out = []
        changes = C.diff(rec["config"], C.identity(self.cfg))
        if changes:
            out.append(f"its folder holds another config ({'; '.join(changes)})")
        changed = self.changed_upstream(rec)
        if changed:
            out.append(f"upstream retrained or removed since it was built: {', '.join(changed)}")
        return out

    def changed_upstream(self, rec: dict | None = None) -> list[str]:
        """Keys of upstream runs whose model.pt is not the one this run was built on."""
        rec = rec or self.record()
        ups = self.upstream()
        if rec is None or not ups:
            return []
        if "upstream" not in rec:  # recorded before provenance existed: compare times instead
            t = (self.path / "config.json").stat().st_mtime
            return [u.key for u in ups if not (u.path / "model.pt").exists()
                    or (u.path / "model.pt").stat().st_mtime > t]
        now, then = upstream_hashes(self), rec["upstream"]
        return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))

    def metrics(self) -> dict | None:
        f = self.path / "metrics.json"
        return runs.read_json(f) if f.exists() else None

    def history(self):
        """history.csv as a DataFrame (one row per epoch); empty when there is none."""
        import pandas as pd
        f = self.path / "history.csv"
        return pd.read_csv(f) if f.exists() and f.stat().st_size else pd.DataFrame()

    def command(self, params="params/<preset>.yaml") -> str:
        """The command line that trains this run alone."""
        sets = "".join(f" --set {k}={getattr(self.cfg, k)}" for k in VARIANT_FIELDS
                       if k in self.spec.uses + self.spec.owns)
        return f"python -m bilateral train {self.stage} --params {params} --seed {self.seed}{sets}"

    def check_finished(self):
        """Raise unless this run is finished and current: FileNotFoundError naming the command
        that makes it, or runs.RunConflict saying why it is stale."""
        status = self.status()
        if status == "stale":
            raise runs.RunConflict(f"{self.stage} run {self.path} is stale: "
                                   f"{'; '.join(self.stale_reasons())}; retrain it with:\n  "
                                   f"{self.command()} --force")
        if status != "finished":
            raise FileNotFoundError(f"{self.stage} run {self.path} is {status.replace('_', ' ')}; "
                                    f"make it with:\n  {self.command()}")

    def load_model(self, hier, device="cpu"):
        """The trained model, rebuilt from the config and loaded strictly."""
        from . import models
        self.check_finished()
        if self.spec.build is None:
            raise ValueError(f"{self.stage} runs have no model file of their own")
        model = self.spec.build(self.cfg, hier, self.seed)
        models.load_state_strict(model, runs.load_torch(self.path / "model.pt"),
                                 what=f"{self.stage} run {self.path}")
        return model.to(device).eval()

    def train(self, force: bool = False, log=print) -> dict:
        """Train this run (or read it when finished with the same config); its metrics."""
        return stages.run_stage(self.stage, self.cfg, self.seed, force=force, log=log)


def _unpickle_run(stage, cfg, seed, module):
    if stage not in STAGES:
        importlib.import_module(module)
    return Run(stage, cfg, seed)


# ---------------------------------------------------------------------------- 3. provenance

_HASHES: dict[tuple, str] = {}


def file_hash(path) -> str | None:
    """sha256 of a file, computed once per (path, mtime, size); None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def upstream_hashes(run: Run) -> dict[str, str | None]:
    """{upstream key: sha256 of its model.pt}: what a run records, and what is checked later."""
    return {u.key: file_hash(u.path / "model.pt") for u in run.upstream()}


def changed_in(experiment_dir, record: dict) -> list[str]:
    """The recorded upstream runs whose model.pt in experiment_dir changed since: for readers
    that have a folder of records rather than a config (the report). A key is a relative path."""
    return sorted(k for k, h in record.get("upstream", {}).items()
                  if file_hash(Path(experiment_dir) / k / "model.pt") != h)


# ---------------------------------------------------------------------------------- 4. plans

def study_runs(cfg: C.Config, seed: int) -> list[Run]:
    """The runs the study asks for directly (not their upstream): every stage's variants;
    a baseline only when it is listed in cfg.baselines."""
    out = []
    for s in STAGES.values():
        if s.phase == "baselines" and s.name not in cfg.baselines:
            continue
        out += [Run(s.name, dataclasses.replace(cfg, **v), seed) for v in s.variants(cfg)]
    return out


def order(roots: list[Run]) -> list[Run]:
    """roots and everything upstream of them, each once, every run after its upstream runs."""
    out, seen = [], set()

    def visit(run):
        if run in seen:
            return
        seen.add(run)
        for u in run.upstream():
            visit(u)
        out.append(run)

    for r in roots:
        visit(r)
    return out


def parse_seeds(items) -> list[int]:
    """Seeds from the command line: '0-4', '0 1 2', '0,2' (or ints); in order, each once."""
    out = []
    for item in [items] if isinstance(items, (str, int)) else list(items):
        for part in str(item).replace(",", " ").split():
            lo, sep, hi = part.partition("-")
            try:
                a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
            except ValueError:
                raise C.ConfigError(f"--seeds: {part!r} is not a seed; give seeds as 0-4, "
                                    f"0 1 2 or 0,2 (non-negative integers)") from None
            if a < 0 or b < a:
                raise C.ConfigError(f"--seeds: bad range {part!r}; give seeds as 0-4, 0 1 2 or 0,2")
            out += range(a, b + 1)
    if not out:
        raise C.ConfigError("--seeds: no seed given; give seeds as 0-4, 0 1 2 or 0,2")
    return list(dict.fromkeys(out))


def plan(cfg: C.Config, seeds) -> list[Run]:
    """The whole study for these seeds: every run once, each after its upstream runs."""
    cfg = C.validate(cfg)
    return order([r for seed in parse_seeds(seeds) for r in study_runs(cfg, seed)])


def phase_of(name: str) -> str:
    """A phase from its name or a notebook's ('02_hemispheres', '03_bilateral.ipynb')."""
    key = Path(str(name)).name.removesuffix(".ipynb")
    head, _, tail = key.partition("_")
    key = tail if head.isdigit() else key
    if key not in PHASES:
        raise C.ConfigError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
    return key


def phase_runs(cfg: C.Config, phase: str, seed: int) -> list[Run]:
    """The runs one phase trains for one seed, in dependency order."""
    phase = phase_of(phase)
    return [r for r in plan(cfg, [seed]) if r.phase == phase]


def pending(runs_: list[Run]) -> list[Run]:
    """The runs a sweep would (re)train: those not finished, and every run downstream of one."""
    todo = set()
    for r in runs_:  # dependency order: upstream runs are decided first
        if r.status() != "finished" or any(u in todo for u in r.upstream()):
            todo.add(r)
    return [r for r in runs_ if r in todo]


def totals(runs_: list[Run]) -> dict:
    """Counts and costs of a plan: runs per status, cost in all and still to train (in
    ResNet-9 epochs), and that cost in ResNet-9 trainings when every run has the same epochs."""
    status = [r.status() for r in runs_]
    todo = pending(runs_)
    epochs = {r.epochs() for r in runs_ if r.epochs()}
    return dict(runs=len(runs_), **{k: status.count(k) for k in STATUSES},
                cost=sum(r.cost() for r in runs_), todo=len(todo),
                todo_cost=sum(r.cost() for r in todo),
                epochs=epochs.pop() if len(epochs) == 1 else None)


# ------------------------------------------------------------------------------ 5. printing

def _ranges(numbers) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, numbers = [], sorted(numbers)
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def describe(runs_: list[Run]) -> str:
    """The plan as text: every run with its status, cost and the runs it waits for, then
    totals. Stale runs are listed with the reason; they and everything downstream of a run
    still to train count as still to train."""
    index = {r: i + 1 for i, r in enumerate(runs_)}
    status = {r: r.status() for r in runs_}
    w = max([len(r.key) for r in runs_] + [3])
    lines = [f"{'#':>4}  {'run':<{w}}  {'status':<11}  {'epochs':>6}  {'cost':>8}  after"]
    for r in runs_:
        after = _ranges(index[u] for u in r.upstream() if u in index)
        lines.append(f"{index[r]:>4}  {r.key:<{w}}  {status[r]:<11}  {r.epochs() or '-':>6}  "
                     f"{r.cost():>8.1f}  {after}".rstrip())
    stale = [r for r in runs_ if status[r] == "stale"]
    if stale:
        lines += ["", "stale (training refuses them without --force):"]
        lines += [f"  {r.key}: {'; '.join(r.stale_reasons())}" for r in stale]
    from . import packed
    groups = [g for g in packed.packable_groups(pending(runs_)) if len(g) > 1]
    if groups:
        lines += ["", f"packed (pack: {runs_[0].cfg.pack}): each group trains as one model, in one job:"]
        lines += [f"  {len(g)} x {g[0].stage} {g[0].name}: runs {_ranges(index[r] for r in g)}"
                  for g in groups]
    lines += ["", f"{'stage':<24} {'runs':>5} {'cost':>10}  model"]
    for s in dict.fromkeys(r.stage for r in runs_):
        rs = [r for r in runs_ if r.stage == s]
        lines.append(f"{s:<24} {len(rs):>5} {sum(r.cost() for r in rs):>10,.1f}  {spec(s).title}")
    t = totals(runs_)
    counts = ", ".join(f"{t[k]} {k.replace('_', ' ')}" for k in STATUSES)
    e = t["epochs"]
    per = f" (= {t['cost'] / e:,.1f} ResNet-9 trainings of {e} epoch{'s' * (e != 1)})" if e else ""
    lines += [f"{'total':<24} {t['runs']:>5} {t['cost']:>10,.1f}",
              "", f"{t['runs']} runs: {counts}",
              f"cost in ResNet-9 epochs (epochs x cost per epoch relative to ResNet-9, measured "
              f"on CPU at width 1): {t['cost']:,.1f} in all{per}, {t['todo_cost']:,.1f} "
              f"still to train ({t['todo']} runs)"]
    return "\n".join(lines)


from . import callosum  # noqa: E402,F401  registers the callosal stages (it builds on this module)
