"""A finished study, copied where git tracks it: results.csv, results.md and its figures, and
PROVENANCE.md (the command, the code, the packages, the machine, the time it took).

`python -m bilateral report outputs/fashion_mnist --publish results/fashion_mnist` rebuilds the
report, then copies it. The run folders themselves (models, histories) stay in outputs/: they
are large, and the copy says which revision and seeds rebuild them.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from . import plan, results_md
from .execute.jobs import hms
from .runs import atomic_write_bytes, cpu_model, read_json

FILES = ("results.csv", "results.md", results_md.FOREST, "results.png")


def _records(exp: Path) -> list[tuple[dict, dict]]:
    """(config.json, metrics.json) of every finished run of the experiment."""
    out = []
    for m in sorted(exp.glob("*/*/seed=*/metrics.json")):
        if m.parents[2].name in plan.STAGES:  # not analysis/<condition>/seed=k
            out.append((read_json(m.parent / "config.json"), read_json(m)))
    return out


def _common(values) -> str:
    """One value, or each value with how many runs recorded it (a study resumed elsewhere)."""
    c = Counter("not recorded" if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for v in values)
    if len(c) == 1:
        return next(iter(c))
    return "; ".join(f"{v} ({n} runs)" for v, n in c.most_common())


def _cpu(recs) -> str:
    if all(r.get("cpu") is None for r, _ in recs):  # recorded only since the runs say it
        return f"{cpu_model()} ({os.cpu_count()} cores; read when published, the runs did not record it)"
    return f"{_common(r.get('cpu') for r, _ in recs)}; cores: {_common(r.get('cpu_count') for r, _ in recs)}"


def provenance(exp: Path, command: str | None = None) -> str:
    recs = _records(exp)
    if not recs:
        raise FileNotFoundError(f"no finished runs under {exp}")
    per_seed = defaultdict(float)
    for rec, m in recs:
        per_seed[rec["seed"]] += m.get("wall_s", 0.0)
    summary = exp / "jobs" / "summary.txt"
    sweep = summary.read_text().strip() if summary.exists() else None
    if command is None and sweep and sweep.startswith("command: "):
        command = sweep.splitlines()[0].removeprefix("command: ")
    get = lambda key: _common(r.get(key) for r, _ in recs)  # noqa: E731
    lines = [f"# Provenance of {exp.name}", "",
             f"- command: `{command or 'not recorded'}`",
             f"- code (git revision of each run): {get('git')}",
             f"- packages: {get('versions')}; Python {get('python')}",
             f"- device: {get('device')}; CPU: {_cpu(recs)}",
             f"- {len(recs)} finished runs, seeds {', '.join(map(str, sorted(per_seed)))}",
             "- training time per seed (sum of its runs' wall_s; runs of two workers overlap, so "
             "this is compute, not elapsed time): "
             + ", ".join(f"seed {s}: {hms(t)}" for s, t in sorted(per_seed.items()))]
    if sweep:  # its counts and wall time; the per-run table stays in jobs/summary.txt
        tail = sweep.split("\n\n")[-1]
        lines += [f"- the last sweep over this experiment (what it had left to train): "
                  f"{'; '.join(tail.splitlines())}"]
    return "\n".join(lines) + "\n"


def publish(exp, dest, command: str | None = None) -> list[Path]:
    """Copy the report of `exp` (rebuild it first) and its provenance into `dest`."""
    exp, dest = Path(exp), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        if (exp / name).exists():
            shutil.copyfile(exp / name, dest / f".{name}.tmp")
            (dest / f".{name}.tmp").replace(dest / name)  # a reader never sees half a file
            written.append(dest / name)
    atomic_write_bytes(dest / "PROVENANCE.md", provenance(exp, command).encode())
    return written + [dest / "PROVENANCE.md"]
