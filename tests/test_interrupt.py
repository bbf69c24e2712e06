"""Interrupted at any moment, the same result (issue 23): real processes killed at exact points,
records sealed whole, executors that survive their workers, bounded inputs, one-line errors.

Each test names the lettered case of the issue it covers."""
import csv
import dataclasses
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bilateral import config as C
from bilateral import plan, runs, sweep
from bilateral.execute import Job, local

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(experiment="i", dataset="synthetic", synthetic_size=240, width=0.03125, epochs=2,
            batch_size=64, progress=False, threads=1, device="cpu", conditions=["A"],
            baselines=[])
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# Train one hemisphere run in a fresh process and SIGKILL it right after its n-th completed
# file write (config.json, checkpoint.pt, history.csv, ..., metrics.json): a real kill at an
# exact boundary, every boundary in turn.
KILLER = """
import os, signal, sys, json
from bilateral import config as C, plan, runs
n, values = int(sys.argv[1]), json.loads(sys.argv[2])
count, write = [0], runs.atomic_write_bytes
def killing(path, data):
    write(path, data)
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
runs.atomic_write_bytes = killing
plan.run_stage("hemisphere", C.from_dict(values), 0, log=lambda m: None)
print("WRITES", count[0])
"""


def config(tmp, **kw):
    return C.from_dict({**TINY, "out_dir": str(tmp), **kw})


def record(run) -> dict:
    """What a run's result is: its test and validation metrics, model.pt's bytes, history."""
    m = json.loads((run.path / "metrics.json").read_text())
    rows = list(csv.DictReader(io.StringIO((run.path / "history.csv").read_text())))
    return {"test": m["test"], "val": m["val"], "best": m["best_epoch"],
            "model": runs.sha256(run.path / "model.pt"),
            "history": [{k: v for k, v in r.items() if k != "seconds"} for r in rows]}


def hemisphere(cfg):
    return plan.Run("hemisphere", dataclasses.replace(cfg, side="left"), 0)


def killer(n, cfg) -> subprocess.Popen:
    """A process that trains cfg's left hemisphere and SIGKILLs itself after write n (0: never)."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in TINY or k == "out_dir"}
    values["side"] = "left"
    return subprocess.Popen([sys.executable, "-c", KILLER, str(n), json.dumps(values)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


WRITES = 8  # config, (checkpoint, history) x 2 epochs, history again, model, metrics


def test_a_run_killed_after_any_write_resumes_to_the_uninterrupted_result(tmp_path):
    """A and B: killed after each write (the last epoch's checkpoint and history, model.pt,
    metrics.json included), the rerun ends with the uninterrupted run's test accuracy, model.pt
    bytes and whole history; no temporary file or checkpoint is left in the finished folder.
    The killed processes run side by side (each its own folder, one thread each)."""
    ref_cfg = config(tmp_path / "ref")
    cfgs = {n: config(tmp_path / f"kill{n}") for n in range(1, WRITES + 1)}
    procs = {0: killer(0, ref_cfg), **{n: killer(n, c) for n, c in cfgs.items()}}
    done = {n: p.communicate(timeout=300) for n, p in procs.items()}  # (stdout, stderr)
    rc, (out, err) = procs[0].returncode, done[0]
    assert rc == 0, err
    assert int(out.split("WRITES")[1]) == WRITES
    want = record(hemisphere(ref_cfg))
    for n, cfg in cfgs.items():
        rc = procs[n].returncode
        assert rc == -signal.SIGKILL, (n, done[n][1][-2000:])
        run = hemisphere(cfg)
        if n < WRITES:
            assert run.status() == "in_progress", n  # not finished before its seal
        plan.run_stage("hemisphere", dataclasses.replace(cfg, side="left"), 0, log=lambda m: None)
        assert run.status() == "finished", n
        assert record(run) == want, f"killed after write {n}"
        assert sorted(f.name for f in run.path.iterdir()) == \
            ["config.json", "history.csv", "metrics.json", "model.pt"], n


def test_a_seal_that_does_not_cover_the_files_is_not_finished(tmp_path):
    """B: a run is finished only when metrics.json's seal matches model.pt and history.csv."""
    cfg = config(tmp_path)
    plan.run_stage("hemisphere", dataclasses.replace(cfg, side="left"), 0, log=lambda m: None)
    run = hemisphere(cfg)
    assert run.status() == "finished"
    h = run.path / "history.csv"
    text = h.read_text()
    h.write_text("\n".join(text.splitlines()[:-1]) + "\n")  # one row short
    assert run.status() == "in_progress"
    with pytest.raises(runs.RecordError, match="one row per epoch"):
        runs.verify(run.path)
    lines = text.splitlines()
    lines[-1] = lines[-1].replace(",", ",9", 1)  # every row there, one number changed
    h.write_text("\n".join(lines) + "\n")
    assert run.status() == "in_progress"
    with pytest.raises(runs.RecordError, match="history.csv does not match"):
        runs.verify(run.path)


