"""A wsd run branched from a longer run (runner.branch): when it may branch, what it records,
and the kept checkpoints it branches from surviving a kill."""
import shutil

from bilateral import plan, runner, runs, train
from bilateral import config as C

TINY = dict(experiment="b", dataset="synthetic", synthetic_size=240, width=0.03125, batch_size=64,
            progress=False, threads=1, device="cpu", conditions=["A"], baselines=[],
            schedule="wsd", side="left")


def hemisphere(tmp_path, out, **kw):
    return plan.Run("hemisphere", C.from_dict({**TINY, "out_dir": str(tmp_path / out), **kw}), 0)


def test_a_run_branches_only_from_a_source_still_in_its_constant_phase(tmp_path):
    # epochs 8: decay from epoch 6. A 7-epoch source decays from 5: its epoch 6 is mid-decay
    assert (train.decay_start(8, 0.2), train.decay_start(7, 0.2), train.decay_start(10, 0.2)) == (6, 5, 8)
    short = hemisphere(tmp_path, "short", epochs=7, keep_at=[6])
    longer = hemisphere(tmp_path, "long", epochs=10, keep_at=[6])
    for src in (short, longer):
        src.train(log=lambda m: None)
        assert train.kept_checkpoint(src.path / "checkpoint.pt", 6).is_file()
    got = {}
    for src in (short, longer):
        logs = []
        r = hemisphere(tmp_path, f"from-{src.cfg.epochs}", epochs=8,
                       branch_from=str(runs.experiment_dir(src.cfg)))
        r.train(log=logs.append)
        got[src.cfg.epochs] = (r.metrics()["branched_at"], "\n".join(logs))
    assert got[7][0] == 0 and "decays from epoch 5, before this run's 6" in got[7][1]
    assert got[10][0] == 6 and "branches from" in got[10][1]
    # the same run trained from the start records that it did
    alone = hemisphere(tmp_path, "alone", epochs=8)
    alone.train(log=lambda m: None)
    assert alone.metrics()["branched_at"] == 0


def test_a_resume_restores_the_kept_checkpoint_a_kill_lost(tmp_path):
    """A kill after epoch 2's checkpoint and before its kept copy: the resumed run writes the
    copy (a shorter budget branches from it) and ends as the uninterrupted run."""
    whole = hemisphere(tmp_path, "whole", epochs=4, keep_at=[2])
    whole.train(log=lambda m: None)
    kept = train.kept_checkpoint(whole.path / "checkpoint.pt", 2)
    killed = hemisphere(tmp_path, "killed", epochs=4, keep_at=[2])
    killed.path.mkdir(parents=True)
    shutil.copy(whole.path / "config.json", killed.path / "config.json")
    shutil.copy(kept, killed.path / "checkpoint.pt")  # the state at the kill: epoch 2 saved
    logs = []
    killed.train(log=logs.append)
    assert any("resum" in m for m in logs), logs
    again = train.kept_checkpoint(killed.path / "checkpoint.pt", 2)
    assert again.read_bytes() == kept.read_bytes()
    assert killed.metrics()["model_sha256"] == whole.metrics()["model_sha256"]
    assert runner.branched_at(killed.path) == 0


def test_only_a_run_that_can_be_a_trunk_keeps_checkpoints(tmp_path):
    """keep_at serves shorter budgets' branches; a run built on other runs never branches
    (its inputs differ between budgets), so it keeps nothing."""
    for side in ("left", "right"):
        hemisphere(tmp_path, "k", epochs=3, keep_at=[1], side=side).train(log=lambda m: None)
    bil = plan.Run("bilateral", C.from_dict({**TINY, "out_dir": str(tmp_path / "k"), "epochs": 3,
                                             "keep_at": [1]}), 0)
    bil.train(log=lambda m: None)
    assert train.kept_checkpoint(hemisphere(tmp_path, "k", epochs=3).path / "checkpoint.pt", 1).is_file()
    assert not list(bil.path.glob("checkpoint-e*.pt"))
