"""Outcome scenarios (SPEC, "Analyses"): per test image, whether the left hemisphere (fine), the
right hemisphere (coarse), the bilateral fine head and the bilateral coarse head are right, and
the 4x4 table of hemisphere outcomes against bilateral outcomes.

`predictions(cfg, seed)` reads the finished hemisphere and bilateral runs of cfg.condition;
nothing is trained here.
"""
from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from . import config as C
from . import data, stages, train

OK, NO = "✓", "✗"
KEYS = ("left", "right", "bilateral_fine", "bilateral_coarse")
HEMISPHERE_OUTCOMES = tuple(f"L{a}R{b}" for a in (OK, NO) for b in (OK, NO))  # L✓R✓ L✓R✗ L✗R✓ L✗R✗
BILATERAL_OUTCOMES = tuple(f"F{a}C{b}" for a in (OK, NO) for b in (OK, NO))   # F✓C✓ F✓C✗ F✗C✓ F✗C✗


def _split(cfg: C.Config, split: str) -> data.Split:
    names = ("train", "val", "test")
    if split not in names:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(names)}")
    return stages.load_splits(cfg)[names.index(split)]


@torch.no_grad()
def predictions(cfg: C.Config, seed: int, split: str = "test") -> dict:
    """Bool tensors (one entry per image of the split, in the split's order) saying whether
    each of left (fine head), right (coarse head), bilateral_fine and bilateral_coarse is
    right, for condition cfg.condition of this seed."""
    device = train.pick_device(cfg.device)
    s = _split(cfg, split)
    hier = s.hierarchy
    loader = data.DeviceLoader(s, 512, device=device, shuffle=False, augment=False)
    models = {
        "left": stages.load_run_model("hemisphere", dataclasses.replace(cfg, side="left"), seed,
                                      hier, device),
        "right": stages.load_run_model("hemisphere", dataclasses.replace(cfg, side="right"), seed,
                                       hier, device),
        "bilateral": stages.load_run_model("bilateral", cfg, seed, hier, device),
    }
    out = {}
    for name, model in models.items():
        logits, labels = train.predict(model, loader, device, cfg.amp)
        right = {h: (v.argmax(1) == labels[h]) for h, v in logits.items()}
        if name == "left":
            out["left"] = right["fine"]
        elif name == "right":
            out["right"] = right["coarse"]
        else:
            out["bilateral_fine"], out["bilateral_coarse"] = right["fine"], right["coarse"]
    return {k: out[k].cpu() for k in KEYS}


def scenario_labels(preds: dict) -> tuple[list[str], list[str]]:
    """Per image: its hemisphere outcome ('L✓R✗', ...) and its bilateral outcome ('F✓C✗', ...)."""
    mark = lambda t: [OK if v else NO for v in t.tolist()]  # noqa: E731
    left, right = mark(preds["left"]), mark(preds["right"])
    fine, coarse = mark(preds["bilateral_fine"]), mark(preds["bilateral_coarse"])
    return ([f"L{a}R{b}" for a, b in zip(left, right)],
            [f"F{a}C{b}" for a, b in zip(fine, coarse)])


def table(preds: dict, margins: bool = False) -> pd.DataFrame:
    """Counts of images: rows = hemisphere outcomes, columns = bilateral outcomes."""
    hem, bil = scenario_labels(preds)
    t = pd.crosstab(pd.Categorical(hem, HEMISPHERE_OUTCOMES), pd.Categorical(bil, BILATERAL_OUTCOMES),
                    dropna=False)
    t = t.reindex(index=list(HEMISPHERE_OUTCOMES), columns=list(BILATERAL_OUTCOMES), fill_value=0)
    t.index.name, t.columns.name = "hemispheres (left fine, right coarse)", "bilateral (fine, coarse heads)"
    if margins:
        t["total"] = t.sum(axis=1)
        t.loc["total"] = t.sum(axis=0)
    return t.astype(int)


def outcome_table(cfg: C.Config, seed: int, split: str = "test", margins: bool = False) -> pd.DataFrame:
    """The 4x4 outcome-scenario table of condition cfg.condition for this seed."""
    return table(predictions(cfg, seed, split), margins=margins)


def outcome_tables(cfg: C.Config, seed: int, split: str = "test", margins: bool = True) -> dict:
    """{condition: outcome table} for every condition of cfg.conditions."""
    return {c: outcome_table(dataclasses.replace(cfg, condition=c), seed, split, margins)
            for c in cfg.conditions}
