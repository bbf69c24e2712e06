"""bilateral.stats against textbook values and scipy, and results.md's claims against Holm's
adjusted p on a constructed results.csv."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as S

from bilateral import results, results_md, stats

# Student's sleep data (Cushny & Peebles), R's `sleep`: the same 10 patients under two drugs.
# R: t.test(extra ~ group, data = sleep, paired = TRUE): t = -4.0621, df = 9, p = 0.002833;
# without paired (Welch): t = -1.8608, df = 17.776, p = 0.07939.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def as_seeds(values, start=0):
    return {start + i: v for i, v in enumerate(values)}


def same(a: dict, b: dict) -> bool:
    """Equal dicts, NaN equal to NaN."""
    nan = lambda x: isinstance(x, float) and math.isnan(x)  # noqa: E731
    return a.keys() == b.keys() and all(a[k] == b[k] or (nan(a[k]) and nan(b[k])) for k in a)


# ----------------------------------------------------------------------------------- Holm

def test_holm_matches_the_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> monotone 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_holm_counts_an_untestable_declared_test_in_m():
    # the same three tests and a fourth declared one that could not be made (NaN): m = 4, the
    # NaN as p = 1: sorted 0.01, 0.03, 0.04, 1 times 4, 3, 2, 1 = 0.04, 0.09, 0.08 -> 0.09
    out = stats.holm([0.01, 0.04, 0.03, float("nan")])
    assert out[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(out[3])
    assert stats.holm([0.01, float("nan")])[0] == pytest.approx(0.02)  # not 0.01: m = 2


def test_holm_is_monotone_and_capped():
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 2 x 0.5 = 1, capped
    assert len(stats.holm([])) == 0
    p = np.random.default_rng(0).uniform(0, 0.2, 30)
    adj = stats.holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)  # the order of the raw p is kept
    assert np.all(adj >= p) and np.all(adj <= 1)
    assert adj[order[0]] == pytest.approx(min(1, 30 * p[order[0]]))  # first step: Bonferroni
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.2, 1.5])


# ------------------------------------------------------------------------------ sign flip

def test_sign_flip_on_hand_computed_cases():
    # 5 differences of one sign: only they and their mirror image reach |sum|: 2 / 32
    assert stats.sign_flip_p([0.017, 0.012, 0.021, 0.008, 0.025]) == 0.0625
    assert stats.sign_flip_floor(5) == 0.0625 and stats.seeds_for(0.05) == 6
    # [1, -2, 3, 4, 5]: sum 11 of at most 15; |sum| >= 11 only by flipping nothing (15),
    # the 1 (13) or the 2 (11), and the mirror images: 6 / 32
    assert stats.sign_flip_p([1, -2, 3, 4, 5]) == pytest.approx(6 / 32)
    assert stats.sign_flip_p([1, 2, -3]) == 1.0  # sum 0: every pattern is as far out
    # a zero difference carries no sign: [0, 1] has |sum| 1 under all 4 patterns
    assert stats.sign_flip_p([0.0, 1.0]) == 1.0
    # the sleep data: 9 differences of one sign and a zero: 2 x 2 of 2^10 patterns
    d = np.subtract(SLEEP_1, SLEEP_2)
    assert stats.sign_flip_p(d) == pytest.approx(4 / 1024)
    assert math.isnan(stats.sign_flip_p([]))


def test_sign_flip_counts_float_ties():
    # equal magnitudes 0.1 (not exact in binary): |sum| = 0.1 |n - 2k| for k negatives, and
    # p is the binomial tail of n fair signs, P(|2B - n| >= |n - 2k|)
    for n, k in ((6, 1), (9, 3), (20, 7)):
        d = [-0.1] * k + [0.1] * (n - k)
        want = S.binom.cdf(k, n, 0.5) + S.binom.sf(n - k - 1, n, 0.5)
        assert stats.sign_flip_p(d) == pytest.approx(want, abs=1e-12), (n, k)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10])
def test_sign_flip_equals_scipys_exact_permutation_test(n):
    d = np.random.default_rng(n).normal(0.3, 1, n)
    ref = S.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                             alternative="two-sided").pvalue
    assert stats.sign_flip_p(d) == pytest.approx(ref)


def test_sign_flip_beyond_the_exact_limit_is_a_close_estimate():
    n, k = 22, 7
    d = [-0.1] * k + [0.1] * (n - k)
    want = S.binom.cdf(k, n, 0.5) + S.binom.sf(n - k - 1, n, 0.5)
    assert stats.sign_flip_p(d) == pytest.approx(want, abs=0.003)
    assert stats.sign_flip_p(d) == stats.sign_flip_p(d)  # seeded: the same p every time


# ---------------------------------------------------------------------- paired and Welch

def test_paired_p_and_df_are_scipys_and_rs():
    d = stats.paired(as_seeds(SLEEP_1), as_seeds(SLEEP_2))
    ref = S.ttest_rel(SLEEP_1, SLEEP_2)
    assert (d["n"], d["df"]) == (10, 9)
    assert (d["t"], d["p"]) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    assert (d["t"], d["p"]) == pytest.approx((-4.0621, 0.002833), abs=5e-5)
    assert d["p_sign_flip"] == pytest.approx(4 / 1024)
    assert same(stats.difference(as_seeds(SLEEP_1), as_seeds(SLEEP_2), shared=True), d)


def test_welch_p_and_df_are_scipys_and_rs():
    d = stats.welch(as_seeds(SLEEP_1), as_seeds(SLEEP_2, start=100))
    ref = S.ttest_ind(SLEEP_1, SLEEP_2, equal_var=False)
    assert (d["n"], d["n_a"], d["n_b"]) == (20, 10, 10)
    assert (d["t"], d["df"], d["p"]) == pytest.approx((ref.statistic, ref.df, ref.pvalue), rel=1e-12)
    assert (d["t"], d["df"], d["p"]) == pytest.approx((-1.8608, 17.776, 0.07939), abs=5e-4)
    assert math.isnan(d["p_sign_flip"])  # nothing is paired
    assert same(stats.difference(as_seeds(SLEEP_1), as_seeds(SLEEP_2, 100), shared=False), d)


def test_degenerate_and_untestable_differences():
    one = stats.welch({0: 0.7}, {1: 0.6, 2: 0.5})
    assert one["diff"] == pytest.approx(0.15) and math.isnan(one["p"]) and math.isnan(one["df"])
    assert one["why"] == stats.FEW_SEEDS
    single = stats.paired({0: 0.7}, {0: 0.6})
    assert math.isnan(single["p"]) and single["p_sign_flip"] == 1.0 and single["why"] == stats.FEW_SEEDS
    none = stats.untested(3, 0)
    assert none["method"] == "" and math.isnan(none["diff"]) and set(none) == set(single)
    gone = stats.welch({0: 0.7, 1: 0.8}, {})
    assert gone["why"] == stats.NO_RUNS and (gone["n_a"], gone["n_b"]) == (2, 0)
    tested = stats.welch({0: 0.7, 1: 0.8}, {2: 0.6, 3: 0.65})
    assert tested["why"] == "" and 0 < tested["p"] < 1


def test_few_seeds_in_common_keeps_each_models_own_n():
    d = stats.paired({0: 0.7, 1: 0.8, 2: 0.75}, {2: 0.6, 3: 0.7, 4: 0.7})  # seed 2 alone is shared
    assert (d["n"], d["n_a"], d["n_b"]) == (1, 3, 3) and d["why"] == stats.FEW_IN_COMMON
    assert d["diff"] == pytest.approx(0.15) and math.isnan(d["p"])
    none = stats.paired({0: 0.7, 1: 0.8}, {3: 0.7, 4: 0.7})
    assert (none["n"], none["n_a"], none["n_b"], none["why"]) == (0, 2, 2, stats.FEW_IN_COMMON)


def test_no_spread_is_not_testable_never_p_0():
    # every paired difference the same: the standard error is 0, so there is no t and no p
    # (scipy's limit would be p = 0, certainty from two seeds)
    flat = stats.paired({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.7})
    assert all(math.isnan(flat[k]) for k in ("p", "lo", "hi", "t", "df"))
    assert flat["why"] == stats.NO_SPREAD and flat["diff"] == pytest.approx(0.1)
    assert flat["p_sign_flip"] == 0.5  # the sign-flip test needs no spread: 2 of 4 patterns
    same = stats.paired({0: 0.7, 1: 0.8}, {0: 0.7, 1: 0.8})
    assert math.isnan(same["p"]) and same["why"] == stats.NO_SPREAD and same["p_sign_flip"] == 1.0
    # accuracies recorded as float32: 100 test images more on every seed (0.01) differ in the
    # 8th digit, which a float64 tolerance would take for spread (p near 0); it is none
    x = [float(np.float32(v)) for v in (0.7123, 0.8456, 0.7789)]
    y = [float(np.float32(round(v - 0.01, 4))) for v in (0.7123, 0.8456, 0.7789)]
    d = np.subtract(x, y)
    assert 1e-9 < np.ptp(d) < 1e-6  # the case: spread only in float32's last digits
    f32 = stats.paired(as_seeds(x), as_seeds(y))
    assert math.isnan(f32["p"]) and f32["why"] == stats.NO_SPREAD
    # two models each scoring the same on every seed, to float32 accuracy: no spread either
    same_a, same_b = [0.7123, 0.7123 + 6e-8, 0.7123 - 6e-8], [0.7, 0.7 - 6e-8, 0.7]
    both_flat = stats.welch(as_seeds(same_a), as_seeds(same_b, 10))
    assert math.isnan(both_flat["p"]) and both_flat["why"] == stats.NO_SPREAD


# ------------------------------------------------- results.md words claims by the Holm p

SEEDS = range(5)
BIL = [0.800, 0.812, 0.795, 0.806, 0.801]


def rows(stage, model, metric, values):
    return [dict(stage=stage, model=model, condition="A", backbone="resnet9", seed=s,
                 split="test", metric=metric, value=v) for s, v in zip(SEEDS, values)]


@pytest.fixture(scope="module")
def constructed():
    """The bilateral model far ahead of ResNet-18 (p tiny: holds), ahead of its fine hemisphere
    by a paired p near 0.02 (under 0.05, but not after Holm over 5 tests), level with the rest."""
    noise = [0.004, -0.006, 0.003, -0.002, 0.001]
    df = pd.DataFrame(
        rows("bilateral", "resnet9-A", "fine_acc", BIL)
        + rows("hemisphere", "resnet9-A-left", "fine_acc",
               [b - 0.01 + e for b, e in zip(BIL, [0.006, -0.007, 0.008, -0.006, 0.002])])
        + rows("resnet18", "resnet18", "fine_acc", [b - 0.10 + e for b, e in zip(BIL, noise)])
        + rows("resnet34", "resnet34", "fine_acc", [b + e for b, e in zip(BIL, noise[::-1])])
        + rows("ensemble", "resnet9-k2", "fine_acc", [b + e for b, e in zip(BIL, noise[1:] + noise[:1])])
        + rows("ensemble", "resnet9-k5", "fine_acc", [b - e for b, e in zip(BIL, noise)])
        + rows("callosal", "resnet9-A-add-layer1+layer3", "fine_acc",
               [b - 0.02 + e for b, e in zip(BIL, [0.001, -0.001, 0.002, 0.0, -0.002])]),
        columns=results.COLUMNS)
    comp = results.comparison_table(df)
    return comp, "\n".join(results_md.comparison_section(comp, results.summary_table(df)))


def test_the_family_is_corrected_with_holm(constructed):
    comp, _ = constructed
    fam = comp[comp.in_family].set_index("model")
    assert set(fam.index) == {"hemisphere/resnet9-A-left", "resnet18", "resnet34",
                              "ensemble/resnet9-k2", "ensemble/resnet9-k5"}
    assert fam.fine_acc_p_holm.tolist() == pytest.approx(stats.holm(fam.fine_acc_p).tolist())
    assert fam.coarse_acc_p_holm.isna().all()  # no coarse head: no test, not in m
    # the callosal model is its own family: callosal minus its bilateral model, paired, with
    # Holm over that family alone (one test: Holm's p is the raw p)
    out = comp[comp.family == "callosal"].iloc[0]
    assert out.reference.startswith("callosal/") and out.model == "bilateral/resnet9-A"
    assert out.label == out.reference and not out.in_family
    assert out.fine_acc_diff == pytest.approx(-0.02) and out.fine_acc_method == "paired"
    assert out.fine_acc_p < 1e-3
    assert out.fine_acc_p_holm == pytest.approx(out.fine_acc_p)
    assert out.fine_acc_p_sign_flip == 0.0625  # paired with its bilateral model, 5 seeds
    assert "resnet9-A against bilateral/resnet9-B" in "; ".join(comp.attrs["family_missing"])


def test_results_md_claims_only_what_survives_holm(constructed):
    comp, md = constructed
    left = comp.set_index("model").loc["hemisphere/resnet9-A-left"]
    assert left.fine_acc_p < 0.05 < left.fine_acc_p_holm  # the case this test is about
    assert left.fine_acc_p_sign_flip == 0.0625
    r18 = comp.set_index("model").loc["resnet18"]
    assert r18.fine_acc_p_holm < 0.05
    row = next(l for l in md.splitlines() if l.startswith("| hemisphere/resnet9-A-left "))
    assert "holds" not in row and "does not hold" in row
    assert "holds" in next(l for l in md.splitlines() if l.startswith("| resnet18 "))
    main = md.split("### The callosal family")[0]
    held = [l for l in main.splitlines() if l.startswith("- holds")]
    assert len(held) == 1 and "ResNet-18" in held[0]
    lost = md.split("before the correction but not after")[1]
    assert "hemisphere/resnet9-A-left, fine" in lost
    assert "Of the 5 tests of the family, 1 holds after Holm's correction" in md
    assert "2/2^5 = 0.0625" in md  # what 5 paired seeds can show
    callosal = next(l for l in md.splitlines() if l.startswith("| callosal/"))
    assert "**holds the other way**" in callosal  # -2 +- 0.2 points on every seed: p tiny
    assert "### The callosal family" in md and "Of the 1 tests of the callosal family, 1 hold" in md


# ------------------------------------- the family is the declared one, runs or no runs

def textbook_holm(p, m):
    """Holm's adjusted p of the tests made (p) in a family of m declared tests, the m - len(p)
    others untestable (p = 1): sorted ascending, max over j <= i of min(1, (m - j + 1) p(j))."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def declared_study():
    """Condition A, ResNet-18 and ResNet-34 declared; every model run but ResNet-34."""
    noise = [0.004, -0.006, 0.003, -0.002, 0.001]
    coarse = [b + 0.09 for b in BIL]
    df = pd.DataFrame(
        rows("bilateral", "resnet9-A", "fine_acc", BIL) + rows("bilateral", "resnet9-A", "coarse_acc", coarse)
        + rows("hemisphere", "resnet9-A-left", "fine_acc", [b - 0.01 + e for b, e in zip(BIL, noise)])
        + rows("hemisphere", "resnet9-A-right", "coarse_acc",
               [b - 0.004 + e for b, e in zip(coarse, noise[::-1])])
        + rows("resnet18", "resnet18", "fine_acc", [b - 0.02 + e for b, e in zip(BIL, noise[1:] + noise[:1])])
        + rows("resnet18", "resnet18", "coarse_acc", [b + 0.01 + e for b, e in zip(coarse, noise)]),
        columns=results.COLUMNS)
    return df, results.declared_models([dict(conditions=["A"], baselines=["resnet18", "resnet34"])])


