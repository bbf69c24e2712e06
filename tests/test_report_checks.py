"""Issue 20's reporting checks: a run whose record disagrees with itself (Fashion-MNIST D-left
seed 1: test 42.69 against test_kwta_threshold 41.09) is left out and named; the control
comparisons of stage one_hemisphere; the forest plot's groups, n and far-row panel."""
import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from bilateral import forest, results, stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parents[1]
COMMITTED = ROOT / "results" / "fashion_mnist" / "results.csv"


def run(exp, stage, name, seed, test, *, extra=None, history=None, report=None, val=None):
    d = exp / stage / name / f"seed={seed}"
    d.mkdir(parents=True)
    m = {"test": test, "val": val or test, "epochs": 4, "best_epoch": 4, "wall_s": 1.0,
         **({"report": report} if report else {}), **(extra or {})}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "config.json").write_text(json.dumps({"resolved": {
        "condition": name.split("-")[1], "backbone": "resnet9", "kwta_eval": "threshold"}}))
    if history is not None:
        pd.DataFrame([{"epoch": i + 1, **{f"val_{k}": v for k, v in h.items()}}
                      for i, h in enumerate(history)]).to_csv(d / "history.csv", index=False)
    return d


def test_a_run_whose_test_is_not_its_own_kwta_rule_is_left_out_and_named(tmp_path):
    exp = tmp_path / "exp"
    good = {"fine_acc": 0.70, "fine_as_coarse_acc": 0.80}
    for s in (0, 1):
        run(exp, "bilateral", "resnet9-A", s, {"fine_acc": 0.8, "coarse_acc": 0.9})
        run(exp, "hemisphere", "resnet9-D-left", s, good if s == 0 else
            {"fine_acc": 0.4269, "fine_as_coarse_acc": 0.5973},
            extra={"test_kwta_threshold": good if s == 0 else
                   {"fine_acc": 0.4109, "fine_as_coarse_acc": 0.5818},
                   "test_kwta_map_only": {"fine_acc": 0.4203, "fine_as_coarse_acc": 0.5989}})
    problems = []
    df = results.collect(exp, problems)
    assert [(Path(p).parent.name, "k-WTA rule threshold" in why) for p, why in problems] == [("seed=1", True)]
    left = df[(df.model == "resnet9-D-left") & (df.split == "test")]
    assert set(left.seed) == {0}
    md = results.markdown(exp, df, problems)
    assert "42.69 against 41.09" in md and "disagree with themselves" in md


def test_a_run_whose_val_is_not_its_history_is_left_out(tmp_path):
    exp = tmp_path / "exp"
    hist = [{"fine_acc": v, "coarse_acc": v} for v in (0.5, 0.6, 0.7, 0.75)]
    run(exp, "bilateral", "resnet9-A", 0, {"fine_acc": 0.8, "coarse_acc": 0.9}, report="last",
        history=hist, val={"fine_acc": 0.75, "coarse_acc": 0.75})
    run(exp, "bilateral", "resnet9-B", 0, {"fine_acc": 0.8, "coarse_acc": 0.9}, report="last",
        history=hist, val={"fine_acc": 0.731, "coarse_acc": 0.75})  # another evaluation
    problems = []
    df = results.collect(exp, problems)
    assert len(problems) == 1 and "resnet9-B" in problems[0][0] and "epoch 4" in problems[0][1]
    assert set(df.model) == {"resnet9-A"}


def test_the_committed_d_left_record_is_the_one_that_disagrees():
    df = pd.read_csv(COMMITTED)
    assert [p for p, _ in results.disagreeing_runs(df)] == ["hemisphere/resnet9-D-left/seed=1"]
    kept = results.without_runs(df, results.disagreeing_runs(df))
    assert len(df) - len(kept) == len(df[(df.model == "resnet9-D-left") & (df.seed == 1)])


def seeds(values, start=0):
    return {start + i: v for i, v in enumerate(values)}


def rows(stage, model, metric, values, condition="A"):
    return [dict(stage=stage, model=model, condition=condition, backbone="resnet9", seed=s,
                 split="test", metric=metric, value=v) for s, v in enumerate(values)]


