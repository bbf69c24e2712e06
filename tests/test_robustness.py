"""Bad params, bad data, bad records and two writers, each met as a user meets it: through
`python -m bilateral` in a real process. Every failure must end with one line on stderr naming
the problem (exit 2, or 3 for a refusal), no traceback, and nothing lost or overwritten."""
import gzip
import hashlib
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bilateral import config as C
from bilateral import data as D
from bilateral import runs

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "data" / "cifar100-test-sample20"
TINY = dict(experiment="r", dataset="synthetic", synthetic_size=240, width=0.03125, epochs=1,
            batch_size=64, progress=False, threads=1, device="cpu")
RUN = Path("r/hemisphere/resnet9-A-left/seed=0")
TRAIN = ["train", "hemisphere", "--seed", "0"]


def cli(*args, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bilateral", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)


def params(tmp, name="p.yaml", **kw):
    path = Path(tmp) / name
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(Path(tmp) / "out"), **kw}))
    return path


def refused(p, code, *words):
    """The one-line error contract; returns the line."""
    out = p.stdout + p.stderr
    assert p.returncode == code, out
    assert "Traceback" not in out, out
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder):
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(Path(folder).rglob("*"))
            if f.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One real finished run (1 epoch, tiny); tests corrupt copies of it."""
    tmp = tmp_path_factory.mktemp("finished")
    p = cli(*TRAIN, "--params", params(tmp))
    assert p.returncode == 0, p.stdout + p.stderr
    return tmp / "out"


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run and a params file pointing at it (out_dir is not part
    of a run's identity, so the copy is the same run)."""
    shutil.copytree(finished, tmp_path / "out")
    return params(tmp_path), tmp_path / "out"


# ------------------------------------------------------------------------- bad params

