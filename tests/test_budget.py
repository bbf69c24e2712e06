"""Budgets chosen on validation (bilateral/budget.py) and the wsd schedule that makes the
search cheap: its lr by definition, and a branched budget equal to a separate run."""
import json

import pandas as pd
import pytest
import yaml

from bilateral import budget, plan, runs, sweep, train
from bilateral import config as C


def test_wsd_lr_matches_its_definition_and_ignores_the_budget_before_its_decay():
    per = 10
    for epochs in (4, 8, 16, 32):
        total, d0 = epochs * per, train.decay_start(epochs, 0.2) * per
        f = [train.lr_factor("wsd", s, total, per, 1.0, 0.2) for s in range(total)]
        assert f[:per] == pytest.approx([(s + 1) / per for s in range(per)])  # one epoch of warm-up
        assert all(x == 1.0 for x in f[per:d0])                              # constant
        assert f[d0:] == pytest.approx([(total - s) / (total - d0) for s in range(d0, total)])
        assert f[-1] > 0 and (total - d0) == per * max(1, -(-epochs // 5))  # ceil(epochs / 5) epochs
    # before its decay starts, a shorter budget's lr is the longest budget's, step for step
    long = [train.lr_factor("wsd", s, 320, per) for s in range(320)]
    for epochs in (4, 8, 16):
        d0 = train.decay_start(epochs, 0.2) * per
        assert [train.lr_factor("wsd", s, epochs * per, per) for s in range(d0)] == long[:d0]


def test_the_smallest_budget_within_the_threshold_of_the_best_is_chosen():
    """A constructed learning curve: a saturates (16 within 0.3 points of 32's best), b peaks at
    8 and overfits after, c is still rising (only its longest budget is within the threshold)."""
    curve = {"a": [0.80, 0.85, 0.870, 0.872], "b": [0.60, 0.70, 0.69, 0.68],
             "c": [0.50, 0.60, 0.70, 0.80]}
    rows = [dict(stage=s, run=s, budget=b, seed=seed, score=v + (0.001 if seed else -0.001))
            for s, vs in curve.items() for b, v in zip((4, 8, 16, 32), vs) for seed in (0, 1)]
    got = budget.choose(pd.DataFrame(rows), threshold=0.3).set_index("stage")
    assert got.budget.to_dict() == {"a": 16, "b": 8, "c": 32}
    assert got.best_budget.to_dict() == {"a": 32, "b": 8, "c": 32}
    assert got.plateau.to_dict() == {"a": True, "b": True, "c": False}
    assert budget.choose(pd.DataFrame(rows), threshold=0.1).set_index("stage").budget["a"] == 32


TINY = dict(experiment="b", dataset="synthetic", synthetic_size=240, width=0.03125,
            batch_size=64, progress=False, threads=1, device="cpu", conditions=["A"],
            baselines=[], schedule="wsd")


def test_a_branched_budget_equals_a_separate_run_and_the_search_writes_its_choice(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "search")}))
    code = budget.run(params, [2, 4], [0], log=lambda m: None)
    assert code == 0
    points = sweep.expand_grid(params, sweep.absolute_dirs(params, {"stage_epochs": {}}),
                               ["epochs=2,4"])
    short = next(c for c, p in points if p["epochs"] == 2)
    trunk = next(c for c, p in points if p["epochs"] == 4)
    assert short.branch_from == str(runs.experiment_dir(trunk)) and trunk.keep_at == [1]
    left = plan.Run("hemisphere", C.load(params, {"epochs": 2, "experiment": short.experiment,
                                                   "out_dir": str(tmp_path / "search"),
                                                   "side": "left"}), 0)
    logs = (runs.experiment_dir(short) / "jobs" / "local").glob("hemisphere_resnet9-A-left*.log")
    assert "branches from" in "".join(f.read_text() for f in logs)
    # the same run trained alone at budget 2, from the start
    alone = plan.Run("hemisphere", C.load(params, {"epochs": 2, "out_dir": str(tmp_path / "alone"),
                                                    "side": "left"}), 0)
    alone.train(log=lambda m: None)
    a, b = left.metrics(), alone.metrics()
    assert a["model_sha256"] == b["model_sha256"] and a["test"] == b["test"] and a["val"] == b["val"]
    # a run built on others (the bilateral heads on the budget-2 hemispheres) does not branch
    # from the longer run, whose heads saw the budget-4 hemispheres: it equals a separate run
    for side in ("right",):
        plan.Run("hemisphere", C.load(params, {"epochs": 2, "out_dir": str(tmp_path / "alone"),
                                                "side": side}), 0).train(log=lambda m: None)
    bil = lambda out: plan.Run("bilateral", C.load(params, {  # noqa: E731
        "epochs": 2, "out_dir": str(tmp_path / out), **({"experiment": short.experiment} if out == "search" else {})}), 0)
    bil("alone").train(log=lambda m: None)
    a, b = bil("search").metrics(), bil("alone").metrics()
    assert a["model_sha256"] == b["model_sha256"] and a["val"] == b["val"]
    out = tmp_path / "search" / "b-budget"
    table = pd.read_csv(out / "budgets.csv")
    assert set(table.budget) == {2, 4} and set(table.stage) == {"hemisphere", "bilateral"}
    chosen = yaml.safe_load((out / "budgets.yaml").read_text())
    assert chosen["schedule"] == "wsd" and set(chosen["stage_epochs"]) == {"hemisphere", "bilateral"}
    assert set(chosen["stage_epochs"].values()) <= {2, 4}
    # the curves: every finished model at each budget, its compute counting its upstream runs
    cur = pd.read_csv(out / "curves.csv")
    assert set(cur.budget) == {2, 4} and (out / "curves.png").stat().st_size > 10_000
    hist = pd.read_csv(out / "histories.csv")  # every run's epochs, the branched ones too
    assert sorted(hist[(hist.stage == "hemisphere") & (hist.model == "resnet9-A-left")].budget) == [2, 2, 4, 4, 4, 4]
    bil = cur[(cur.stage == "bilateral") & (cur.budget == 4)]
    hemi = cur[(cur.stage == "hemisphere") & (cur.budget == 4)]
    assert set(bil["head"]) == {"fine", "coarse"} and set(hemi.run) == {"resnet9-A-left", "resnet9-A-right"}
    assert bil.compute.iloc[0] == pytest.approx(hemi.drop_duplicates("run").compute.sum()
                                                + plan.Run("bilateral", trunk, 0).cost())