def test_holm_runs_over_the_declared_family_with_a_missing_comparison_as_p_1():
    df, declared = declared_study()
    assert {"resnet18", "resnet34", "hemisphere/resnet9-A-left"} <= set(declared)
    comp = results.comparison_table(df, declared)
    fam = comp[comp.in_family].set_index("model")
    made = [(k, h) for k in fam.index for h in ("fine_acc", "coarse_acc") if fam.loc[k, f"{h}_test"]
            and not math.isnan(fam.loc[k, f"{h}_p"])]
    assert len(made) == 4  # A-left fine, A-right coarse, ResNet-18 both heads
    assert fam.loc["resnet34", ["fine_acc_test", "coarse_acc_test"]].all()  # declared ...
    assert fam.loc["resnet34", ["fine_acc_p", "fine_acc_p_holm"]].isna().all()  # ... not testable
    raw = [fam.loc[k, f"{h}_p"] for k, h in made]
    want = textbook_holm(raw, m=6)  # the two ResNet-34 tests count, as p = 1
    assert [fam.loc[k, f"{h}_p_holm"] for k, h in made] == pytest.approx(want)
    # what it guards against: Holm over the 4 tests with runs gives smaller p
    short = results.comparison_table(df).set_index("model")
    assert [short.loc[k, f"{h}_p_holm"] for k, h in made] == pytest.approx(textbook_holm(raw, m=4))
    assert min(w - s for w, s in zip(want, textbook_holm(raw, m=4))) > 0
    md = "\n".join(results_md.comparison_section(comp, results.summary_table(df)))
    assert "Of the 6 tests of the family" in md and "Not testable (2), each counted in m with p = 1" in md
    assert "- resnet34, fine: no runs of resnet34" in md
    row = next(l for l in md.splitlines() if l.startswith("| resnet34 ") and "| fine " in l)
    assert "not testable (no runs of resnet34)" in row
    assert "one_hemisphere" in md.split("not part of this study's configuration")[1]


def test_fewer_than_2_seeds_in_common_names_each_models_own_seeds():
    cal = [b - 0.01 for b in BIL]
    df = pd.DataFrame(
        rows("bilateral", "resnet9-A", "fine_acc", BIL)
        + [dict(r, seed=s) for r, s in  # seeds 0 and 7: one in common with the bilateral model
           zip(rows("callosal", "resnet9-A-add-layer1+layer3", "fine_acc", cal[:2]), (0, 7))],
        columns=results.COLUMNS)
    comp = results.comparison_table(df)
    md = "\n".join(results_md.comparison_section(comp, results.summary_table(df)))
    row = next(l for l in md.splitlines() if l.startswith("| callosal/"))
    assert ("not testable (fewer than 2 seeds in common: 1; callosal/resnet9-A-add-layer1+layer3 "
            "has 2, bilateral/resnet9-A has 5)") in row
    assert "[n/a (1 seed in common)]" in row
