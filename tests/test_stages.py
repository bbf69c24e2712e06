"""Every stage end to end at tiny size on synthetic data, and the run-record guarantees."""
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bilateral import config as C
from bilateral import data, models, plan, runner, runs, train

ROOT = Path(__file__).parents[1]


def tiny(tmp, **kw):
    base = dict(experiment="t", out_dir=str(tmp), dataset="synthetic", synthetic_size=240,
                width=0.03125, epochs=1, batch_size=64, pool_size=3, ensemble_size=2, ensemble_sizes=[2, 3],
                progress=False, device="cpu", threads=1)
    return C.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Run every stage once; the tests below read the records."""
    tmp = tmp_path_factory.mktemp("study")
    cfg = tiny(tmp)
    out = {}
    for cond in "ABCD":
        c = dataclasses.replace(cfg, condition=cond)
        for side in ("left", "right"):
            out[("hemisphere", cond, side)] = plan.run_stage("hemisphere", dataclasses.replace(c, side=side), 0)
        out[("bilateral", cond)] = plan.run_stage("bilateral", c, 0)
    for side in ("left", "right"):
        out[("one_hemisphere", side)] = plan.run_stage("one_hemisphere", dataclasses.replace(cfg, side=side), 0)
    out[("one_hemisphere", "C")] = plan.run_stage(
        "one_hemisphere", dataclasses.replace(cfg, condition="C", side="left"), 0)
    out["bilateral_unspecialised"] = plan.run_stage("bilateral_unspecialised", cfg, 0)
    for m in range(cfg.pool_size):
        out[("unilateral", m)] = plan.run_stage("unilateral", dataclasses.replace(cfg, member=m), 0)
    for s in ("resnet18", "resnet34", "ensemble"):
        out[s] = plan.run_stage(s, cfg, 0)
    return cfg, out


def test_every_stage_records_a_finished_run(study):
    cfg, out = study
    exp = Path(cfg.out_dir) / "t"
    dirs = sorted(str(p.parent.relative_to(exp)) for p in exp.rglob("metrics.json"))
    assert len(dirs) == 8 + 4 + 3 + 1 + 3 + 3
    for d in dirs:
        files = {f.name for f in (exp / d).iterdir()}
        assert {"config.json", "metrics.json"} <= files and "checkpoint.pt" not in files
        if not d.startswith("ensemble"):
            assert {"history.csv", "model.pt"} <= files
    for key, m in out.items():
        heads = m["heads"]
        for h in heads:
            assert 0.0 <= m["test"][f"{h}_acc"] <= 1.0
    assert set(out[("hemisphere", "A", "left")]["test"]) == {"fine_acc", "fine_as_coarse_acc"}
    assert set(out[("hemisphere", "A", "right")]["test"]) == {"coarse_acc"}


def test_config_records_provenance_and_the_resolved_parameters(study):
    cfg, _ = study
    rec = runs.read_json(runs.run_dir(cfg, "bilateral", "resnet9-A", 0) / "config.json")
    assert rec["config"]["condition"] == "A" and rec["resolved"]["out_dir"] == cfg.out_dir
    assert rec["versions"]["torch"] and rec["device"] == "cpu"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                            capture_output=True, text=True).stdout
    assert rec["git_dirty"] is bool(status.strip())  # PROVENANCE.md: was the code committed?
    assert rec["cached_features"] is True


def test_bilateral_trains_only_its_heads_on_frozen_hemispheres(study):
    cfg, _ = study
    rec = runs.read_json(runs.run_dir(cfg, "bilateral", "resnet9-A", 0) / "config.json")
    f = models.hemisphere_backbone(cfg, "left").out_features * 2
    assert rec["trainable_params"] == f * 12 + 12 + f * 4 + 4  # synthetic: 12 fine, 4 coarse
    hier = data.load_splits(cfg)[0].hierarchy
    model = plan.load_run_model("bilateral", cfg, 0, hier)
    left = plan.load_run_model("hemisphere", dataclasses.replace(cfg, side="left"), 0, hier).backbone
    for k, v in left.state_dict().items():
        assert torch.equal(model.left.state_dict()[k], v), k


def test_the_control_trains_both_heads_on_one_frozen_hemisphere(study):
    cfg, out = study
    hier = data.load_splits(cfg)[0].hierarchy
    for side in ("left", "right"):
        c = dataclasses.replace(cfg, side=side)
        rec = runs.read_json(runs.run_dir(cfg, "one_hemisphere", f"resnet9-A-{side}", 0) / "config.json")
        f = models.hemisphere_backbone(cfg, side).out_features  # one hemisphere: half the bilateral's
        assert rec["trainable_params"] == f * 12 + 12 + f * 4 + 4 and rec["cached_features"] is True
        assert out[("one_hemisphere", side)]["heads"] == ["fine", "coarse"]
        model = plan.load_run_model("one_hemisphere", c, 0, hier)
        hemi = plan.load_run_model("hemisphere", c, 0, hier).backbone
        for k, v in hemi.state_dict().items():  # the very hemisphere the bilateral model holds
            assert torch.equal(model.backbone.state_dict()[k], v), k
    assert [r.name for r in plan.plan(cfg, [0]) if r.stage == "one_hemisphere"] == [
        f"resnet9-{k}-{s}" for k in cfg.conditions for s in ("left", "right")]


def test_pyramid_floor_keeps_channels_and_splits_only_pyramid_runs():
    narrow = models.build_backbone("resnet9_pyramid", 0.125)
    floored = models.build_backbone("resnet9_pyramid", 0.125, pyramid_floor=32)
    assert (narrow.out_features, floored.out_features) == (8, 32)
    assert models.build_backbone("resnet9", 0.125, pyramid_floor=32).out_features == 64  # not a pyramid
    base = C.from_dict(dict(width=0.125, conditions=["A", "B"]))
    wide = dataclasses.replace(base, pyramid_floor=32)
    for cond, splits in (("A", False), ("B", True), ("C", False), ("D", True)):
        for stage in ("hemisphere", "bilateral"):
            a, b = (C.identity(plan.stage_config(dataclasses.replace(c, condition=cond), stage))
                    for c in (base, wide))
            assert (a != b) == splits, (cond, stage)
    right = [C.identity(plan.stage_config(dataclasses.replace(c, condition="B", side="right"), "hemisphere"))
             for c in (base, wide)]
    assert right[0] == right[1]  # B's right hemisphere is a plain ResNet-9
    with pytest.raises(C.ConfigError, match="pyramid_floor"):
        C.from_dict(dict(pyramid_floor=-1))


def test_total_params_count_the_frozen_hemispheres_and_the_members(study):
    cfg, _ = study
    rec = lambda stage, name: runs.read_json(  # noqa: E731
        runs.run_dir(cfg, stage, name, 0) / "config.json")
    left = rec("hemisphere", "resnet9-A-left")
    backbone = models.count_total(models.hemisphere_backbone(cfg, "left"))  # A: both sides alike
    bil = rec("bilateral", "resnet9-A")
    assert left["total_params"] == left["trainable_params"] > backbone
    assert bil["total_params"] == 2 * backbone + bil["trainable_params"]  # frozen + heads
    members = rec("ensemble", "resnet9-k2")["members"]
    assert rec("ensemble", "resnet9-k2")["total_params"] == sum(
        rec("unilateral", f"resnet9-m{m}")["total_params"] for m in members)


def test_kwta_runs_record_their_test_metrics_under_every_eval_rule(study):
    _, out = study
    for side in ("left", "right"):
        c = out[("hemisphere", "C", side)]
        assert {f"test_kwta_{r}" for r in models.KWTA.EVAL_RULES} <= set(c)
        assert c["test_kwta_threshold"] == c["test"]  # the default rule is the reported one
        assert not any(k.startswith("test_kwta") for k in out[("hemisphere", "A", side)])
    assert not any(k.startswith("test_kwta") for k in out[("bilateral", "C")])
    assert not any(k.startswith("test_kwta") for k in out[("one_hemisphere", "C")])  # heads on a cache


def test_stage_budgets_and_equal_weight_decay(tmp_path):
    cfg = tiny(tmp_path, recipe="original", stage_epochs={"resnet34": 3, "hemisphere": 2})
    hp = lambda c, stage: train.hyper(plan.stage_config(c, stage), stage)  # noqa: E731
    assert [hp(cfg, s).epochs for s in ("hemisphere", "bilateral", "resnet34")] == [2, 1, 3]
    assert [hp(cfg, s).weight_decay for s in ("hemisphere", "resnet34")] == [1e-3, 1e-5]
    eq = dataclasses.replace(cfg, weight_decay_equal=True)
    assert [hp(eq, s).weight_decay for s in ("hemisphere", "resnet34")] == [1e-3, 1e-3]
    # another stage's budget, or a switch a stage does not use, does not split its runs
    other = dataclasses.replace(eq, stage_epochs={"resnet34": 9, "hemisphere": 2})
    for stage in ("hemisphere",):
        assert C.identity(plan.stage_config(other, stage)) == C.identity(plan.stage_config(cfg, stage))
    assert C.identity(plan.stage_config(other, "resnet34")) != C.identity(
        plan.stage_config(cfg, "resnet34"))


def test_condition_b_uses_the_pyramid_left(study):
    cfg, _ = study
    hier = data.load_splits(cfg)[0].hierarchy
    b = dataclasses.replace(cfg, condition="B")
    left = plan.load_run_model("hemisphere", dataclasses.replace(b, side="left"), 0, hier).backbone
    right = plan.load_run_model("hemisphere", dataclasses.replace(b, side="right"), 0, hier).backbone
    assert left.out_features < right.out_features


def test_finished_run_is_reused_and_a_different_config_refused(study, capsys):
    cfg, out = study
    c = dataclasses.replace(cfg, side="left")
    t0 = time.perf_counter()
    again = plan.run_stage("hemisphere", c, 0)
    assert again == out[("hemisphere", "A", "left")]
    assert "already finished" in capsys.readouterr().out
    assert time.perf_counter() - t0 < 2
    with pytest.raises(runs.RunConflict, match="dropout: 0.6 -> 0.5"):
        plan.run_stage("hemisphere", dataclasses.replace(c, dropout=0.5), 0)


def test_parameters_a_stage_does_not_use_do_not_split_its_runs(study):
    cfg, out = study
    # unilateral ignores condition and side; a hemisphere under A ignores k
    m = plan.run_stage("unilateral", dataclasses.replace(cfg, condition="C", side="right"), 0)
    assert m == out[("unilateral", 0)]
    m = plan.run_stage("hemisphere", dataclasses.replace(cfg, kwta_k=0.5), 0)
    assert m == out[("hemisphere", "A", "left")]


def test_ensemble_chooses_members_by_validation_never_test(study):
    cfg, out = study
    ranked = sorted(range(3), key=lambda i: -train.score(out[("unilateral", i)]["val"], ("fine", "coarse")))
    assert out["ensemble"]["members"] == sorted(ranked[:2])
    # rank by a forged validation record: the choice must follow it
    for i in range(3):
        p = runs.run_dir(dataclasses.replace(cfg, member=i), "unilateral", f"resnet9-m{i}", 0) / "metrics.json"
        m = runs.read_json(p)
        m["val"] = {"fine_acc": i / 10, "coarse_acc": i / 10}
        m["test"] = {"fine_acc": 1 - i / 10, "coarse_acc": 1 - i / 10}
        runs.write_json(p, m)
    e = plan.run_stage("ensemble", dataclasses.replace(cfg, experiment="t", ensemble_size=2), 0, force=True)
    assert e["members"] == [1, 2]


def test_missing_hemisphere_names_the_run_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        plan.run_stage("bilateral", tiny(tmp_path, condition="C"), 3)
    msg = str(e.value)
    assert "hemisphere/resnet9-C-left/seed=3" in msg
    assert "python -m bilateral train hemisphere" in msg and "condition=C" in msg and "--seed 3" in msg


def test_missing_pool_members_are_listed(tmp_path):
    with pytest.raises(FileNotFoundError, match="3 more unilateral runs"):
        plan.run_stage("ensemble", tiny(tmp_path), 0)


def test_cached_features_give_the_same_head_gradients_as_recomputing(study):
    cfg, _ = study
    hier = data.load_splits(cfg)[0].hierarchy
    model = plan.build_model("bilateral", cfg, hier, 0)
    _, val_dl, _, _ = runner.loaders(cfg, "cpu", 64, 0, augment=False)
    hp = train.hyper(cfg, "bilateral")
    live = runner.bilateral_forward(model, val_dl, val_dl, val_dl, False, hp, 0, "cpu", False)[0]
    cached, _, cached_val, _ = runner.bilateral_forward(model, val_dl, val_dl, val_dl, True, hp, 0, "cpu", False)
    grads = []
    for fwd, batch in ((live, next(iter(val_dl))), (cached, next(iter(cached_val)))):
        model.train()
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        train.loss_fn(fwd(batch["x"]), batch, ("fine", "coarse")).backward()
        grads.append([p.grad.clone() for p in model.heads.parameters()])
        assert all(p.grad is None for p in model.left.parameters())
        assert not model.left.training
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][0].abs().sum() > 0


def _cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "bilateral", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_mid_epoch_resumes_to_identical_metrics(tmp_path):
    args = ["train", "hemisphere", "--params", "params/smoke.yaml", "--seed", "0",
            "--set", "epochs=4", "--set", "synthetic_size=1200", "--set", "threads=1",
            "--set", "device=cpu", "--set", "batch_size=32"]
    ref = _cli(args + ["--set", f"out_dir={tmp_path / 'ref'}"])
    assert ref.wait(300) == 0, ref.stdout.read()
    run = tmp_path / "cut" / "smoke" / "hemisphere" / "resnet9-A-left" / "seed=0"
    p = _cli(args + ["--set", f"out_dir={tmp_path / 'cut'}"])
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists():  # epoch 1 finished: now inside epoch 2
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    assert p.wait(60) == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    again = _cli(args + ["--set", f"out_dir={tmp_path / 'cut'}"])
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log
    assert "resuming from epoch" in log
    a = runs.read_json(run / "metrics.json")
    b = runs.read_json(tmp_path / "ref" / "smoke" / "hemisphere" / "resnet9-A-left" / "seed=0" / "metrics.json")
    assert a["test"] == b["test"] and a["val_all"] == b["val_all"]
    sa = runs.load_torch(run / "model.pt")
    sb = runs.load_torch(tmp_path / "ref" / "smoke" / "hemisphere" / "resnet9-A-left" / "seed=0" / "model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.mark.parametrize("args, words", [
    (["train", "hemisphere", "--params", "params/smoke.yaml", "--set", "condition=Z"], ["condition", "'Z'", "A, B, C, D"]),
    (["train", "hemispheres", "--params", "params/smoke.yaml"], ["unknown stage", "hemisphere, bilateral"]),
    (["train", "unilateral", "--params", "params/smoke.yaml", "--set", "bakbone=vgg11"], ["bakbone", "allowed"]),
    (["train", "unilateral", "--params", "params/smoke.yaml", "--set", "dataset=cifar100", "--set", "data_dir=/nonexistent"],
     ["/nonexistent", "python -m bilateral download cifar100"]),
])
def test_cli_stops_before_any_work_with_a_message(tmp_path, args, words):
    p = _cli(args + ["--set", f"out_dir={tmp_path}"])
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2, out
    for w in words:
        assert w in out
    assert "Traceback" not in out
    assert not any(tmp_path.rglob("metrics.json"))


def test_help_lists_the_stages():
    p = _cli(["--help"])
    out = p.communicate(timeout=60)[0]
    for s in tuple(plan.STAGES):
        assert s in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_keeps_a_freed_tensor_in_the_process():
    """What makes CPU steps faster (no page faults for each step's fresh activations) is that
    freed memory stays in the process: without the switch a freed 200 MB tensor goes back to
    the OS, with it the process keeps it for the next step."""
    code = ("import sys, torch; from bilateral import train\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "if sys.argv[1] == 'on': train.keep_freed_memory()\n"
            "base = rss(); x = torch.ones(50_000_000); del x\n"
            "print(rss() - base)")
    kept = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                                     text=True, check=True).stdout) for mode in ("off", "on")}
    assert kept["off"] < 50e6 and kept["on"] > 150e6, kept


@pytest.mark.parametrize("flag, device, width, expected", [
    (True, "cpu", 1 / 32, False),   # NHWC costs more than it saves this narrow (bench section 7)
    (True, "cpu", 1 / 16, True),
    (True, "cpu", 1 / 8, True),
    (True, "cuda", 1 / 32, True),   # CUDA at every width
    (False, "cpu", 1 / 8, False),   # the parameter turns it off everywhere
    (False, "cuda", 1.0, False),
    (True, "meta", 1.0, False),
])
def test_channels_last_where_it_pays(flag, device, width, expected):
    cfg = C.from_dict(dict(channels_last=flag, width=width))
    assert train.use_channels_last(cfg, device) is expected


def test_a_study_with_a_budget_per_stage_trains_every_run_on_the_planned_upstream(tmp_path):
    """Per-stage budgets (a preset's stage_epochs): a bilateral model, a control or an ensemble
    rebuilds its upstream runs from its own config, so it must see their budgets too, or it
    finds the planned hemispheres 'stale' (a different number of epochs) and stops."""
    cfg = tiny(tmp_path, conditions=["A"], baselines=["one_hemisphere", "unilateral", "ensemble"],
               pool_size=2, ensemble_sizes=[2], callosum_kinds=[],
               stage_epochs={"hemisphere": 2, "bilateral": 1, "unilateral": 2, "one_hemisphere": 1})
    runs_ = plan.plan(cfg, [0])
    planned = {r.key: C.identity(r.cfg) for r in runs_}
    for r in runs_:
        for u in r.upstream():
            assert C.identity(u.cfg) == planned[u.key], (r.key, u.key)
    for r in runs_:
        r.train(log=lambda m: None)
    assert all(r.status() == "finished" for r in runs_)
    epochs = {r.stage: r.epochs() for r in runs_}
    assert epochs["hemisphere"] == 2 and epochs["unilateral"] == 2 and epochs["bilateral"] == 1
    hemi = next(r for r in runs_ if r.stage == "hemisphere")
    assert len(hemi.history()) == 2  # trained at its own budget, not cfg.epochs