def test_curve_summary_averages_pool_members_within_a_seed_then_over_seeds():
    rows = [dict(model="u", head="fine", budget=8, seed=s, test=v)
            for s, vals in ((0, (0.80, 0.82)), (1, (0.84, 0.86)), (2, (0.90, 0.90))) for v in vals]
    rows += [dict(model="one", head="fine", budget=8, seed=0, test=0.7)]
    got = budget.curve_summary(pd.DataFrame(rows)).set_index("model")
    seed_means = [0.81, 0.85, 0.90]
    sd = pd.Series(seed_means).std()
    assert got.loc["u", "n"] == 3 and got.loc["u", "mean"] == pytest.approx(sum(seed_means) / 3)
    assert got.loc["u", "half"] == pytest.approx(4.302653 * sd / 3 ** 0.5, rel=1e-5)  # t(0.975, 2)
    assert got.loc["one", "n"] == 1 and got.loc["one", "half"] == 0.0


def test_an_incomplete_search_chooses_nothing_and_plateau_is_against_the_longest_budget_asked():
    """The review's cases: a run missing at one budget moves the mean (the fine and the coarse
    hemisphere are 3 points apart), a NaN budget would be skipped, and a stage whose best is
    its longest budget present but not the longest asked for would read as a plateau."""
    rows = [dict(stage="hemisphere", run=run, seed=100, budget=b, score=v + (0.03 if run == "left" else 0))
            for run in ("left", "right") for b, v in ((8, 0.85), (16, 0.88), (32, 0.90))]
    full = pd.DataFrame(rows)
    assert budget.choose(full).budget.tolist() == [32]
    gone = full[~((full.run == "right") & (full.budget == 32))]
    with pytest.raises(ValueError, match="right seed 100 at 32 epochs"):
        budget.choose(gone)
    nan = full.copy()
    nan.loc[(nan.run == "left") & (nan.budget == 32), "score"] = float("nan")
    with pytest.raises(ValueError, match="left seed 100 at 32 epochs"):
        budget.choose(nan)
    with pytest.raises(ValueError, match="at 64 epochs"):
        budget.choose(full, budgets=[8, 16, 32, 64])
    assert not budget.choose(full[full.budget < 32], budgets=[8, 16]).plateau.item()
    # a gap of exactly the threshold is within it (scores are counts of validation images)
    tie = pd.DataFrame([dict(stage="s", run="r", seed=0, budget=b, score=v / 2000)
                        for b, v in ((8, 1794), (16, 1800))])
    assert budget.choose(tie).budget.item() == 8


