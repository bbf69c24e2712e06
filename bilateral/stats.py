"""The statistics of results.md: mean and SD over seeds, and the 95% interval of a difference
between two models, from scipy.stats.

Paired (`ttest_rel`) only where the two models share runs (a bilateral model and its own
hemispheres, seed by seed); every other pair of models was trained from independent seeds, so
Welch's interval (`ttest_ind(equal_var=False)`). Each model is {seed: score}.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95


def mean_sd(values) -> tuple[float, float, int]:
    s = pd.Series(values, dtype=float).dropna()
    return float(s.mean()), (float(s.std(ddof=1)) if len(s) > 1 else float("nan")), len(s)


def _flat_values(v) -> bool:
    return bool(np.allclose(v, v[0], rtol=0, atol=1e-12))


def paired(a: dict, b: dict, level=LEVEL) -> dict:
    """Mean of the per-seed differences a - b over the seeds both have, with the t-interval of
    scipy's ttest_rel. For models that share runs (a bilateral model and its hemispheres)."""
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    out = dict(diff=float(np.mean(x - y)) if seeds else float("nan"), lo=float("nan"),
               hi=float("nan"), method="paired", n_a=len(seeds), n_b=len(seeds))
    if len(seeds) >= 2:
        if _flat_values(x - y):  # no spread: scipy would warn and divide by zero
            out.update(lo=out["diff"], hi=out["diff"])
        else:
            ci = stats.ttest_rel(x, y).confidence_interval(level)
            out.update(lo=float(ci.low), hi=float(ci.high))
    return out


def welch(a: dict, b: dict, level=LEVEL) -> dict:
    """Difference of means a - b of runs from independent seeds, with Welch's interval
    (scipy's ttest_ind(equal_var=False))."""
    x, y = np.array(list(a.values()), float), np.array(list(b.values()), float)
    out = dict(diff=float(x.mean() - y.mean()) if len(x) and len(y) else float("nan"),
               lo=float("nan"), hi=float("nan"), method="Welch", n_a=len(x), n_b=len(y))
    if len(x) >= 2 and len(y) >= 2:
        if _flat_values(x) and _flat_values(y):
            out.update(lo=out["diff"], hi=out["diff"])
        else:
            with warnings.catch_warnings():  # one flat sample is fine: the other carries the SE
                warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
                ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(level)
            out.update(lo=float(ci.low), hi=float(ci.high))
    return out


def shares_runs(ref: str, key: str) -> bool:
    """Do models `ref` and `key` share runs, seed by seed? Only a bilateral model and its own
    hemispheres (bilateral/resnet9-A and hemisphere/resnet9-A-left, -right), and a callosal
    model built on the same hemispheres (callosal/resnet9-A-add-layer1+layer3)."""
    r, k = ref.split("/", 1), key.split("/", 1)
    if len(r) != 2 or len(k) != 2 or r[0] != "bilateral":
        return False
    return ((k[0] == "hemisphere" and k[1] in (f"{r[1]}-left", f"{r[1]}-right"))
            or (k[0] == "callosal" and k[1].startswith(f"{r[1]}-")))


def difference(a: dict, b: dict, shared: bool, level=LEVEL) -> dict:
    return paired(a, b, level) if shared else welch(a, b, level)