BIL_F, BIL_C = [0.80, 0.81, 0.79, 0.805, 0.80], [0.90, 0.91, 0.905, 0.90, 0.895]


def test_one_hemisphere_controls_are_paired_with_their_bilateral_model_per_head():
    one_left_f = [b - 0.01 + e for b, e in zip(BIL_F, [0.002, -0.003, 0.001, 0.0, 0.002])]
    one_right_c = [b - 0.004 + e for b, e in zip(BIL_C, [0.001, -0.001, 0.0, 0.002, -0.002])]
    df = pd.DataFrame(
        rows("bilateral", "resnet9-A", "fine_acc", BIL_F) + rows("bilateral", "resnet9-A", "coarse_acc", BIL_C)
        + rows("one_hemisphere", "resnet9-A-left", "fine_acc", one_left_f)
        + rows("one_hemisphere", "resnet9-A-left", "coarse_acc", [0.7] * 5)
        + rows("one_hemisphere", "resnet9-A-right", "fine_acc", [0.6] * 5)
        + rows("one_hemisphere", "resnet9-A-right", "coarse_acc", one_right_c)
        + rows("resnet18", "resnet18", "fine_acc", [0.7, 0.71, 0.72, 0.7, 0.69]),
        columns=results.COLUMNS)
    comp = results.comparison_table(df).set_index("model")
    left, right = comp.loc["one_hemisphere/resnet9-A-left"], comp.loc["one_hemisphere/resnet9-A-right"]
    assert left.in_family and right.in_family
    # fine against the left only, coarse against the right only; paired seed by seed
    assert left.fine_acc_method == "paired" and pd.isna(left.coarse_acc_diff)
    assert right.coarse_acc_method == "paired" and pd.isna(right.fine_acc_diff)
    want = stats.paired(seeds(BIL_F), seeds(one_left_f))
    assert (left.fine_acc_diff, left.fine_acc_p) == pytest.approx((want["diff"], want["p"]))
    assert right.coarse_acc_diff == pytest.approx(0.004)
    fam = comp[comp.in_family]
    tests = fam[["fine_acc_test", "coarse_acc_test"]].to_numpy(bool).ravel()
    p = fam[["fine_acc_p", "coarse_acc_p"]].to_numpy(float).ravel()
    assert fam[["fine_acc_p_holm", "coarse_acc_p_holm"]].to_numpy(float).ravel()[tests] == pytest.approx(
        stats.holm(p[tests]))
    assert tests.sum() == 3  # the two controls and ResNet-18's fine head
    # without such runs (and no configuration recorded) there are no rows, and the control is
    # listed as not run
    none = results.comparison_table(df[df.stage != "one_hemisphere"])
    assert not none.model.str.startswith("one_hemisphere").any()
    assert any("one_hemisphere/resnet9-<condition>-left" in m for m in none.attrs["family_missing"])


def test_forest_groups_rows_prints_n_and_gives_far_rows_their_own_panel():
    comp = results.comparison_table(pd.read_csv(COMMITTED))
    near, far = forest.layout(comp)
    headers = [t for k, t in near if k == "header"]
    assert headers[:3] == ["hemispheres", "bilateral, other conditions", "baselines"]
    assert headers[-1].startswith("callosal")
    far_rows = {r.label for k, r in far if k == "row"}
    assert {"hemisphere/resnet9-B-left", "hemisphere/resnet9-D-left"} <= far_rows
    assert "hemisphere/resnet9-A-left" not in far_rows
    left = next(r for k, r in near if k == "row" and r.label == "hemisphere/resnet9-A-left")
    assert forest.row_text(left, "fine_acc").startswith("+1.7 [+0.8, +2.6] n=5 ")
    # no interval: one seed, or differences that do not vary over seeds (no test possible)
    flat = left.copy()
    flat["fine_acc_lo"] = flat["fine_acc_hi"] = flat["fine_acc_p_holm"] = float("nan")
    assert forest.row_text(flat, "fine_acc") == "+1.7 [no spread] n=5"
    flat["fine_acc_n"] = 1
    assert forest.row_text(flat, "fine_acc") == "+1.7 [1 seed] n=1"
    fig = forest.forest_plot(comp)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 4  # fine and coarse, near and far
    # the near fine panel spans well under the far rows' +20 points: 1-2 points stay visible
    near_fine = panels[0]
    lo, hi = near_fine.get_xlim()
    assert hi - lo < 15 and hi < 10
    boxes = [ax.get_window_extent() for ax in panels]
    assert not any(fig.legends[0].get_window_extent().overlaps(b) for b in boxes)
    titles = [ax.title.get_window_extent() for ax in fig.axes if ax.get_title()]
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1:])
    plt.close(fig)


