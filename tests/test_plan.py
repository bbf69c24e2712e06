"""The study as a plan of runs: the plan of every preset, upstream provenance (stale runs),
the stage registry, the seeds parser and `python -m bilateral plan`."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from bilateral import config as C
from bilateral import data, pipeline, plan, results, runs

ROOT = Path(__file__).parents[1]

# (preset, runs per seed, backbone, conditions, pool size, baselines)
PRESETS = [
    ("smoke", 30, "resnet9", "ABCD", 5, C.BASELINES),
    ("fashion_mnist", 30, "resnet9", "ABCD", 5, C.BASELINES),
    ("quick", 30, "resnet9", "ABCD", 5, C.BASELINES),
    ("paper_resnet9", 35, "resnet9", "ABCD", 10, C.BASELINES),
    ("paper_vgg11", 16, "vgg11", "A", 10, ("bilateral_unspecialised", "unilateral", "ensemble")),
]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bilateral", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("preset, per_seed, bb, conds, pool, baselines", PRESETS)
def test_the_plan_of_each_preset(preset, per_seed, bb, conds, pool, baselines):
    cfg = C.load(ROOT / "params" / f"{preset}.yaml")
    runs_ = plan.plan(cfg, [0, 1])
    assert len(runs_) == len(set(runs_)) == 2 * per_seed
    keys = [r.key for r in runs_]
    assert len(set(keys)) == len(keys)
    want = ([f"hemisphere/{bb}-{c}-{s}" for c in conds for s in ("left", "right")]
            + [f"bilateral/{bb}-{c}" for c in conds]
            + [f"one_hemisphere/{bb}-{c}-{s}" for c in conds for s in ("left", "right")
               if "one_hemisphere" in baselines]
            + [f"bilateral_unspecialised/{bb}-A"] * ("bilateral_unspecialised" in baselines)
            + [f"unilateral/{bb}-m{m}" for m in range(pool)]
            + ["resnet18/resnet18"] * ("resnet18" in baselines)
            + ["resnet34/resnet34"] * ("resnet34" in baselines)
            + [f"ensemble/{bb}-k{k}" for k in cfg.ensemble_sizes])
    for seed in (0, 1):
        assert sorted(k for k in keys if k.endswith(f"seed={seed}")) == sorted(
            f"{w}/seed={seed}" for w in want)
    pos = {r: i for i, r in enumerate(runs_)}
    by_key = {r.key: r for r in runs_}
    for r in runs_:
        for u in r.upstream():
            assert pos[u] < pos[r], (u.key, r.key)  # reachable, and before its dependant
            assert u.seed == r.seed
    for seed in (0, 1):
        for c in conds:
            b = by_key[f"bilateral/{bb}-{c}/seed={seed}"]
            assert [u.key for u in b.upstream()] == [
                f"hemisphere/{bb}-{c}-{s}/seed={seed}" for s in ("left", "right")]
        for k in cfg.ensemble_sizes:
            e = by_key[f"ensemble/{bb}-k{k}/seed={seed}"]
            assert sorted(u.key for u in e.upstream()) == sorted(
                f"unilateral/{bb}-m{m}/seed={seed}" for m in range(pool))


def test_runs_keep_only_the_fields_their_stage_uses():
    cfg = C.load(ROOT / "params" / "paper_resnet9.yaml")
    a = plan.Run("unilateral", dataclasses.replace(cfg, condition="C", side="right", kwta_k=0.5), 0)
    assert a == plan.Run("unilateral", cfg, 0) and a.cfg.condition == "A"
    assert plan.Run("hemisphere", dataclasses.replace(cfg, kwta_k=0.5), 0).cfg.kwta_k == 0.9  # A: no k-WTA
    assert plan.Run("hemisphere", dataclasses.replace(cfg, condition="C", kwta_k=0.5), 0).cfg.kwta_k == 0.5
    r = plan.Run("hemisphere", dataclasses.replace(cfg, condition="B", side="left"), 3)
    assert (r.key, r.label, r.heads) == ("hemisphere/resnet9-B-left/seed=3", "B left", ("fine",))
    assert r.path == Path("outputs/paper_resnet9/hemisphere/resnet9-B-left/seed=3")
    assert pickle.loads(pickle.dumps(r)) == r  # a run travels to worker processes


def test_costs_follow_the_measured_relative_costs():
    cfg = C.load(ROOT / "params" / "paper_resnet9.yaml")  # 180 epochs, head augmentation on
    cost = {r.key.rsplit("/", 1)[0]: r.cost() for r in plan.plan(cfg, [0])}
    assert cost["hemisphere/resnet9-A-left"] == pytest.approx(180)
    assert cost["hemisphere/resnet9-D-left"] == pytest.approx(6.2 * 180)
    assert cost["hemisphere/resnet9-D-right"] == pytest.approx(1.6 * 180)
    assert cost["bilateral_unspecialised/resnet9-A"] == pytest.approx(2 * 180)
    assert cost["resnet34/resnet34"] == pytest.approx(2.9 * 180)
    assert cost["ensemble/resnet9-k5"] == 0
    # the heads recompute the frozen hemispheres (forward only) every epoch ...
    assert cost["bilateral/resnet9-B"] == pytest.approx((4.2 + 1) / 3 * 180)
    # ... unless their features can be cached
    cached = plan.Run("bilateral", dataclasses.replace(cfg, head_augment=False, condition="B"), 0)
    assert cached.cost() == pytest.approx(0.02 * 180 + (4.2 + 1) / 3)


def test_phases_and_the_notebook_wrappers():
    cfg = C.load(ROOT / "params" / "smoke.yaml")
    labels = [label for label, _, _ in pipeline.runs_of(cfg, "02_hemispheres")]
    assert labels == [f"{c} {s}" for c in "ABCD" for s in ("left", "right")]
    assert [r.label for r in plan.phase_runs(cfg, "bilateral", 0)] == (
        [f"{c} bilateral" for c in "ABCD"] + [f"{c} heads on {s} only" for c in "ABCD" for s in ("left", "right")])
    no_control = dataclasses.replace(cfg, baselines=["unilateral"])  # the control is opt-out
    assert [r.label for r in plan.phase_runs(no_control, "bilateral", 0)] == [f"{c} bilateral" for c in "ABCD"]
    base = [r.label for r in plan.phase_runs(cfg, "04_baselines.ipynb", 2)]
    assert base == (["bilateral, no specialisation"] + [f"unilateral m{m}" for m in range(5)]
                    + ["ResNet-18", "ResNet-34", "ensemble k=2", "ensemble k=5"])
    # the ensemble's pool is planned even when the unilateral baseline is not asked for
    only = dataclasses.replace(cfg, baselines=["ensemble"])
    assert [r.stage for r in plan.phase_runs(only, "baselines", 0)] == ["unilateral"] * 5 + ["ensemble"] * 2
    with pytest.raises(C.ConfigError, match="hemispheres, bilateral, baselines"):
        plan.phase_runs(cfg, "05_analysis", 0)


@pytest.mark.parametrize("items, seeds", [
    (["0-4"], [0, 1, 2, 3, 4]), (["0", "1", "2"], [0, 1, 2]), (["0,2"], [0, 2]),
    (["3", "1-2", "3"], [3, 1, 2]), ("7", [7]), ([0, 1], [0, 1]),
])
def test_seeds_parser(items, seeds):
    assert plan.parse_seeds(items) == seeds


@pytest.mark.parametrize("items", [["a"], ["3-1"], ["-1"], ["0-"], [""], ["1.5"]])
def test_seeds_parser_rejects_bad_input(items):
    with pytest.raises(C.ConfigError, match="--seeds"):
        plan.parse_seeds(items)


def test_a_registered_stage_joins_the_study():
    probe = plan.Stage(
        "probe", "bilateral", "probe", "a linear probe on a frozen left hemisphere",
        uses=("condition", "backbone", "augment"),
        run_name=lambda c: f"{c.backbone}-{c.condition}", label=lambda c: f"{c.condition} probe",
        variants=lambda c: [dict(condition=k) for k in c.conditions], epoch_cost=lambda c: 0.5,
        build=lambda c, hier, seed: None, upstream=lambda c: [("hemisphere", dict(side="left"))],
        owns=("label_smoothing",))  # a field only it uses (a real stage adds its own)
    plan.register(probe)
    try:
        assert "probe" in tuple(plan.STAGES)
        cfg = C.load(ROOT / "params" / "smoke.yaml", ["label_smoothing=0.2"])
        assert plan.Run("probe", cfg, 0).cfg.label_smoothing == 0.2
        assert plan.Run("hemisphere", cfg, 0).cfg.label_smoothing is None  # reset for the others
        cfg = C.load(ROOT / "params" / "smoke.yaml")
        got = {r.key: r for r in plan.plan(cfg, [0])}
        assert len(got) == 30 + 4
        probe_c = got["probe/resnet9-C/seed=0"]
        assert [u.key for u in probe_c.upstream()] == ["hemisphere/resnet9-C-left/seed=0"]
        assert probe_c.cost() == pytest.approx(0.5 * 2)
    finally:
        del plan.STAGES["probe"]
    assert "probe" not in tuple(plan.STAGES)
    with pytest.raises(C.ConfigError, match="unknown stage 'probe'"):
        plan.spec("probe")
    with pytest.raises(ValueError, match="lr_typo"):
        plan.register(dataclasses.replace(probe, owns=("lr_typo",)))
    assert "probe" not in plan.STAGES


# ------------------------------------------------------------------ provenance and stale runs

SMALL = ["epochs=1", "synthetic_size=240", "device=cpu", "conditions=[A]"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A hemisphere pair and its bilateral run of condition A (smoke preset, 1 epoch)."""
    tmp = tmp_path_factory.mktemp("plan")
    sets = [f"out_dir={tmp}", *SMALL]
    cfg = C.load(ROOT / "params" / "smoke.yaml", sets)
    for side in ("left", "right"):
        plan.Run("hemisphere", dataclasses.replace(cfg, side=side), 0).train()
    bil = plan.Run("bilateral", cfg, 0)
    bil.train()
    return cfg, sets, bil


