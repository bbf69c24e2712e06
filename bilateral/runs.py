"""Run records on disk: outputs/<experiment>/<stage>/<name>/seed=<k>/.

A run folder holds config.json (resolved parameters and provenance), history.csv (a row per
epoch), model.pt (state dict only), metrics.json and, while training, checkpoint.pt. Every write
goes to a temporary file first and is then renamed, so a run killed at any moment leaves either
the old file or the new one. metrics.json is the seal, written last: it records the sha256 of
model.pt and of history.csv, and a run is finished only when it is there and both still match
(`finished`), so a record killed half-way is never taken for a finished one.

One writer per run: `claim(path)` holds an exclusive lock on path/.lock (fcntl.flock) while a
process works on the run. The kernel drops the lock when its process dies, however it dies, so a
lock is never stale; a second process asking for the run refuses with the holder's PID and host.
A finished run is checked before it is reused (`verify`): a record that does not parse, or a
model.pt that does not load or no longer matches its recorded sha256, stops with its path and
the command that rebuilds it.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from . import config as C


class RunConflict(RuntimeError):
    """The run cannot be taken as asked (another config, another process): a refusal, exit 3."""


class RunLocked(RunConflict):
    """Another live process holds the run."""


class RecordError(RuntimeError):
    """A record on disk that cannot be read or trusted (bad JSON, truncated model.pt...)."""


LOCK = ".lock"
FIX = "; rebuild the run that wrote it: rerun its train command with --force"


def run_dir(cfg: C.Config, stage: str, name: str, seed: int) -> Path:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise C.ConfigError(f"seed: must be an integer >= 0, got {seed!r}")
    return experiment_dir(cfg) / stage / name / f"seed={seed}"


def atomic_write_bytes(path: Path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide records from the group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a full disk says where: the file being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path, fix=FIX):
    """A JSON record; one that does not parse is a RecordError naming the file and `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # UnicodeDecodeError included
        raise RecordError(f"{path} is not valid JSON ({e}){fix}") from e


def write_csv(path, rows: list[dict]):
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def save_torch(path, obj) -> str:
    """Write atomically; return the file's sha256 (recorded so a later reuse can check it)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def load_torch(path, map_location="cpu", fix=FIX):
    """Tensors only (weights_only); a file that does not load is a RecordError naming it."""
    return read_torch(path, map_location, fix)[0]


def read_torch(path, map_location="cpu", fix=FIX) -> tuple[object, str]:
    """(load_torch's object, the sha256 of the very bytes it was loaded from): a run records
    the hash of what it used, not of a file that may have been replaced since."""
    raw = Path(path).read_bytes()  # a missing file stays a FileNotFoundError
    try:
        obj = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage, a pickle with code in it: all untrustworthy
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch's advice to
        # retry without weights_only is left out: that is exactly what must not be done
        raise RecordError(f"{path} does not load ({type(e).__name__}: {why}){fix}") from e
    return obj, hashlib.sha256(raw).hexdigest()


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HASHES: dict[tuple, str] = {}


def file_hash(path) -> str | None:
    """sha256 of a file, computed once per (path, mtime, size); None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256(path)
    return _HASHES[key]


def experiment_dir(cfg) -> Path:
    """outputs/<experiment>: where every record of a study lives."""
    return Path(cfg.out_dir) / cfg.experiment


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> bool | None:
    """Whether the checkout that runs has uncommitted changes to tracked files (None: not a git
    checkout): PROVENANCE.md says so, since a revision alone does not name such code."""
    try:
        here = Path(__file__).resolve().parent
        # a fresh clone's first status hashes every file (seconds on a busy machine)
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                             capture_output=True, text=True, timeout=60)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(device) -> dict:
    versions = {}
    for pkg in ("torch", "torchvision", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = str(device)
    if torch.device(device).type == "cuda":
        dev += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return {"versions": versions, "python": platform.python_version(), "git": git_revision(),
            "git_dirty": git_dirty(), "device": dev, "host": platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}


def prepare(path: Path, identity: dict, force: bool = False, rebuild: str | None = None) -> str:
    """Decide what to do with a run folder: 'new', 'resume' or 'done'.

    A folder made with a different config is never silently reused or overwritten: it stops
    with the differing keys, unless `force`, which clears it. A finished run is verified
    before it is reused; `rebuild` is the command named when its record is bad.
    """
    path = Path(path)
    if force:
        clear(path)
        return "new"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return "new"
    fix = f"; rebuild the run with: {rebuild} --force" if rebuild else FIX
    old = read_json(cfg_file, fix)
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        raise RecordError(f"{cfg_file} holds no 'config' mapping{fix}")
    old = old["config"]
    changes = C.diff(old, identity)
    if changes:
        raise RunConflict(f"{path} holds a run with a different config ({'; '.join(changes)}); "
                          f"use another experiment name, or --force to replace it")
    if (path / "metrics.json").exists():
        verify(path, fix)
        (path / "checkpoint.pt").unlink(missing_ok=True)  # killed while sealing: stale now
        remove_litter(path)
        return "done"
    remove_litter(path)  # temporary files of writes a kill interrupted
    if (path / "checkpoint.pt").exists():
        load_torch(path / "checkpoint.pt", fix=fix)  # a bad one stops before anything is written
        return "resume"
    return "new"


def clear(path: Path):
    """Remove a run's files (not its lock: the caller holds it)."""
    if path.is_dir():
        for f in path.iterdir():
            if f.is_file() and f.name != LOCK:
                f.unlink()


def verify(path: Path, fix: str = FIX) -> dict:
    """A finished run's metrics, after checking that its records parse and its model.pt loads
    (and matches the sha256 recorded when it was written)."""
    path = Path(path)
    metrics = read_json(path / "metrics.json", fix)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        raise RecordError(f"{path / 'metrics.json'} holds no test metrics{fix}")
    model = path / "model.pt"
    want = metrics.get("model_sha256")
    if want is not None or model.exists():
        if not model.is_file():
            raise RecordError(f"{model} is missing from a finished run{fix}")
        if want is not None and sha256(model) != want:
            raise RecordError(f"{model} does not match the sha256 recorded in metrics.json "
                              f"(changed or truncated since the run){fix}")
        load_torch(model, fix=fix)
    history = path / "history.csv"
    _check_history(history, metrics.get("epochs"), fix)
    if metrics.get("history_sha256") is not None and file_hash(history) != metrics["history_sha256"]:
        raise RecordError(f"{history} does not match the sha256 recorded in metrics.json{fix}")
    return metrics


def _check_history(path: Path, epochs, fix):
    """history.csv, when there is one, has a row per epoch (the notebooks plot it)."""
    if not path.exists():
        return
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        ok = all(int(r["epoch"]) == i + 1 for i, r in enumerate(rows))
    except (ValueError, KeyError, TypeError, csv.Error):
        ok = False
    if not ok or isinstance(epochs, int) and len(rows) != epochs:
        raise RecordError(f"{path} does not hold one row per epoch{fix}")


def finish(path: Path, metrics: dict):
    """Seal a run: record the sha256 of model.pt and history.csv in metrics.json, written last;
    then drop the checkpoint and any temporary file an interrupted write left."""
    path = Path(path)
    for key, name in (("model_sha256", "model.pt"), ("history_sha256", "history.csv")):
        if (path / name).is_file():
            metrics[key] = sha256(path / name)
    write_json(path / "metrics.json", metrics)
    (path / "checkpoint.pt").unlink(missing_ok=True)
    remove_litter(path)


def remove_litter(path: Path) -> list[str]:
    """Remove the temporary files of writes that were interrupted (.<name>.<random>, see
    atomic_write_bytes); the names removed."""
    gone = []
    for f in Path(path).glob(".*"):
        if f.is_file() and f.name != LOCK:
            f.unlink(missing_ok=True)
            gone.append(f.name)
    return gone


def finished(path: Path) -> bool:
    """Sealed and whole: metrics.json is there, and model.pt and history.csv are the files its
    seal names (sha256, read once per file version)."""
    path = Path(path)
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(metrics, dict):
        return False
    return all(file_hash(path / name) == metrics[key] for key, name in
               (("model_sha256", "model.pt"), ("history_sha256", "history.csv")) if key in metrics)


# ------------------------------------------------------------------------- one writer per run

def holder(path: Path) -> str:
    """Who holds a run's lock, as written in its lock file."""
    try:
        info = json.loads((Path(path) / LOCK).read_text() or "{}")
        return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}"
    except (OSError, ValueError):
        return "a process whose PID is not yet written"


@contextlib.contextmanager
def claim(path: Path, wait: bool = False, log=None):
    """Hold `path` for this process: an exclusive flock on path/.lock, released on exit (and by
    the kernel if the process dies, so never stale). Another holder: wait (saying so through
    `log`), or RunLocked."""
    path = Path(path)
    lock = path / LOCK
    if wait and log:
        try:
            with claim(path):  # free now: take it below without a word
                pass
        except RunLocked as e:
            log(f"waiting: {e}".split("; wait for it")[0])
    while True:
        path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a holder releasing it: retry
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLocked(f"{path} is being written by {holder(path)}; wait for it to finish "
                            f"(or stop that process) and run again") from None
        try:  # the lock counts only if the file is still the one at `lock` (not unlinked)
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = json.dumps({"pid": os.getpid(), "host": platform.node()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield path
    finally:
        # unlink while still holding the lock, so a waiter can tell the file is gone; the
        # folder goes too when nothing else was written (a run stopped before it began)
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        with contextlib.suppress(OSError):
            path.rmdir()