def test_publish_commits_histories_analysis_tables_environment_and_provenance(tmp_path):
    from bilateral import data, publish
    exp = tmp_path / "out" / "fm"
    hist = [{"fine_acc": v, "coarse_acc": v + 0.1} for v in (0.5, 0.6, 0.7, 0.72)]
    for s in (0, 1):
        d = run(exp, "bilateral", "resnet9-A", s, {"fine_acc": 0.8, "coarse_acc": 0.9}, history=hist)
        rec = json.loads((d / "config.json").read_text())
        rec["resolved"]["dataset"] = "fashion_mnist"
        rec.update(seed=s, git="abc1234def", **({"cpu": "Test CPU 9000", "cpu_count": 2} if s else {}))
        (d / "config.json").write_text(json.dumps(rec))
        a = exp / "analysis" / "A" / f"seed={s}"
        a.mkdir(parents=True)
        pd.DataFrame([{"side": "left", "level": "fine", "acc": 0.7 + s / 100}]).to_csv(a / "probes.csv", index=False)
        (a / "metrics.json").write_text(json.dumps({"probe.left.fine": 0.7}))
    results.report(exp)
    dest = tmp_path / "results" / "fm"
    written = publish.publish(exp, dest, command="python -m bilateral sweep params/fashion_mnist.yaml")
    names = sorted(p.name for p in written)
    assert names == sorted(["results.csv", "results.md", "histories.csv",  # one model: no forest
                            "analysis_probes.csv", "PROVENANCE.md", "environment.txt"])
    h = pd.read_csv(dest / "histories.csv")
    assert list(h.columns[:6]) == ["stage", "model", "condition", "backbone", "seed", "epoch"]
    assert len(h) == 8 and set(h.seed) == {0, 1}
    probes = pd.read_csv(dest / "analysis_probes.csv")
    assert probes[["condition", "seed"]].values.tolist() == [["A", 0], ["A", 1]]
    md = (dest / "results.md").read_text()
    assert "`histories.csv`" in md and "`analysis_probes.csv`" in md
    env = (dest / "environment.txt").read_text()
    assert "numpy==" in env and "pandas==" in env
    prov = (dest / "PROVENANCE.md").read_text()
    gz, idx = data.FMNIST_SHA256["t10k-images-idx3-ubyte.gz"]
    assert gz in prov and idx in prov
    assert ("python -m bilateral train bilateral --params params/fashion_mnist.yaml --seed <k> "
            "--set condition=A") in prov
    assert "revision that built this report: " in prov and "its tree: " in prov
    table = prov.split("## Every run")[1]
    assert "Test CPU 9000" in table and "not recorded" in table and "abc1234def" in table
    assert "seed 0: " in prov and "environment.txt" in prov


# ---------------------------------------------- the family declared by the runs' records

def record(exp, stage, name, seed, test, **resolved):
    """A finished run whose config.json states the study's configuration, as the runner
    writes it (resolved: the run's whole config, conditions and baselines included)."""
    d = exp / stage / name / f"seed={seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"test": test, "val": test, "epochs": 4, "wall_s": 1.0}))
    res = {"conditions": ["A"], "baselines": ["resnet18", "resnet34"], "backbone": "resnet9",
           "condition": "A", **resolved}
    (d / "config.json").write_text(json.dumps({"resolved": res}))


