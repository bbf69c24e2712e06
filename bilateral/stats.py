"""The statistics of results.md: mean and SD over seeds; the difference between two models with
its 95% interval, degrees of freedom and two-sided p (scipy.stats); Holm's correction over a
family of such tests; and an exact sign-flip test of paired differences.

Paired (`ttest_rel`) only where the two models share runs (a bilateral model and its own
hemispheres, seed by seed); every other pair of models was trained from independent seeds, so
Welch's test (`ttest_ind(equal_var=False)`). Each model is {seed: score}.

The t-tests assume the per-seed values (or differences) are roughly normal; at 5 seeds nothing
can check that. The sign-flip test assumes only that a paired difference is as likely to be
positive as negative under the null, and its p is exact, but it cannot go below 2 / 2^n
(0.0625 at n = 5): `sign_flip_floor(n)`.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

LEVEL = 0.95
SIGN_FLIP_EXACT_MAX = 20     # up to 2^20 sign patterns are enumerated (8 MB of sums)
SIGN_FLIP_DRAWS = 2 ** 20    # beyond: a Monte Carlo estimate from this many random patterns
SIGN_FLIP_SEED = 0           # ... drawn from this seed, so a report rebuilds the same p
_TIE = 1e-9                  # relative tolerance: a pattern whose |sum| equals the observed counts
# Accuracies are recorded as float32 (about 7 significant digits): two values closer than this
# are the same count of images, and differences that close have no spread to test.
FLAT_ATOL = 1e-6


def mean_sd(values) -> tuple[float, float, int]:
    s = pd.Series(values, dtype=float).dropna()
    return float(s.mean()), (float(s.std(ddof=1)) if len(s) > 1 else float("nan")), len(s)


def _flat_values(v) -> bool:
    return bool(np.allclose(v, v[0], rtol=0, atol=FLAT_ATOL))


# ------------------------------------------------------------------------ multiple tests

def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the order given.

    Sort the m p-values ascending, p(1) <= ... <= p(m); the adjusted p(i) is
    max over j <= i of min(1, (m - j + 1) p(j)): monotone in the raw p and capped at 1.
    A claim holds at family-wise level alpha when its adjusted p < alpha. m is the whole
    declared family: NaN (a declared comparison that could not be tested: missing runs, one
    seed, no spread) counts in m as p = 1, so leaving a test out can never lower the others'
    adjusted p; its own adjusted p stays NaN (not testable, nothing to claim).
    """
    p = np.asarray(pvalues, dtype=float).reshape(-1)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    untested = np.isnan(p)
    full = np.where(untested, 1.0, p)
    m = len(full)
    order = np.argsort(full, kind="stable")
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * full[order]))
    out[untested] = np.nan
    return out


# ------------------------------------------------------------------------ sign-flip test

def sign_flip_floor(n: int) -> float:
    """The smallest two-sided p an exact sign-flip test of n paired differences can give:
    only the observed signs and their mirror image reach the observed |sum|, 2 of 2^n."""
    return 1.0 if n < 1 else min(1.0, 2.0 ** (1 - n))


def seeds_for(alpha: float) -> int:
    """The fewest paired seeds whose exact sign-flip test can give p < alpha."""
    return next(n for n in range(1, 64) if sign_flip_floor(n) < alpha)


