"""`precision: auto | fp32 | bf16` (issue 21): auto chooses by a measurement (the timer stubbed,
so that each branch is taken without timing anything), a bf16 step is an fp32 step up to
bf16's rounding, and a run's record holds its resolved precision, so a bf16 run never reuses
or resumes a float32 record while a float32 run still matches the records written before."""
import dataclasses
from pathlib import Path

import pytest
import torch

from bilateral import config as C
from bilateral import models, plan, runner, runs, train

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"


class Clock:
    """A timer whose readings make each way of train.race take the seconds given, in every
    round (race reads it before and after each timed call, ways in order, round after round);
    it runs out after `rounds` rounds, so a second measurement would raise StopIteration."""

    def __init__(self, *seconds, rounds=train.PRECISION_STEPS):
        t, self.readings = 0.0, []
        for _ in range(rounds):
            for s in seconds:
                self.readings += [t, t + s]
                t += 10.0
        self.readings = iter(self.readings)

    def __call__(self):
        return next(self.readings)


@pytest.fixture
def measuring(monkeypatch):
    """A CPU that has bf16 units, and no decision cached: auto measures."""
    monkeypatch.setattr(train, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(train, "PRECISION_DECISIONS", {})


def hemisphere_run(tmp_path, *more):
    cfg = C.load(SMOKE, [f"out_dir={tmp_path}", "synthetic_size=240", "epochs=1", "batch_size=16",
                         "conditions=[A]", *more])
    return plan.Run("hemisphere", dataclasses.replace(cfg, condition="A", side="left"), 0)


@pytest.mark.parametrize("fp32_s, bf16_s, choice", [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32")])
def test_auto_precision_on_a_cpu_chooses_by_the_measurement(tmp_path, measuring, monkeypatch, fp32_s,
                                                            bf16_s, choice):
    """bf16 only when it measured at least BF16_MARGIN (1.10x) faster: 2x -> bf16; 1.05x (within
    the margin) -> fp32. Both figures are printed once; the decision is cached per architecture
    (a second run of it does not measure), another architecture measures anew. One timed step
    each way (the steps run; only their clock is scripted)."""
    monkeypatch.setattr(train, "PRECISION_STEPS", 1)
    said = []
    run = hemisphere_run(tmp_path)
    clock = Clock(fp32_s, bf16_s, rounds=1)
    key = runner.precision_key(run, "cpu")
    got = train.resolve_precision("auto", "cpu", key, lambda: runner.precision_probe(run, "cpu"),
                                  log=said.append, timer=clock)
    assert got == choice
    assert len(said) == 1 and f"float32 {key[4] / fp32_s:,.0f} img/s" in said[0] \
        and f"bf16 {key[4] / bf16_s:,.0f} img/s" in said[0] and said[0].endswith(choice)
    # cached: the clock is spent, so a second measurement would raise StopIteration
    assert runner.precision(dataclasses.replace(run, seed=1), "cpu", log=said.append) == choice
    assert len(said) == 1
    # the identity a record holds is the resolved value
    assert runner.identity(run)["precision"] == choice
    # another architecture (the k-WTA hemisphere) is measured anew
    other = hemisphere_run(tmp_path, "conditions=[C]")
    other = dataclasses.replace(other, cfg=dataclasses.replace(other.cfg, condition="C"))
    assert runner.precision_key(other, "cpu") != key
    assert train.resolve_precision("auto", "cpu", runner.precision_key(other, "cpu"),
                                   lambda: runner.precision_probe(other, "cpu"), log=said.append,
                                   timer=Clock(1.0, 0.2, rounds=1)) == "bf16"
    assert len(said) == 2


def test_auto_precision_measures_nothing_where_it_cannot_choose_bf16(tmp_path, monkeypatch):
    """A CPU without bf16 instructions, a run with no backbone of its own (the bilateral heads),
    an explicit value: no measurement (a timer that raises is never called)."""
    monkeypatch.setattr(train, "PRECISION_DECISIONS", {})

    def no_timer():
        raise AssertionError("measured")
    run = hemisphere_run(tmp_path)
    probe = lambda: runner.precision_probe(run, "cpu")  # noqa: E731
    key = runner.precision_key(run, "cpu")
    monkeypatch.setattr(train, "cpu_bf16_units", lambda: False)
    assert train.resolve_precision("auto", "cpu", key, probe, log=lambda m: None, timer=no_timer) == "fp32"
    monkeypatch.setattr(train, "cpu_bf16_units", lambda: True)
    assert train.resolve_precision("fp32", "cpu", key, probe, timer=no_timer) == "fp32"
    assert train.resolve_precision("bf16", "cpu", key, probe, timer=no_timer) == "bf16"
    bil = plan.Run("bilateral", dataclasses.replace(run.cfg, condition="A"), 0)
    assert runner.precision_key(bil, "cpu") is None
    assert train.resolve_precision("auto", "cpu", None, None, timer=no_timer) == "fp32"


def _step(model, batch, precision, heads):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx, _ = train.autocast("cpu", precision)
    scaler = train.grad_scaler("cpu", precision)
    losses = train.train_step(model, batch, opt, scaler, ctx, heads=heads, label_smoothing=0.1, lr=0.1)
    return losses


@pytest.mark.parametrize("condition, min_cos, max_rel", [("A", 0.98, 0.25), ("C", 0.85, 0.6)])
def test_one_bf16_step_matches_a_float32_step(condition, min_cos, max_rel):
    """One training step (forward, backward, SGD) of a left hemisphere (ResNet-9 at width 1/16;
    C: with k-WTA) from the same weights on the same batch, bf16 autocast against float32.

    Tolerances: the loss within 1% (relative; measured 0.01-0.14% over 3 seeds); the weight
    update (new - old, all parameters) with cosine similarity >= min_cos to float32's and a
    relative L2 difference <= max_rel (measured: A cos 0.990-0.994, rel 0.11-0.15; C with
    k-WTA cos 0.91-0.98, rel 0.22-0.42: rounding to bf16's 8-bit mantissa moves activations
    across the winners' threshold); BatchNorm's statistics and k-WTA's thresholds within 10% of
    their largest value (measured <= 4%). What must stay float32 does: loss, weights, BN
    statistics, k-WTA thresholds."""
    cfg = C.Config(dataset="synthetic", width=0.0625, condition=condition, side="left", dropout=0.0)
    torch.manual_seed(0)
    m32 = models.Unilateral(models.hemisphere_backbone(cfg, "left"), 10, 2, heads=("fine",), dropout=0.0)
    m16 = models.Unilateral(models.hemisphere_backbone(cfg, "left"), 10, 2, heads=("fine",), dropout=0.0)
    m16.load_state_dict(m32.state_dict())
    batch = {"x": torch.randn(32, 3, 32, 32), "fine": torch.randint(0, 10, (32,)),
             "coarse": torch.randint(0, 2, (32,))}
    before = {k: v.clone() for k, v in m32.state_dict().items()}
    loss32 = _step(m32, batch, "fp32", ("fine",))
    loss16 = _step(m16, batch, "bf16", ("fine",))
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) / loss32.item() < 0.01
    s32, s16 = m32.state_dict(), m16.state_dict()
    assert all(v.dtype == s32[k].dtype for k, v in s16.items())  # all float32 (and the counters)
    params = [k for k, _ in m32.named_parameters()]
    d32 = torch.cat([(s32[k] - before[k]).flatten() for k in params])
    d16 = torch.cat([(s16[k] - before[k]).flatten() for k in params])
    assert not torch.equal(d16, d32)  # bf16 did run: it rounds differently
    assert torch.nn.functional.cosine_similarity(d16, d32, 0) >= min_cos
    assert (d16 - d32).norm() / d32.norm() <= max_rel
    stats = [k for k in s32 if k.endswith(("running_mean", "running_var", "running_threshold"))]
    assert stats and all((s16[k] - s32[k]).abs().max() <= 0.1 * s32[k].abs().max() for k in stats)
    if condition == "C":
        assert any(k.endswith("running_threshold") and torch.isfinite(s16[k]).all() for k in stats)


def test_a_bf16_run_never_reuses_or_resumes_a_float32_record(tmp_path):
    """A float32 run trained and recorded (1 epoch, tiny); then: precision fp32 (and auto, which
    is fp32 on this CPU or any CPU that measures no gain) finds it finished; bf16 is stale and
    training it refuses (neither reused nor resumed); a record as written before `precision`
    existed (no key, amp: true) is still the float32 run's."""
    run = hemisphere_run(tmp_path, "precision=fp32")
    runner.train_runs([run], log=lambda m: None)
    rec = runs.read_json(run.path / "config.json")
    assert rec["config"]["precision"] == "fp32" and rec["resolved"]["precision"] == "fp32"

    def as_(p):
        return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, precision=p))
    assert as_("fp32").status() == "finished"
    bf16 = as_("bf16")
    assert bf16.status() == "stale" and "precision: 'fp32' -> 'bf16'" in bf16.stale_reasons()[0]
    with pytest.raises(runs.RunConflict, match="precision"):
        runner.train_runs([bf16], log=lambda m: None)
    assert runs.read_json(run.path / "config.json") == rec  # untouched
    # in progress (a checkpoint, no metrics): bf16 does not resume it either
    (run.path / "metrics.json").rename(run.path / "metrics.json.bak")
    assert bf16.status() == "stale"
    with pytest.raises(runs.RunConflict, match="precision"):
        runner.train_runs([bf16], log=lambda m: None)
    (run.path / "metrics.json.bak").rename(run.path / "metrics.json")
    # the record of the current code (results/, outputs/): no precision key, amp true
    old = dict(rec, config={**{k: v for k, v in rec["config"].items() if k != "precision"}, "amp": True})
    runs.write_json(run.path / "config.json", old)
    assert as_("fp32").status() == "finished" and as_("bf16").status() == "stale"
    metrics = runner.train_runs([as_("fp32")], log=lambda m: None)[0]
    assert metrics == runs.read_json(run.path / "metrics.json")  # reused, not retrained


def test_autocast_keeps_today_amp_meaning_for_true():
    """True / "auto" (callers that pass cfg.amp) is float32 on a CPU; fp16 is CUDA only."""
    assert train.autocast("cpu", True)[1] is None and train.autocast("cpu", "auto")[1] is None
    assert train.autocast("cpu", "bf16")[1] == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        train.autocast("cpu", "fp16")
    assert not train.grad_scaler("cpu", "bf16").is_enabled()


def test_the_precision_probe_draws_nothing_from_the_runs_random_stream(tmp_path):
    """The probe is built while a run is prepared, after its seed: drawing from the global
    stream there would change the run's initialisation on CPUs that probe (bf16 units)."""
    run = plan.Run("hemisphere", C.load(SMOKE, [f"out_dir={tmp_path}", "side=left"]), 0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model, batch, heads = runner.precision_probe(run, "cpu")
    assert torch.equal(torch.get_rng_state(), before)
    assert batch["x"].shape[1:] == (3, 32, 32) and heads == run.heads
