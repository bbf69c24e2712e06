"""Run records on disk: outputs/<experiment>/<stage>/<name>/seed=<k>/.

A run folder holds config.json (resolved parameters and provenance), history.csv (a row per
epoch), metrics.json (written last: its presence means the run finished), model.pt (state dict
only) and, while training, checkpoint.pt. Every write goes to a temporary file first and is
then renamed, so a run killed at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import csv
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
    pass


def run_dir(cfg: C.Config, stage: str, name: str, seed: int) -> Path:
    return Path(cfg.out_dir) / cfg.experiment / stage / name / f"seed={seed}"


def atomic_write_bytes(path: Path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path):
    return json.loads(Path(path).read_text())


def write_csv(path, rows: list[dict]):
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def save_torch(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
            "device": dev, "host": platform.node()}


def prepare(path: Path, identity: dict, force: bool = False) -> str:
    """Decide what to do with a run folder: 'new', 'resume' or 'done'.

    A folder made with a different config is never silently reused or overwritten: it stops
    with the differing keys, unless `force`, which clears it.
    """
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return "new"
    old = read_json(cfg_file)["config"]
    changes = C.diff(old, identity)
    if changes and not force:
        raise RunConflict(f"{path} holds a run with a different config ({'; '.join(changes)}); "
                          f"use another experiment name, or --force to replace it")
    if changes or force:
        for f in path.iterdir():
            if f.is_file():
                f.unlink()
        return "new"
    if (path / "metrics.json").exists():
        return "done"
    return "resume" if (path / "checkpoint.pt").exists() else "new"


def finished(path: Path) -> bool:
    return (Path(path) / "metrics.json").exists()