def sign_flip_p(differences) -> float:
    """Two-sided p of the paired sign-flip (permutation) test of mean difference zero.

    Under the null each per-seed difference is as likely to carry either sign; the statistic
    is |sum of the differences|, and p is the share of the 2^n sign patterns whose |sum| is at
    least the observed one (ties, within a relative 1e-9, count). Exact for
    n <= SIGN_FLIP_EXACT_MAX (every pattern enumerated); beyond, a Monte Carlo estimate
    (count + 1) / (draws + 1) from SIGN_FLIP_DRAWS patterns drawn from SIGN_FLIP_SEED.
    NaN for no differences. n = 5 all of one sign: 2 / 32 = 0.0625.
    """
    d = np.asarray(differences, dtype=float).reshape(-1)
    if np.isnan(d).any():
        raise ValueError("sign_flip_p: the differences hold NaN")
    n = len(d)
    if n == 0:
        return float("nan")
    observed = abs(d.sum())
    threshold = observed - _TIE * max(float(np.abs(d).sum()), 1e-300)
    if n <= SIGN_FLIP_EXACT_MAX:
        sums = np.zeros(1)
        for x in d:  # every pattern of the first k signs, doubled with the next one
            sums = np.concatenate([sums + x, sums - x])
        return float(np.count_nonzero(np.abs(sums) >= threshold)) / len(sums)
    rng = np.random.default_rng(SIGN_FLIP_SEED)
    hits, chunk = 0, 2 ** 14
    for _ in range(SIGN_FLIP_DRAWS // chunk):
        signs = rng.integers(0, 2, size=(chunk, n), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
    return (hits + 1) / (SIGN_FLIP_DRAWS + 1)


# ------------------------------------------------------------------- one difference

# why a difference has no test (the `why` of difference(); "" when it was tested)
NO_RUNS, FEW_SEEDS, FEW_IN_COMMON, NO_SPREAD = ("no runs", "fewer than 2 seeds",
                                            "fewer than 2 seeds in common", "no spread")


def _blank(method: str, n: int, n_a: int, n_b: int, why: str = "") -> dict:
    nan = float("nan")
    return dict(diff=nan, lo=nan, hi=nan, method=method, n=n, n_a=n_a, n_b=n_b, df=nan,
                t=nan, p=nan, p_sign_flip=nan, why=why)


def untested(n_a: int = 0, n_b: int = 0) -> dict:
    """The keys of difference() for a head that is no test of the pair (one of the models
    does not have it): all NaN, no method, no reason."""
    return _blank("", 0, n_a, n_b)


def _degenerate(out: dict) -> dict:
    """No spread at all (every value, or every paired difference, the same to float32
    accuracy): the t statistic divides by a zero standard error, so there is no interval, df,
    t or p (NaN: "not testable (no spread)"), never scipy's limit p = 0, which would claim
    certainty from a handful of identical counts. The sign-flip p, where paired, stays."""
    return dict(out, df=float("nan"), why=NO_SPREAD)


def paired(a: dict, b: dict, level=LEVEL) -> dict:
    """Mean of the per-seed differences a - b over the seeds both have, with scipy's ttest_rel:
    its t-interval, df = n - 1, t and two-sided p; and the exact sign-flip p of the same
    differences. n is the number of pairs (seeds in common), n_a and n_b each model's own
    seeds. For models that share runs (a bilateral model and its hemispheres)."""
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)
    out = _blank("paired", len(seeds), len(a), len(b))
    if not seeds:
        return dict(out, why=NO_RUNS if not (a and b) else FEW_IN_COMMON)
    out.update(diff=float(np.mean(x - y)), p_sign_flip=sign_flip_p(x - y))
    if len(seeds) < 2:
        return dict(out, why=FEW_IN_COMMON if len(a) > 1 and len(b) > 1 else FEW_SEEDS)
    out["df"] = float(len(seeds) - 1)
    if _flat_values(x - y):  # no spread: scipy would warn and divide by zero
        return _degenerate(out)
    from scipy import stats  # deferred: 0.8 s of every command's start, needed by reports only
    r = stats.ttest_rel(x, y)
    ci = r.confidence_interval(level)
    out.update(lo=float(ci.low), hi=float(ci.high), t=float(r.statistic), p=float(r.pvalue))
    return out


def welch(a: dict, b: dict, level=LEVEL) -> dict:
    """Difference of means a - b of runs from independent seeds, with scipy's
    ttest_ind(equal_var=False): Welch's interval, Welch-Satterthwaite df, t and two-sided p.
    n = n_a + n_b runs; no sign-flip p (nothing is paired)."""
    x, y = np.array(list(a.values()), float), np.array(list(b.values()), float)
    out = _blank("Welch", len(x) + len(y), len(x), len(y))
    if not (len(x) and len(y)):
        return dict(out, why=NO_RUNS)
    out["diff"] = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return dict(out, why=FEW_SEEDS)
    if _flat_values(x) and _flat_values(y):
        return _degenerate(out)
    with warnings.catch_warnings():  # one flat sample is fine: the other carries the SE
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        from scipy import stats  # deferred, as above
        r = stats.ttest_ind(x, y, equal_var=False)
        ci = r.confidence_interval(level)
    out.update(lo=float(ci.low), hi=float(ci.high), df=float(r.df), t=float(r.statistic),
               p=float(r.pvalue))
    return out


def hemispheres_of(key: str) -> set[str]:
    """The trained hemispheres a model is built on, as hemisphere run names: its own name for
    a hemisphere or the heads on one (one_hemisphere), both sides for a model built on a
    frozen pair (bilateral, bilateral_matched, callosal), none for one trained from scratch."""
    stage, _, name = key.partition("/")
    if stage in ("hemisphere", "one_hemisphere"):
        return {name}
    if stage in ("bilateral", "bilateral_matched", "callosal"):
        pair = "-".join(name.split("-")[:2])  # resnet9-A[-add-layer1+layer3] -> resnet9-A
        return {f"{pair}-left", f"{pair}-right"}
    return set()


def shares_runs(ref: str, key: str) -> bool:
    """Do models `ref` and `key` share runs, seed by seed? Where they are built on a common
    trained hemisphere of the same seed: a bilateral model and its own hemispheres
    (bilateral/resnet9-A and hemisphere/resnet9-A-left), the heads trained on one of those
    alone (one_hemisphere/resnet9-A-left), a callosal model built on the same pair and its
    capacity-matched control (callosal/..., bilateral_matched/resnet9-A-add-layer1+layer3)."""
    if ref == key:
        return False
    return bool(hemispheres_of(ref) & hemispheres_of(key))


def difference(a: dict, b: dict, shared: bool, level=LEVEL) -> dict:
    """paired(a, b) where the models share runs, else welch(a, b): the same keys either way
    (diff, lo, hi, method, n, n_a, n_b, df, t, p, p_sign_flip, and `why` there is no p:
    NO_RUNS, FEW_SEEDS, FEW_IN_COMMON, NO_SPREAD, or "")."""
    return paired(a, b, level) if shared else welch(a, b, level)