def test_a_bilateral_run_records_the_hash_of_the_hemisphere_it_loaded(tmp_path, monkeypatch):
    """D: a hemisphere replaced after the bilateral run loaded it leaves the bilateral run
    labelled with the hash of what it used, so the plan calls it stale."""
    cfg = config(tmp_path, epochs=1)
    for side in ("left", "right"):
        plan.run_stage("hemisphere", dataclasses.replace(cfg, side=side), 0, log=lambda m: None)
    left = hemisphere(cfg)
    before = runs.sha256(left.path / "model.pt")
    load = plan.Run.load_model

    def load_then_replace(self, hier, device="cpu", hashes=None):
        model = load(self, hier, device, hashes)
        if self == left:  # another process retrains the left hemisphere right now
            state = runs.load_torch(left.path / "model.pt")
            state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
            runs.save_torch(left.path / "model.pt", state)
        return model
    monkeypatch.setattr(plan.Run, "load_model", load_then_replace)
    plan.run_stage("bilateral", cfg, 0, log=lambda m: None)
    monkeypatch.undo()
    bil = plan.Run("bilateral", cfg, 0)
    rec = json.loads((bil.path / "config.json").read_text())
    assert rec["upstream"][left.key] == before
    assert bil.status() == "stale" and left.key in " ".join(bil.stale_reasons())


def test_a_dead_worker_fails_only_its_own_job():
    """F: a worker killed by a signal fails its job with the signal named; the other jobs and
    the dependants of healthy jobs still run, on fresh workers."""
    dies = Job("dies", functools.partial(os.abort))
    fine = [Job(f"fine{i}", functools.partial(int, str(i))) for i in range(3)]
    after = Job("after", functools.partial(int, "7"))
    deps = {after: [fine[0]], dies: [], **{j: [] for j in fine}}
    out = local.run([dies, *fine, after], deps, {"workers": 2}, log=lambda m: None)
    by = {o.job.key: o for o in out}
    assert by["dies"].status == "failed" and "SIGABRT" in by["dies"].error
    assert [by[f"fine{i}"].value for i in range(3)] == [0, 1, 2]
    assert by["after"].status == "ok" and by["after"].value == 7


def children(pid) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_sweep_leaves_no_worker_and_a_rerun_finishes(tmp_path, sig):
    """I: SIGKILL or SIGTERM to a sweep with 2 workers leaves no worker running, and no run's
    lock held: a rerun can take every run at once."""
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path), "epochs": 30,
                                      "baselines": ["unilateral"], "pool_size": 2, "ensemble_sizes": [2]}))
    cmd = [sys.executable, "-m", "bilateral", "sweep", str(params), "--jobs", "2"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while len(workers := children(p.pid)) < 2:
        assert time.time() - t0 < 120 and p.poll() is None, p.stdout.read() if p.poll() else "slow"
        time.sleep(0.2)
    while not list(tmp_path.glob("i/*/*/seed=0/config.json")):  # a worker is training a run
        assert time.time() - t0 < 180 and p.poll() is None, "no run started"
        time.sleep(0.2)
    p.send_signal(sig)
    p.wait(timeout=60)
    deadline = time.time() + 20
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "a worker outlived its sweep"
    started = [r for r in plan.plan(C.load(params), [0]) if r.path.exists()]
    assert started  # the workers had claimed runs; nobody holds them now
    for r in started:
        with runs.claim(r.path):
            pass


def test_two_sweeps_over_one_experiment_both_finish(tmp_path):
    """M: two sweeps started together over one experiment wait for each other's runs instead of
    failing them; both exit 0 and the study is complete."""
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path), "epochs": 1,
                                      "baselines": ["unilateral", "ensemble"], "pool_size": 2,
                                      "ensemble_sizes": [2]}))
    cmd = [sys.executable, "-m", "bilateral", "sweep", str(params)]
    ps = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert "RunLocked" not in "".join(outs)
    cfg = C.load(params)
    assert all(r.status() == "finished" for r in plan.plan(cfg, [0]))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bilateral", *map(str, args)], cwd=ROOT,
                          env=ENV, text=True, capture_output=True, timeout=300)


