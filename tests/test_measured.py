"""What a sweep decides by measuring at its start (issue 21): `pack: auto` packs only where one
packable group measured faster packed than separate (the timer stubbed, so that each outcome is
taken without timing anything), and the estimate calibrated from the run records already
finished on this machine (constructed records), a wsd branch counting its decay epochs only."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from bilateral import config as C
from bilateral import plan, runner, runs, sweep, train
from test_precision import Clock  # a scripted timer for train.race

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"
CPU = torch.device("cpu")


def pool_plan(tmp_path, *more):
    """2 seeds of a pool of 2 (one packable group of 4 unilateral runs) and the hemispheres of
    condition A (two groups of 2), at batch 8."""
    cfg = C.load(SMOKE, [f"out_dir={tmp_path}", "conditions=[A]", "pool_size=2", "ensemble_sizes=[2]",
                         "baselines=[unilateral]", "batch_size=8", *more])
    return [r for r in plan.plan(cfg, [0, 1]) if r.stage in ("hemisphere", "unilateral")]


@pytest.mark.parametrize("separate_s, packed_s, packs", [(1.0, 0.5, True), (1.0, 0.95, False)])
def test_auto_packing_packs_only_where_packed_measured_faster(tmp_path, monkeypatch, separate_s,
                                                              packed_s, packs):
    """Packed 2x faster: packed; 1.05x (below PACK_MARGIN, 1.10x): separate. One timed step
    each way (the steps run; only their clock is scripted)."""
    monkeypatch.setattr(runner, "PACK_DECISIONS", {})
    todo = pool_plan(tmp_path)
    assert runner.packable_groups(todo) == [[r] for r in todo]  # auto, not measured yet: apart
    said = []
    decision = runner.decide_packing(todo, said.append, steps=1, timer=Clock(separate_s, packed_s, rounds=1))
    # the group measured: the one with the most members, the unilateral pool across 2 seeds
    assert decision["members"] == 4 and decision["group"].startswith("unilateral")
    assert decision["pack"] is packs and decision["ratio"] == pytest.approx(separate_s / packed_s)
    assert decision["separate_img_per_s"] == pytest.approx(4 * 8 / separate_s)
    assert len(said) == 1 and f"separate {4 * 8 / separate_s:,.0f} img/s" in said[0] \
        and f"packed {4 * 8 / packed_s:,.0f} img/s" in said[0] \
        and said[0].endswith("packed" if packs else "separate") and "needs 1.10x" in said[0]
    # the process's decision: pack auto now packs (or not) every group
    assert [len(g) for g in runner.packable_groups(todo)] == ([2, 2, 4] if packs else [1] * 8)
    assert runner.decide_packing(todo, said.append, timer=None) is decision and len(said) == 1
    # the bench measures without deciding for its process (cache=False)
    monkeypatch.setattr(runner, "PACK_DECISIONS", {})
    assert runner.decide_packing(todo, said.append, steps=1, timer=Clock(separate_s, packed_s, rounds=1),
                                 cache=False)["pack"] is packs
    assert runner.PACK_DECISIONS == {} and runner.packable_groups(todo) == [[r] for r in todo]
    # a sweep hands its runs the decision (pack on/off: what a worker process reads), records it
    points = [(todo[0].cfg, {})]
    monkeypatch.setattr(runner, "measure_packing", lambda group, device, steps, timer: {
        "separate": 1 / separate_s, "packed": 1 / packed_s, "batch": 8})
    decided, _ = sweep.decide(todo, points, log=said.append)
    assert {r.cfg.pack for r in decided} == {"on" if packs else "off"} and decided == todo
    assert runs.read_json(sweep.jobs_dir(todo[0].cfg) / "packing.json")["pack"] is packs
    monkeypatch.setattr(runner, "PACK_DECISIONS", {})  # a worker: nothing measured in it
    _, _, runs_of = sweep.make_jobs(decided, set())
    assert sorted(len(g) for g in runs_of.values()) == ([2, 2, 4] if packs else [1] * 8)


def test_auto_packing_measures_nothing_without_a_group_or_when_set(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "PACK_DECISIONS", {})
    boom = lambda: (_ for _ in ()).throw(AssertionError("measured"))  # noqa: E731
    assert runner.decide_packing(pool_plan(tmp_path, "pack=off"), timer=boom) is None
    assert runner.decide_packing(pool_plan(tmp_path)[:1], timer=boom) is None


# ------------------------------------------------------------------------- the estimate

def write_record(out, experiment, stage, name, seed, *, wall_s, epochs, n_train=1000, width=0.03125,
                 batch=64, cpu=None, branch_from=None, schedule="warmup_linear", precision=None, **cfg):
    folder = Path(out) / experiment / stage / name / f"seed={seed}"
    ident = {"width": width, "backbone": "resnet9", **cfg}
    if precision:
        ident["precision"] = precision
    runs.write_json(folder / "config.json", {
        "config": ident, "resolved": {**ident, "branch_from": branch_from}, "stage": stage,
        "name": name, "seed": seed, "device": "cpu", "cpu": cpu or runs.cpu_model(),
        "cpu_count": os.cpu_count(), "n_train": n_train,
        "hyper": {"batch_size": batch, "schedule": schedule, "decay_frac": 0.2, "epochs": epochs}})
    runs.write_json(folder / "metrics.json", {"wall_s": wall_s, "epochs": epochs})


def test_the_estimate_is_calibrated_from_this_machines_records(tmp_path):
    """Per run: the median seconds per epoch per training image of the finished records of its
    stage on this machine at its width, batch and precision; another machine's records, another
    width, or a bf16 record do not count."""
    out = tmp_path
    n = sweep.train_size(C.load(SMOKE))  # 324 synthetic training images
    for seed, wall in ((0, 10.0), (1, 12.0), (2, 30.0)):  # median 12 s for 2 epochs of 1000 images
        write_record(out, "old", "hemisphere", "resnet9-A-left", seed, wall_s=wall, epochs=2)
    write_record(out, "old", "hemisphere", "resnet9-A-right", 0, wall_s=99.0, epochs=2, cpu="Another CPU")
    write_record(out, "old", "hemisphere", "resnet9-A-right", 1, wall_s=99.0, epochs=2, width=0.5)
    write_record(out, "old", "hemisphere", "resnet9-A-right", 2, wall_s=99.0, epochs=2, precision="bf16")
    write_record(out, "old", "unilateral", "resnet9-m3", 0, wall_s=5.0, epochs=2)  # the pool: per backbone
    ens = out / "old" / "ensemble" / "resnet9-k2" / "seed=0"  # as evaluate_ensemble records it
    runs.write_json(ens / "config.json", {"config": {"width": 0.03125, "backbone": "resnet9"}, "stage": "ensemble",
                                          "name": "resnet9-k2", "device": "cpu", "cpu": runs.cpu_model(),
                                          "cpu_count": os.cpu_count()})
    runs.write_json(ens / "metrics.json", {"wall_s": 6.0})
    cal = sweep.calibration(out, CPU)
    assert cal[("hemisphere", "resnet9-A-left", 0.03125, 64, "fp32")] == pytest.approx([0.005, 0.006, 0.015])
    assert ("hemisphere", "resnet9-A-right", 0.03125, 64, "fp32") not in cal
    cfg = C.load(SMOKE, [f"out_dir={out}", "epochs=4", "conditions=[A]", "baselines=[unilateral, ensemble]",
                         "pool_size=2", "ensemble_sizes=[2]", "precision=fp32"])
    runs_ = plan.plan(cfg, [5])
    left = [r for r in runs_ if r.key == "hemisphere/resnet9-A-left/seed=5"]
    pool = [r for r in runs_ if r.stage in ("unilateral", "ensemble")]
    text = sweep.estimate(left + pool, cfg, device=CPU)
    expected = 0.006 * 4 * n + 2 * 0.0025 * 4 * n + 6.0  # 4 runs from the records, none measured
    assert f"about {sweep.hms(expected)} of training" in text
    assert "basis: 4 run(s) from the finished records of their stage on this machine" in text
    assert "measured now" not in text
    # a run with no record of its stage: its cost x a ResNet-9 epoch measured now, said so
    text = sweep.estimate([r for r in runs_ if r.key == "hemisphere/resnet9-A-right/seed=5"], cfg, device=CPU)
    assert "basis: 1 from their cost in ResNet-9 epochs (width-1 ratios) x one ResNet-9 epoch measured now" in text
    # bf16 runs are not costed from fp32 records
    bf16 = [dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, precision="bf16")) for r in left]
    assert "measured now" in sweep.estimate(bf16, cfg, device=CPU)


def test_the_estimate_counts_a_wsd_branch_by_its_decay_epochs(tmp_path):
    """A record of a run branched from a longer one (branch_from, wsd) trained only its decay
    epochs: 10 epochs at decay_frac 0.2 -> 2, so its 4 s are 2 s an epoch; a branched run to
    estimate counts its decay epochs only (8 epochs -> 2)."""
    out = tmp_path
    write_record(out, "b-epochs=10", "hemisphere", "resnet9-A-left", 0, wall_s=4.0, epochs=10,
                 n_train=100, branch_from=str(out / "b-epochs=20"), schedule="wsd")
    assert sweep.calibration(out, CPU)[("hemisphere", "resnet9-A-left", 0.03125, 64, "fp32")] == [0.02]
    assert sweep.trained_epochs(8, {"schedule": "wsd", "decay_frac": 0.2}, True) == 2
    assert sweep.trained_epochs(8, {"schedule": "wsd", "decay_frac": 0.2}, False) == 8
    cfg = C.load(SMOKE, [f"out_dir={out}", "epochs=8", "schedule=wsd", "stage_epochs={}",
                         "conditions=[A]", "precision=fp32"])
    (r,) = [r for r in plan.plan(cfg, [1]) if r.key == "hemisphere/resnet9-A-left/seed=1"]
    n = sweep.train_size(cfg)
    trunk_text = sweep.estimate([r], cfg, device=CPU)
    branch = dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, branch_from=str(out / "b-epochs=16")))
    branch_text = sweep.estimate([branch], cfg, device=CPU)
    assert f"about {sweep.hms(0.02 * 8 * n)} of training" in trunk_text
    assert f"about {sweep.hms(0.02 * 2 * n)} of training" in branch_text