def test_report_builds_the_family_from_the_recorded_configuration(tmp_path):
    exp = tmp_path / "exp"
    for s, e in enumerate([0.004, -0.006, 0.003]):
        record(exp, "bilateral", "resnet9-A", s, {"fine_acc": 0.80 + e, "coarse_acc": 0.90 - e})
        record(exp, "hemisphere", "resnet9-A-left", s, {"fine_acc": 0.78 + 2 * e}, side="left")
        record(exp, "hemisphere", "resnet9-A-right", s, {"coarse_acc": 0.89 + e}, side="right")
        record(exp, "resnet18", "resnet18", s, {"fine_acc": 0.70 + e, "coarse_acc": 0.85 + 3 * e})
    rep = results.report(exp)  # resnet34 declared, never run
    assert results.read_study(exp / results.STUDY) == rep["declarations"]
    assert [(d["conditions"], d["baselines"]) for d in rep["declarations"]] == [
        (["A"], ["resnet18", "resnet34"])]
    comp = rep["comparison"].set_index("model")
    fam = comp[comp.in_family]
    assert fam[["fine_acc_test", "coarse_acc_test"]].to_numpy().sum() == 6  # resnet34's two included
    assert comp.loc["resnet34", ["fine_acc_p", "coarse_acc_p"]].isna().all()
    made = fam.fine_acc_p.dropna().tolist() + fam.coarse_acc_p.dropna().tolist()
    holm = fam.fine_acc_p_holm.dropna().tolist() + fam.coarse_acc_p_holm.dropna().tolist()
    assert holm == pytest.approx(stats.holm(made + [float("nan")] * 2)[:4])
    md = (exp / "results.md").read_text()
    assert "Of the 6 tests of the family" in md and "no runs of resnet34" in md
    # the same report from results.csv alone reads the study.json beside it
    again = results.from_csv(exp / "results.csv", tmp_path / "published")
    assert again["comparison"].fine_acc_p_holm.tolist() == pytest.approx(
        rep["comparison"].fine_acc_p_holm.tolist(), nan_ok=True)
    (exp / results.STUDY).unlink()  # without it: the models with runs only, m = 4
    alone = results.from_csv(exp / "results.csv", tmp_path / "alone")["comparison"]
    assert "resnet34" not in set(alone.model)
    assert "no record states the study's configuration" in (tmp_path / "alone" / "results.md").read_text()


def test_a_declaration_takes_each_name_field_from_the_records_that_use_it(tmp_path):
    # a ResNet-18 record holds the default backbone (stage_config resets what its stage does
    # not use), a hemisphere record the default callosal depths: neither may declare models
    vgg = tmp_path / "vgg"
    record(vgg, "hemisphere", "vgg11-A-left", 0, {"fine_acc": 0.7}, backbone="vgg11", side="left")
    record(vgg, "resnet18", "resnet18", 0, {"fine_acc": 0.7}, backbone="resnet9")
    (decl,) = results.study_declarations(vgg)
    assert decl["backbone"] == "vgg11"
    keys = set(results.declared_models([decl]))
    assert "hemisphere/vgg11-A-left" in keys and not any("resnet9" in k for k in keys)
    cal = tmp_path / "cal"
    at = dict(callosum_kinds=["add"], baselines=[])
    record(cal, "hemisphere", "resnet9-A-left", 0, {"fine_acc": 0.7}, side="left",
           callosum_at=["layer1", "layer3"], **at)
    record(cal, "callosal", "resnet9-A-add-layer2", 0, {"fine_acc": 0.7}, callosum="add",
           callosum_at=["layer2"], **at)
    (decl,) = results.study_declarations(cal)
    assert decl["callosum_at"] == ["layer2"]
    keys = set(results.declared_models([decl]))
    assert {"callosal/resnet9-A-add-layer2", "bilateral_matched/resnet9-A-add-layer2"} <= keys
    assert not any("layer1" in k for k in keys)
    # records that state no configuration (forged, or older) declare nothing
    old = tmp_path / "old"
    run(old, "bilateral", "resnet9-A", 0, {"fine_acc": 0.8, "coarse_acc": 0.9})
    assert results.study_declarations(old) == []