def test_curves_name_each_model_by_its_run_not_its_label():
    cfg = C.from_dict({"conditions": ["A"], "callosum_kinds": ["add"]})
    at = lambda depths: plan.Run("callosal", C.from_dict({"callosum_at": depths}), 0)  # noqa: E731
    shallow, deep = at(["layer1"]), at(["layer2", "layer3"])
    assert shallow.label == deep.label  # "A callosal add": a curve per label merges the depths
    assert budget.model_name(shallow) != budget.model_name(deep)
    assert budget.model_name(deep) == "callosal/resnet9-A-add-layer2+layer3"
    side = dict(condition="A", side="left")
    hemi = plan.Run("hemisphere", C.from_dict(side), 0)
    one = plan.Run("one_hemisphere", C.from_dict(side), 0)
    assert hemi.name == one.name and budget.model_name(hemi) != budget.model_name(one)
    members = {budget.model_name(r) for r in plan.plan(cfg, [0]) if r.stage == "unilateral"}
    assert members == {"unilateral/resnet9 (pool mean)"}  # the pool is one model


def test_the_gap_to_the_bilateral_model_is_taken_seed_by_seed():
    """Gaps pair the seeds (the same seed's bilateral model): a seed effect common to both
    models cancels, so the interval is that of the differences, not of two spreads."""
    rows = []
    for seed, shift in ((0, 0.00), (1, 0.05), (2, -0.04)):  # a large seed effect on both
        rows += [dict(model="bilateral/resnet9-A", stage="bilateral", head="fine", budget=8,
                      seed=seed, test=0.90 + shift),
                 dict(model="unilateral/resnet9 (pool mean)", stage="unilateral", head="fine",
                      budget=8, seed=seed, test=0.88 + shift),
                 dict(model="unilateral/resnet9 (pool mean)", stage="unilateral", head="fine",
                      budget=8, seed=seed, test=0.86 + shift + 0.001 * seed)]
    t = pd.DataFrame(rows)
    assert budget.reference_model(t) == "bilateral/resnet9-A"
    got = budget.gap_summary(t, "bilateral/resnet9-A").iloc[0]
    diffs = [0.87 - 0.90 + 0.0005 * s for s in range(3)]  # pool mean per seed minus bilateral
    assert got["n"] == 3 and got["mean"] == pytest.approx(sum(diffs) / 3)
    assert got["half"] == pytest.approx(4.302653 * pd.Series(diffs).std() / 3 ** 0.5, rel=1e-5)
    assert got["half"] < 0.005  # the seed effect (9 points) is not in the interval
    fig = budget.plot_curves(t.assign(compute=8.0))
    assert len(fig.axes) == 3  # one head: against budget, against compute, the gap