def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: r\nwidth: [0.5\nepochs: 1\n")
    line = refused(cli(*TRAIN, "--params", bad), 2, str(bad), "not valid YAML", "line 3")
    assert "fix the file" in line
    assert list(tmp_path.iterdir()) == [bad]


def test_empty_params_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    refused(cli(*TRAIN, "--params", empty, "--set", f"out_dir={tmp_path / 'out'}"), 2,
            str(empty), "is empty", "{}")
    assert not (tmp_path / "out").exists() and not Path(ROOT / "outputs" / "default").exists()
    # an explicit empty mapping is a deliberate choice of every default
    explicit = tmp_path / "defaults.yaml"
    explicit.write_text("{}\n")
    assert C.load(explicit) == C.Config()


# --------------------------------------------------------------------------- bad data

def test_val_size_larger_than_training_set_stops_before_the_run_is_claimed(tmp_path):
    line = refused(cli(*TRAIN, "--params", params(tmp_path), "--set", "val_size=100000"), 2,
                   "val_size=100000", "lower val_size")
    assert "at most 228" in line  # 240 images, 12 classes of 20: 19 per class can go to val
    assert not (tmp_path / "out").exists()


def _fmnist_train_files(folder):
    """Fashion-MNIST training files: the system's when installed, else IDX files of our own."""
    images, labels = D.FMNIST_FILES["train"]
    if (D.FMNIST_SYSTEM_DIR / images).is_file():
        return D.FMNIST_SYSTEM_DIR / images, D.FMNIST_SYSTEM_DIR / labels
    n = 600
    rng = np.random.default_rng(0)
    (folder / images).write_bytes(gzip.compress(
        (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()))
    (folder / labels).write_bytes(gzip.compress(
        (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + (np.arange(n) % 10).astype(np.uint8).tobytes()))
    return folder / images, folder / labels


def test_truncated_fashion_mnist_gz_names_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    images, labels = _fmnist_train_files(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    raw = images.read_bytes()
    (data_dir / images.name).write_bytes(raw[: len(raw) // 2])
    shutil.copy(labels, data_dir / labels.name)
    before = snapshot(data_dir)
    p = cli(*TRAIN, "--params", params(tmp_path, dataset="fashion_mnist", data_dir=str(data_dir)))
    refused(p, 2, str(data_dir / images.name), "truncated", "replace it")
    assert snapshot(data_dir) == before and images.read_bytes() == raw
    assert not (tmp_path / "out").exists()


class _Touch:
    """Unpickling this calls open(marker, 'w'): code run by merely reading the file."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_cifar_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    crafted = pickle.dumps({b"fine_label_names": _Touch(marker)}, protocol=2)
    pickle.loads(crafted)[b"fine_label_names"].close()  # real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("meta", "train", "test"):
        (folder / name).write_bytes(crafted)
    p = cli(*TRAIN, "--params", params(tmp_path, dataset="cifar100", data_dir=str(tmp_path / "data")))
    refused(p, 2, str(folder / "meta"), "refused to load", "open", "download it again")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cifar_file_with_the_published_count_must_match_the_published_md5(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    s = np.load(FIXTURE / "cifar100_test_first20.npz")
    meta = {b"fine_label_names": [n.encode() for n in s["fine_label_names"]],
            b"coarse_label_names": [n.encode() for n in s["coarse_label_names"]]}
    fine = np.repeat(s["fine_labels"][:1], 10000)
    batch = {b"data": np.zeros((10000, 3072), np.uint8), b"fine_labels": fine.tolist(),
             b"coarse_labels": s["fine_to_coarse"][fine].tolist()}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "train").write_bytes(b"")  # present, never read here
    with pytest.raises(D.DataError, match="f0ef6b0ae62326f3e7ffdfab6717acfc"):
        D.load_dataset("cifar100", "test", tmp_path)
    # the same content under another name (not claiming to be the published file) loads
    assert D._cifar_arrays(*D._file_key(_renamed(folder / "test", "subset")))[0].shape == (10000, 3072)


def _renamed(path, name):
    new = path.with_name(name)
    path.rename(new)
    return new


def test_fixture_matches_its_checksums():
    for line in (FIXTURE / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == digest, name


# ------------------------------------------------------------------------ bad records

def test_truncated_model_pt_is_not_trusted(copy):
    p, out = copy
    model = out / RUN / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    before = snapshot(out)
    refused(cli(*TRAIN, "--params", p), 2, str(model), "sha256",
            "python -m bilateral train hemisphere", "--force")
    assert snapshot(out) == before
    # without a recorded hash (an older record) the load itself catches it
    m = runs.read_json(out / RUN / "metrics.json")
    del m["model_sha256"]
    runs.write_json(out / RUN / "metrics.json", m)
    refused(cli(*TRAIN, "--params", p), 2, str(model), "does not load", "--force")
    # --force rebuilds it
    again = cli(*TRAIN, "--params", p, "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    assert runs.verify(out / RUN)["model_sha256"] == runs.sha256(model)
    runs.load_torch(model)


def test_garbage_metrics_json_stops_train_and_is_listed_by_report(copy):
    p, out = copy
    good = out / "r/hemisphere/resnet9-A-left/seed=1"
    shutil.copytree(out / RUN, good)
    metrics = out / RUN / "metrics.json"
    metrics.write_text("{garbage")
    before = snapshot(out)
    refused(cli(*TRAIN, "--params", p), 2, str(metrics), "not valid JSON", "--force")
    assert snapshot(out) == before
    rep = cli("report", out / "r")
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert f"could not read {metrics}" in rep.stdout
    md = (out / "r" / "results.md").read_text()
    assert "Records that could not be read" in md and str(metrics) in md
    csv = (out / "r" / "results.csv").read_text().splitlines()
    assert len(csv) > 1 and all(",1," in row for row in csv[1:])  # seed 1 only, seed 0 not dropped silently


def test_garbage_config_json_stops_train_and_is_listed_by_report(copy):
    p, out = copy
    cfg = out / RUN / "config.json"
    cfg.write_bytes(b"\x00\xff not json")
    before = snapshot(out)
    refused(cli(*TRAIN, "--params", p), 2, str(cfg), "not valid JSON",
            "python -m bilateral train hemisphere", "--force")
    assert snapshot(out) == before
    rep = cli("report", out / "r")
    refused(rep, 2, str(cfg), "none of the records")  # the only run: nothing to report


def test_garbage_history_csv_and_checkpoint_are_not_trusted(copy):
    p, out = copy
    hist = out / RUN / "history.csv"
    hist.write_text("garbage\n")
    refused(cli(*TRAIN, "--params", p), 2, str(hist), "one row per epoch", "--force")
    hist.unlink()
    # an unfinished run whose checkpoint is garbage: resuming from it stops, naming it
    (out / RUN / "metrics.json").unlink()
    ckpt = out / RUN / "checkpoint.pt"
    ckpt.write_bytes(b"garbage")
    before = snapshot(out)
    refused(cli(*TRAIN, "--params", p), 2, str(ckpt), "does not load", "--force")
    assert snapshot(out) == before


# ---------------------------------------------------------------------- two writers

def test_second_process_refuses_a_run_in_progress(tmp_path):
    p = params(tmp_path, epochs=10000)  # runs until killed below
    run = tmp_path / "out" / RUN
    first = cli(*TRAIN, "--params", p, wait=False)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint.pt").exists():  # the lock is held, one epoch is done
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        cfg = (run / "config.json").read_bytes()
        second = cli(*TRAIN, "--params", p)
        refused(second, 3, str(run), f"PID {first.pid}", f"host {platform.node()}")
        assert "epoch" not in second.stdout
        assert (run / "config.json").read_bytes() == cfg and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    # the kernel dropped the dead holder's lock: the run can be claimed (and resumed) at once
    with runs.claim(run):
        assert runs.prepare(run, runs.read_json(run / "config.json")["config"]) == "resume"


def test_claim_is_exclusive_and_leaves_nothing_behind(tmp_path):
    run = tmp_path / "a" / "seed=0"
    with runs.claim(run):
        with pytest.raises(runs.RunLocked, match=f"PID {os.getpid()}"):
            with runs.claim(run):
                pass
    assert not run.exists()  # a claim that wrote nothing leaves no folder
    with runs.claim(run):
        runs.write_json(run / "config.json", {})
    assert [f.name for f in run.iterdir()] == ["config.json"]


def test_claim_can_wait_for_the_holder(tmp_path):
    import threading
    run, events = tmp_path / "seed=0", []

    def waiter():
        with runs.claim(run, wait=True):
            events.append("acquired")
            runs.write_json(run / "config.json", {"by": "waiter"})

    with runs.claim(run):
        t = threading.Thread(target=waiter)
        t.start()
        events.append("released")  # still held here: the waiter cannot have the run yet
    t.join(60)
    assert events == ["released", "acquired"]
    assert runs.read_json(run / "config.json") == {"by": "waiter"} and not (run / runs.LOCK).exists()


# ------------------------------------------------------------------ more careless input

@pytest.mark.parametrize("args, code, words", [
    (["--seed", "-1"], 2, ["seed", "non-negative"]),
    (["--set", "experiment=../../escape"], 2, ["experiment", "not a folder name"]),
    (["--set", "experiment=.."], 2, ["experiment", "not a folder name"]),
    (["--set", "width=.nan"], 2, ["width", "finite"]),
    (["--set", "width=[1"], 2, ["--set width=[1", "not valid YAML"]),
    (["--set", "experiment=" + "x" * 300], 2, ["experiment", "at most 200 bytes"]),
    (["--set", "threads=-1"], 2, ["threads", "positive"]),
    (["--set", "val_size=0"], 2, ["val split", "val_size to at least 12"]),
    (["--set", "synthetic_size=20"], 2, ["val split", "empty"]),
    (["--set", "device=cuda:99"], 2, ["cuda:99", "not available", "device=cpu"]),
])
def test_more_bad_input_stops_with_one_line(tmp_path, capsys, args, code, words):
    refused(main_(capsys, *TRAIN[:2], "--params", params(tmp_path), *args), code, *words)
    assert not (tmp_path / "out").exists()


def main_(capsys, *args):
    """The command line in this process (same code path, without a second torch start-up)."""
    from bilateral.__main__ import main
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def test_params_file_that_is_a_directory(tmp_path, capsys):
    refused(main_(capsys, *TRAIN, "--params", tmp_path), 2, str(tmp_path), "is a directory")


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    refused(main_(capsys, *TRAIN, "--params", params(tmp_path, out_dir=str(f / "out"))), 2,
            str(f), "out_dir")
    assert f.read_text() == "keep me"


def test_unicode_experiment_name_is_one_folder(tmp_path, capsys):
    p = main_(capsys, *TRAIN, "--params", params(tmp_path, experiment="résumé-実験"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "out" / "résumé-実験" / "hemisphere").is_dir()


def test_a_key_given_twice_in_a_params_file(tmp_path, capsys):
    p = tmp_path / "dup.yaml"
    p.write_text("epochs: 1\nwidth: 0.5\nepochs: 100\n")
    refused(main_(capsys, *TRAIN, "--params", p), 2, str(p), "'epochs' is given twice", "line 3")


def test_report_lists_a_record_with_a_value_that_is_not_a_number(copy, capsys):
    _, out = copy
    shutil.copytree(out / RUN, out / "r/hemisphere/resnet9-A-left/seed=1")
    m = runs.read_json(out / RUN / "metrics.json")
    m["test"]["fine_acc"] = "oops"
    runs.write_json(out / RUN / "metrics.json", m)
    p = main_(capsys, "report", out / "r")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"could not read {out / RUN / 'metrics.json'}: a value that is not a number" in p.stdout
    assert str(out / RUN / "metrics.json") in (out / "r" / "results.md").read_text()