def one_line(p, *words):
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert len(lines[0]) < 1200, len(lines[0])  # the allowed keys, but never a whole value
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bounded_inputs_are_refused_in_one_short_line(tmp_path):
    """J, H: an alias bomb, an oversized params file or value, and bad --grid values are each
    refused at once in one short line (a value is quoted by a short prefix only)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x","x","x","x","x","x","x","x","x"]\n'
                    + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                              for p, c in zip("abcdefgh", "bcdefghi")))
    t0 = time.time()
    one_line(cli("plan", bomb), "aliases")  # the one-line contract, through the real CLI
    big = tmp_path / "big.yaml"
    big.write_text("experiment: x\n" + "# " + "y" * C.MAX_PARAMS_BYTES + "\n")
    with pytest.raises(C.ConfigError, match="at most"):
        C.load(big)
    with pytest.raises(C.ConfigError, match="at most") as e:
        C.load("params/smoke.yaml", [f"experiment={'n' * 50_000}"])
    assert len(str(e.value)) < 300
    with pytest.raises(C.ConfigError, match="experiment") as e:
        C.load("params/smoke.yaml", [f"experiment={'n' * 5000}"])
    assert len(str(e.value)) < 600
    for bad in ("width=[", "width=!!python/object:os.system x", "nope=1,2"):
        with pytest.raises(C.ConfigError, match="grid") as e:
            sweep.expand_grid("params/smoke.yaml", {"out_dir": str(tmp_path)}, [bad])
        assert "\n" not in str(e.value).strip() and len(str(e.value)) < 1200
    assert time.time() - t0 < 60


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped, saying why, where mounting is not allowed)."""
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip() or 'not root'})")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_a_full_disk_names_the_path_and_the_free_space(small_disk):
    """L: a write that fails for lack of space says which file and how much room is left, and
    leaves no temporary file behind."""
    from bilateral import __main__ as cli_main
    target = small_disk / "x" / "model.pt"
    with pytest.raises(OSError) as e:
        runs.atomic_write_bytes(target, b"\0" * 200_000)
    assert e.value.filename == str(target)
    assert list((small_disk / "x").iterdir()) == []  # no temporary file left
    hint = cli_main.disk_hint(e.value)
    assert str(target) in hint and "MiB free" in hint


def test_an_impossible_slurm_request_is_one_line_before_any_work(slurm_cluster, tmp_path):
    """G: the cluster's refusal (sbatch --test-only) in one line, before the estimate runs."""
    p = cli("sweep", "params/smoke.yaml", "--executor", "slurm", "--partition", "nope",
            "--set", f"out_dir={tmp_path}")
    one_line(p, "cluster refuses", "partition")
    assert "trainings to run" not in p.stdout  # refused before the estimate


def test_publish_is_whole_and_confined(tmp_path):
    """E: a publication replaces every file of the earlier one (no old forest plot beside new
    results), a failure leaves the earlier one untouched, and destinations inside the outputs
    folder or non-empty folders that are not publications are refused in one line."""
    from bilateral import publish
    out = tmp_path / "out"
    cfg = config(out, epochs=1)
    for side in ("left", "right"):
        plan.run_stage("hemisphere", dataclasses.replace(cfg, side=side), 0, log=lambda m: None)
    exp = out / "i"
    dest = tmp_path / "results" / "i"
    dest.mkdir(parents=True)
    (dest / "PROVENANCE.md").write_text("an earlier publication\n")
    (dest / "old_figure.png").write_bytes(b"old")
    p = cli("report", exp, "--publish", dest)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in dest.iterdir()) == ["PROVENANCE.md", "environment.txt", "histories.csv",
                                                       "results.csv", "results.md", "study.json"]
    assert "2 finished runs" in (dest / "PROVENANCE.md").read_text()
    before = {f.name: f.read_bytes() for f in dest.iterdir()}
    (exp / "hemisphere" / "resnet9-A-left" / "seed=0" / "config.json").write_text("{not json")
    p = cli("report", exp, "--publish", dest)
    assert p.returncode != 0
    assert {f.name: f.read_bytes() for f in dest.iterdir()} == before  # untouched
    assert not [f for f in dest.parent.iterdir() if f.name.startswith(".")]  # no temp folder
    for bad in (out / "other", exp / "hemisphere"):
        one_line(cli("report", exp, "--publish", bad), "outputs folder")
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "mine.txt").write_text("keep me")
    one_line(cli("report", exp, "--publish", stranger), "not an earlier publication")
    assert (stranger / "mine.txt").read_text() == "keep me"


def test_a_tiny_crafted_cifar_pickle_cannot_allocate_gigabytes(tmp_path):
    """J: a few hundred bytes asking numpy for a huge empty array are refused before allocating."""
    import pickletools  # noqa: F401  (the stream below is written by hand, opcode by opcode)

    from bilateral import data as D
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    # {b"data": numpy.core.multiarray._reconstruct(numpy.ndarray, (3_000_000_000,), b"b")}
    stream = (b"\x80\x02}q\x00C\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02"
              b"cnumpy\nndarray\nq\x03\x8a\x05\x00^\xd0\xb2\x00\x85q\x04C\x01bq\x05\x87q\x06Rq\x07s.")
    (folder / "meta").write_bytes(stream)
    assert len(stream) < 200
    t0 = time.time()
    with pytest.raises(D.DataError, match="refused an array"):
        D.unpickle_cifar(folder / "meta")
    assert time.time() - t0 < 5
