"""results.csv / results.md from forged run records: statistics against references, labels,
the convergence flag, capacity, weight decay and k-WTA sections, the forest plot."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bilateral import results, results_md, stats

ROOT = Path(__file__).parents[1]

# Student's sleep data (Cushny & Peebles), R's `sleep`: extra hours of sleep under two drugs,
# the same 10 patients. R: t.test(extra ~ group, data = sleep, paired = TRUE) gives the 95%
# interval -2.4598858 -0.7001142; without paired (Welch) -3.3654832 0.2054832, df 17.776.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def as_seeds(values, start=0):
    return {start + i: v for i, v in enumerate(values)}


def test_paired_interval_matches_the_textbook():
    d = stats.paired(as_seeds(SLEEP_1), as_seeds(SLEEP_2))
    assert d["method"] == "paired" and d["n_a"] == 10
    assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((-1.58, -2.4598858, -0.7001142), abs=1e-6)


def test_welch_interval_matches_the_textbook():
    d = stats.welch(as_seeds(SLEEP_1), as_seeds(SLEEP_2, start=100))
    assert d["method"] == "Welch" and (d["n_a"], d["n_b"]) == (10, 10)
    assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((-1.58, -3.3654832, 0.2054832), abs=1e-6)


def test_paired_uses_the_common_seeds_and_degenerate_cases_give_no_false_interval():
    a, b = {0: 0.7, 1: 0.8, 2: 0.75, 7: 0.1}, {0: 0.6, 1: 0.7, 2: 0.7, 9: 0.9}
    d = stats.paired(a, b)
    assert (d["n"], d["n_a"], d["n_b"]) == (3, 4, 4) and d["diff"] == pytest.approx((0.1 + 0.1 + 0.05) / 3)
    assert d["lo"] < d["diff"] < d["hi"]
    one = stats.welch({0: 0.7}, {1: 0.6, 2: 0.5})
    assert one["diff"] == pytest.approx(0.15) and math.isnan(one["lo"])
    same = stats.paired({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.7})  # identical differences: no spread
    assert math.isnan(same["lo"]) and math.isnan(same["hi"]) and same["diff"] == pytest.approx(0.1)


def test_only_a_bilateral_model_and_its_own_hemispheres_are_paired():
    ref = "bilateral/resnet9-A"
    assert stats.shares_runs(ref, "hemisphere/resnet9-A-left")
    assert stats.shares_runs(ref, "hemisphere/resnet9-A-right")
    assert stats.shares_runs(ref, "callosal/resnet9-A-add-layer1+layer3")  # built on them too
    for other in ("hemisphere/resnet9-C-left", "bilateral/resnet9-B", "unilateral/resnet9",
                  "ensemble/resnet9-k2", "bilateral_unspecialised/resnet9-A", "resnet34",
                  "callosal/resnet9-B-add-layer1+layer3",
                  "callosal_unspecialised/resnet9-A-add-layer1+layer3"):
        assert not stats.shares_runs(ref, other)
    # the capacity control shares its hemispheres with the callosal model of its condition
    cal = "callosal/resnet9-A-add-layer1+layer3"
    assert stats.shares_runs(cal, "bilateral_matched/resnet9-A-add-layer1+layer3")
    assert stats.shares_runs("bilateral_matched/resnet9-B-gate-layer1", "one_hemisphere/resnet9-B-right")
    assert not stats.shares_runs(cal, "bilateral_matched/resnet9-C-add-layer1+layer3")
    assert not stats.shares_runs(cal, cal)


def test_a_callosal_model_meets_the_control_of_its_own_depth_only():
    keys = ["bilateral/resnet9-A", "callosal/resnet9-A-add-layer1+layer3", "callosal/resnet9-A-add-layer2",
            "bilateral_matched/resnet9-A-add-layer1+layer3", "bilateral_matched/resnet9-A-add-layer2",
            "bilateral_matched/resnet9-A-gate-layer2"]
    pairs, _ = results.family_pairs("bilateral/resnet9-A", keys, results.CALLOSAL_FAMILY)
    matched = sorted((a, b) for a, b, _ in pairs if b.startswith("bilateral_matched/"))
    assert matched == [
        ("callosal/resnet9-A-add-layer1+layer3", "bilateral_matched/resnet9-A-add-layer1+layer3"),
        ("callosal/resnet9-A-add-layer2", "bilateral_matched/resnet9-A-add-layer2")]
    # against the bilateral model every depth is a comparison of its own
    assert sorted(a for a, b, _ in pairs if b == "bilateral/resnet9-A") == [
        "callosal/resnet9-A-add-layer1+layer3", "callosal/resnet9-A-add-layer2"]
    assert results.wildcard_text("callosal/resnet9-A-add-*", "callosal/resnet9-A-add-layer2") == ("layer2",)
    assert results.wildcard_text("callosal/resnet9-A-add-*", "callosal/resnet9-A-gate-layer2") is None


# ------------------------------------------------------------------------- the convergence flag

def test_still_rising_on_forged_histories_both_ways():
    climbing = [0.30, 0.45, 0.55, 0.62, 0.67, 0.71, 0.74, 0.77]
    plateau = [0.30, 0.60, 0.72, 0.78, 0.80, 0.801, 0.799, 0.806]
    noisy_plateau = [0.5, 0.7, 0.78, 0.80, 0.795, 0.81, 0.80, 0.805, 0.80, 0.81, 0.805, 0.808]
    assert results.still_rising(climbing, n_val=2000) is True
    assert results.still_rising(plateau, n_val=2000) is False
    assert results.still_rising(noisy_plateau, n_val=2000) is False
    # the same gain is within the noise of a small validation set, beyond it of a large one
    small_gain = [0.70, 0.78, 0.800, 0.806, 0.812]
    assert results.still_rising(small_gain, n_val=200) is False
    assert results.still_rising(small_gain, n_val=20000) is True
    assert results.still_rising([0.5, 0.6, 0.7], n_val=2000) is None  # too short to tell
    # one lucky last epoch on a flat tail is not a trend
    assert results.still_rising([0.6, 0.75, 0.80, 0.79, 0.80, 0.79, 0.80, 0.812], 2000) is False


# ------------------------------------------------------------------------------ a forged study

def fake_run(exp, stage, name, seed, test, *, params=100, total=None, wd=5e-4, heads=None,
             history=None, extra=None, n_val=2000):
    d = exp / stage / name / f"seed={seed}"
    d.mkdir(parents=True)
    heads = heads or [h[:-4] for h in test if h in ("fine_acc", "coarse_acc")]
    metrics = {"test": test, "val": test, "wall_s": 1.0, "epochs": len(history or [0] * 4),
               "best_epoch": 2, "heads": heads, **(extra or {})}
    (d / "metrics.json").write_text(json.dumps(metrics))
    rec = {"trainable_params": params, "total_params": total or params, "n_val": n_val,
           "resolved": {"condition": name.split("-")[1] if "-" in name and stage != "unilateral"
                        else "A", "backbone": "resnet9", "dataset": "synthetic"}}
    if stage != "ensemble":
        rec["hyper"] = {"weight_decay": wd}
    (d / "config.json").write_text(json.dumps(rec))
    if history is not None:
        rows = [{"epoch": i + 1, **{f"val_{h}_acc": v for h in heads}} for i, v in enumerate(history)]
        pd.DataFrame(rows).to_csv(d / "history.csv", index=False)


FLAT = [0.3, 0.6, 0.7, 0.72, 0.73, 0.73, 0.731, 0.73]
CLIMB = [0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65]
BIL = {0: (0.70, 0.80), 1: (0.72, 0.83), 2: (0.71, 0.81)}
UNI = {0: (0.60, 0.75), 1: (0.65, 0.74), 2: (0.61, 0.79)}
LEFT = {0: 0.66, 1: 0.69, 2: 0.67}
BIL_FINE = {s: BIL[s][0] for s in BIL}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    exp = tmp_path_factory.mktemp("r") / "exp"
    for s in BIL:
        fake_run(exp, "bilateral", "resnet9-A", s, {"fine_acc": BIL[s][0], "coarse_acc": BIL[s][1]},
                 params=2064, total=2064 + 2 * 103_000, wd=1e-5, history=FLAT)
        fake_run(exp, "hemisphere", "resnet9-A-left", s,
                 {"fine_acc": LEFT[s], "fine_as_coarse_acc": 0.76}, params=103_954, wd=1e-3,
                 history=FLAT)
        fake_run(exp, "hemisphere", "resnet9-C-left", s, {"fine_acc": 0.6, "fine_as_coarse_acc": 0.7},
                 wd=1e-3, history=FLAT, extra={
                     "test_kwta_threshold": {"fine_acc": 0.6, "fine_as_coarse_acc": 0.7},
                     "test_kwta_map_only": {"fine_acc": 0.55 - 0.01 * s, "fine_as_coarse_acc": 0.7},
                     "test_kwta_batch": {"fine_acc": 0.58, "fine_as_coarse_acc": 0.7}})
        for m in (0, 1):  # two pool members: averaged per seed
            fake_run(exp, "unilateral", f"resnet9-m{m}", s,
                     {"fine_acc": UNI[s][0] + 0.01 * m, "coarse_acc": UNI[s][1]}, params=104_344,
                     wd=1e-5, history=FLAT)
        fake_run(exp, "ensemble", "resnet9-k2", s, {"fine_acc": 0.62, "coarse_acc": 0.77},
                 params=0, total=2 * 104_344)
    fake_run(exp, "resnet18", "resnet18", 0, {"fine_acc": 0.5, "coarse_acc": 0.6}, wd=1e-5)
    for s, v in ((0, 0.6), (5, 0.7)):  # other seeds than the bilateral model's
        fake_run(exp, "resnet34", "resnet34", s, {"fine_acc": v, "coarse_acc": v}, wd=1e-5,
                 history=CLIMB if s == 0 else FLAT)
    a = exp / "analysis" / "B" / "seed=1"
    a.mkdir(parents=True)
    (a / "metrics.json").write_text(json.dumps({"probe.left": 0.5, "nested": {"x": 2}}))
    b = exp / "analysis" / "custom"
    b.mkdir(parents=True)
    (b / "metrics.json").write_text(json.dumps({"probe.left": 0.7}))
    (b / "meta.json").write_text(json.dumps({"condition": "C", "seed": 4}))
    return exp, results.report(exp)


def test_results_csv_holds_every_record(study):
    exp, _ = study
    df = pd.read_csv(exp / "results.csv")
    assert list(df.columns) == results.COLUMNS
    assert len(df[(df.stage == "unilateral") & (df.split == "test")]) == 3 * 2 * 2
    an = df[df.stage == "analysis"].sort_values("seed")
    assert an[["condition", "seed", "metric", "value"]].values.tolist() == [
        ["B", 1, "probe.left", 0.5], ["B", 1, "nested.x", 2.0], ["C", 4, "probe.left", 0.7]]
    assert set(df[df.stage == "unilateral"].condition.fillna("")) == {""}
    train = df[df.split == "train"]
    assert set(train.metric) >= {"trainable_params", "total_params", "weight_decay", "still_rising"}
    kw = df[df.split == "test_kwta_map_only"]
    assert len(kw) == 3 * 2 and set(kw.model) == {"resnet9-C-left"}


def test_summary_means_capacity_budget_and_rising_flags(study):
    _, rep = study
    summ = rep["summary"].set_index("model")
    f = [BIL[s][0] for s in BIL]
    assert summ.loc["bilateral/resnet9-A", "fine_acc_mean"] == pytest.approx(sum(f) / 3)
    assert summ.loc["bilateral/resnet9-A", "fine_acc_sd"] == pytest.approx(pd.Series(f).std(ddof=1))
    assert summ.loc["unilateral/resnet9", "fine_acc_n"] == 3  # seeds, not pool members
    assert summ.loc["bilateral/resnet9-A", ["total_params", "trainable_params"]].tolist() == [
        208_064, 2064]
    assert summ.loc["ensemble/resnet9-k2", "total_params"] == 2 * 104_344
    assert summ.loc["resnet34", ["rising", "judged"]].tolist() == [1, 2]
    assert summ.loc["unilateral/resnet9", ["rising", "judged"]].tolist() == [0, 6]
    assert summ.loc["resnet18", "judged"] == 0  # no history: not judged
    assert summ.loc["resnet34", "epochs"] == "8"
    # a bilateral model's weight decay is its hemispheres', an ensemble's its members'
    assert summ.loc["bilateral/resnet9-A", "weight_decay"] == [1e-3]
    assert summ.loc["ensemble/resnet9-k2", "weight_decay"] == [1e-5]


def test_a_pooled_row_shows_both_spreads(study):
    exp, rep = study
    uni = rep["summary"].set_index("model").loc["unilateral/resnet9"]
    runs = [UNI[s][0] + 0.01 * m for s in UNI for m in (0, 1)]
    means = [UNI[s][0] + 0.005 for s in UNI]
    assert uni.pooled and (uni.fine_acc_n, uni.fine_acc_runs) == (3, 6)
    assert uni.fine_acc_sd == pytest.approx(pd.Series(means).std(ddof=1))
    assert uni.fine_acc_run_sd == pytest.approx(pd.Series(runs).std(ddof=1))
    assert not rep["summary"].set_index("model").loc["bilateral/resnet9-A", "pooled"]
    md = (exp / "results.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| unilateral/resnet9 ") and "| fine " in l)
    assert (f"{100 * pd.Series(means).std(ddof=1):.1f} (3 seeds)" in row
            and f"{100 * pd.Series(runs).std(ddof=1):.1f} (6 runs)" in row)
    assert "SD of per-seed means" in md and "SD of one run" in md


def test_comparisons_are_labelled_by_what_they_share(study):
    _, rep = study
    comp = rep["comparison"].set_index("model")
    left = comp.loc["hemisphere/resnet9-A-left"]
    assert left.fine_acc_method == "paired"
    d = [BIL[s][0] - LEFT[s] for s in BIL]
    half = 4.302652729749464 * pd.Series(d).std(ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert (left.fine_acc_diff, left.fine_acc_lo, left.fine_acc_hi) == pytest.approx(
        (sum(d) / 3, sum(d) / 3 - half, sum(d) / 3 + half))
    uni = comp.loc["unilateral/resnet9"]  # same seed numbers, independent runs: not paired
    assert uni.fine_acc_method == "Welch"
    bil = [BIL[s][0] for s in BIL]
    pool = [UNI[s][0] + 0.005 for s in UNI]
    ref = stats.welch(as_seeds(bil), as_seeds(pool, start=10))
    assert (uni.fine_acc_diff, uni.fine_acc_lo, uni.fine_acc_hi) == pytest.approx(
        (ref["diff"], ref["lo"], ref["hi"]))
    assert comp.loc["resnet34", "fine_acc_method"] == "Welch"
    assert math.isnan(comp.loc["resnet18", "fine_acc_lo"])
    assert math.isnan(comp.loc["resnet18", "fine_acc_p"])  # one seed: not testable ...
    assert math.isnan(comp.loc["resnet18", "fine_acc_p_holm"])  # ... no Holm p, but in m
    assert math.isnan(comp.loc["hemisphere/resnet9-A-left", "coarse_acc_diff"])
    # p and df are scipy's, the sign-flip p only where the runs are paired
    assert (left.fine_acc_df, left.fine_acc_n) == (2, 3)
    assert left.fine_acc_p == pytest.approx(stats.paired(BIL_FINE, LEFT)["p"])
    assert left.fine_acc_p_sign_flip == 0.25  # 3 differences of one sign: 2 of 8 patterns
    assert (uni.fine_acc_p, uni.fine_acc_df) == pytest.approx((ref["p"], ref["df"]))
    assert math.isnan(uni.fine_acc_p_sign_flip)
    # Holm over every test of the family (no record states a configuration: the declared
    # comparisons among the models run): the fine head of hemispheres A and C, both heads of
    # the unilateral net, ResNet-34 (2 seeds) and the ensemble, and ResNet-18's two heads,
    # which one seed leaves untestable: they count in m as p = 1
    fam = comp[comp.in_family]
    assert set(fam.index) == {"hemisphere/resnet9-A-left", "hemisphere/resnet9-C-left",
                              "unilateral/resnet9", "resnet18", "resnet34", "ensemble/resnet9-k2"}
    tests = fam[["fine_acc_test", "coarse_acc_test"]].to_numpy(bool).ravel()
    p = fam[["fine_acc_p", "coarse_acc_p"]].to_numpy(float).ravel()[tests]
    assert len(p) == 10 and (~pd.isna(p)).sum() == 8
    holm_p = fam[["fine_acc_p_holm", "coarse_acc_p_holm"]].to_numpy(float).ravel()
    assert holm_p[tests] == pytest.approx(stats.holm(p), nan_ok=True)
    assert pd.isna(holm_p[~tests]).all()
    first = int(pd.Series(p).idxmin())  # Holm's first step is Bonferroni over all m = 10
    assert holm_p[tests][first] == pytest.approx(min(1.0, 10 * p[first]))


def test_kwta_table_pairs_the_rules_of_the_same_runs(study):
    _, rep = study
    kw = rep["kwta"]
    row = kw[(kw.model == "hemisphere/resnet9-C-left") & (kw.metric == "fine_acc")].iloc[0]
    assert row["threshold"][0] == pytest.approx(0.6) and row["map_only"][0] == pytest.approx(0.54)
    d = row["threshold_minus_map_only"]
    assert d["method"] == "paired" and d["diff"] == pytest.approx(0.06) and d["lo"] < 0.06 < d["hi"]


def test_results_md_leads_with_the_forest_plot_and_says_what_it_compares(study):
    exp, rep = study
    md = (exp / "results.md").read_text()
    assert md.splitlines()[2] == f"![bilateral model minus every other model, 95% intervals]({results_md.FOREST})"
    assert rep["forest"] == exp / results_md.FOREST and (exp / results_md.FOREST).stat().st_size > 5000
    f = [BIL[s][0] for s in BIL]
    assert f"{100 * sum(f) / 3:.1f} ± {100 * pd.Series(f).std(ddof=1):.1f} (3)" in md
    assert "[n/a (1 seed)]" in md and "(Welch)" in md and "(paired)" in md
    assert "ttest_rel" in md and "independent" in md and "Data: **synthetic**" in md
    assert "| Holm p " in md and "| sign-flip p " in md and "`FAMILY`" in md
    assert "| resnet34 ↑1/2 " in md and "| unilateral/resnet9 " in md
    assert "208,064" in md and "2,064" in md  # total beside trainable
    # the weight decay line names the confounded comparisons from the records
    assert "resnet34 (1e-05)" in md and "hemisphere/resnet9-C-left" in md.split("Free of")[1]
    assert "## k-WTA at evaluation" in md and "map_only" in md
    assert "| metric " in md and "condition B" in md  # analyses table via to_markdown


def test_equal_weight_decay_says_nothing_is_confounded(tmp_path):
    exp = tmp_path / "eq"
    for s in (0, 1):
        fake_run(exp, "bilateral", "resnet9-A", s, {"fine_acc": 0.7, "coarse_acc": 0.8}, wd=1e-3)
        for side in ("left", "right"):
            fake_run(exp, "hemisphere", f"resnet9-A-{side}", s, {"fine_acc": 0.6}, wd=1e-3)
        fake_run(exp, "resnet34", "resnet34", s, {"fine_acc": 0.6, "coarse_acc": 0.7}, wd=1e-3)
    results.report(exp)
    assert "no comparison is confounded" in (exp / "results.md").read_text()


def test_report_cli_and_an_empty_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bilateral", "report", str(tmp_path)], cwd=ROOT,
                       text=True, capture_output=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "no finished runs" in r.stderr


def test_trainable_params_lists_both_counts(study):
    exp, _ = study
    t = results.trainable_params(exp, seed=0)
    row = t[t.model == "resnet9-A"].iloc[0]
    assert (row.trainable_params, row.total_params) == (2064, 208_064)