def test_a_retrained_hemisphere_makes_its_bilateral_run_stale(pair, capsys):
    cfg, sets, bil = pair
    left, right = bil.upstream()
    assert [left.status(), right.status(), bil.status()] == ["finished"] * 3
    rec = bil.record()["upstream"]
    assert rec == {u.key: runs.file_hash(u.path / "model.pt") for u in (left, right)}
    assert len(rec[left.key]) == 64 and rec[left.key] != rec[right.key]
    assert bil.metrics()["test"] and not bil.history().empty
    hier = data.load_splits(cfg)[0].hierarchy
    model = bil.load_model(hier)

    # retrained on a CPU, a run comes out bit for bit the same: its dependants stay current
    left.train(force=True)
    assert left.status() == "finished" and bil.status() == "finished"
    # retrained where it comes out different (a GPU's nondeterministic kernels, or another
    # code version): here the weights of a hemisphere trained for 2 epochs instead of 1
    other = plan.Run("hemisphere", dataclasses.replace(left.cfg, epochs=2, out_dir=f"{cfg.out_dir}-2"), 0)
    other.train()
    runs.save_torch(left.path / "model.pt", runs.load_torch(other.path / "model.pt"))
    assert left.status() == "in_progress"  # a model.pt its seal does not name: not finished
    runs.finish(left.path, left.metrics())  # sealed again, as a real retraining ends
    assert left.status() == "finished"
    assert bil.status() == "stale" and bil.changed_upstream() == [left.key]
    with pytest.raises(runs.RunConflict, match="hemisphere/resnet9-A-left/seed=0"):
        bil.train()
    with pytest.raises(runs.RunConflict, match="stale"):
        bil.load_model(hier)
    assert "A bilateral" not in pipeline.read_runs(cfg, "03_bilateral", 0)
    exp = Path(cfg.out_dir) / cfg.experiment
    assert set(results.collect(exp).stage) == {"hemisphere"}  # the report leaves it out
    assert "left out bilateral/resnet9-A/seed=0: stale" in capsys.readouterr().out

    # the CLI: exit code 3 and the stale run named, before any work
    p = cli("train", "bilateral", "--params", "params/smoke.yaml", *(x for s in sets for x in ("--set", s)))
    assert p.returncode == 3, p.stdout + p.stderr
    assert "hemisphere/resnet9-A-left/seed=0" in p.stderr and "--force" in p.stderr
    assert "Traceback" not in p.stderr

    # the plan shows it stale, says why, and counts it (and nothing finished) as still to train
    p = cli("plan", "params/smoke.yaml", "--seeds", "0", *(x for s in sets for x in ("--set", s)))
    assert p.returncode == 0, p.stderr
    for r in plan.plan(cfg, [0]):
        assert r.key in p.stdout
    line = next(x for x in p.stdout.splitlines() if "bilateral/resnet9-A/seed=0" in x and "stale" in x)
    assert line.split()[2] == "stale"
    assert (f"bilateral/resnet9-A/seed=0: upstream retrained or removed since it was built: "
            f"{left.key}") in p.stdout
    assert "15 runs: 2 finished, 0 in progress, 1 stale, 12 missing" in p.stdout
    assert plan.pending(plan.plan(cfg, [0])) == [r for r in plan.plan(cfg, [0]) if r not in (left, right)]
    t = plan.totals(plan.plan(cfg, [0]))
    got = tuple(t[k] for k in ("runs", "finished", "stale", "missing", "todo", "epochs"))
    assert got == (15, 2, 1, 12, 13, None)  # None: smoke.yaml gives resnet34 its own budget
    assert t["todo_cost"] == pytest.approx(t["cost"] - left.cost() - right.cost())

    bil.train(force=True)
    assert bil.status() == "finished"
    assert bil.record()["upstream"][left.key] == runs.file_hash(left.path / "model.pt")
    new = bil.load_model(hier)
    assert set(results.collect(exp).stage) == {"hemisphere", "bilateral"}
    assert not all((a == b).all() for a, b in zip(model.left.state_dict().values(),
                                                   new.left.state_dict().values()))


def test_a_record_without_provenance_is_judged_by_time(pair):
    cfg, _, bil = pair
    rec = bil.record()
    f = bil.path / "config.json"
    legacy = {k: v for k, v in rec.items() if k != "upstream"}
    f.write_text(json.dumps(legacy))
    try:
        t = f.stat().st_mtime
        left = bil.upstream()[0].path / "model.pt"
        os.utime(left, (t - 60, t - 60))
        assert bil.status() == "finished"
        os.utime(left, (t + 60, t + 60))  # the hemisphere was written after the bilateral run
        assert bil.status() == "stale"
    finally:
        runs.write_json(f, rec)


def test_a_different_config_in_the_folder_is_stale(pair):
    cfg, _, bil = pair
    other = plan.Run("bilateral", dataclasses.replace(cfg, dropout=0.5), 0)
    assert other.path == bil.path and other.status() == "stale"
    assert "dropout: 0.6 -> 0.5" in other.stale_reasons()[0]


def test_the_plan_cli_prints_every_run_and_the_totals(tmp_path):
    p = cli("plan", "params/paper_resnet9.yaml", "--seeds", "0-1,3", "--set", f"out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    cfg = C.load(ROOT / "params" / "paper_resnet9.yaml", [f"out_dir={tmp_path}"])
    runs_ = plan.plan(cfg, [0, 1, 3])
    assert len(runs_) == 105
    for r in runs_:
        assert r.key in p.stdout
    total = sum(r.cost() for r in runs_)
    assert f"105 runs: 0 finished, 0 in progress, 0 stale, 105 missing" in p.stdout
    assert f"{total:,.1f} in all" in p.stdout
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # trains (and writes) nothing
    bad = cli("plan", "params/smoke.yaml", "--seeds", "2-1")
    assert bad.returncode == 2 and "--seeds" in bad.stderr and "Traceback" not in bad.stderr


def test_run_takes_seeds_through_the_same_parser(tmp_path):
    calls = []
    code, _ = pipeline.run(ROOT / "params" / "smoke.yaml", seeds=["0-1,3"], only=["01"],
                           overrides=[f"out_dir={tmp_path}"], log=lambda m: None,
                           execute=lambda src, out, params, cwd: calls.append(params["seed"]))
    assert code == 0 and calls == [0, 1, 3]
    with pytest.raises(C.ConfigError, match="--seeds"):
        pipeline.run(ROOT / "params" / "smoke.yaml", seeds=["1-0"], execute=lambda *a: None)


def test_a_run_of_a_plugin_stage_unpickles_in_a_fresh_process(tmp_path):
    (tmp_path / "myplugin.py").write_text(
        "from bilateral import plan\n"
        "plan.register(plan.Stage('probe2', 'baselines', 'probe', 'a probe', uses=('backbone',),\n"
        "    run_name=lambda c: c.backbone, label=lambda c: 'probe', variants=lambda c: [{}],\n"
        "    epoch_cost=lambda c: 0.1))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    run = lambda code: subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    p = run("import pickle, myplugin; from bilateral import plan, config as C\n"
            "open('run.pkl', 'wb').write(pickle.dumps(plan.Run('probe2', C.Config(), 4)))")
    assert p.returncode == 0, p.stderr
    q = run("import pickle; from bilateral import plan\n"
            "r = pickle.loads(open('run.pkl', 'rb').read()); print(r.key, 'probe2' in plan.STAGES)")
    assert q.returncode == 0, q.stderr
    assert q.stdout.split() == ["probe2/resnet9/seed=4", "True"]
