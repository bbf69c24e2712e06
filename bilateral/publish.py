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
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from . import plan, results_md, runs
from .execute.jobs import hms
from .runs import cpu_model, read_json

FILES = ("results.csv", "results.md", results_md.FOREST, "results.png")


def _records(exp: Path) -> list[tuple[dict, dict]]:
    """(config.json, metrics.json) of every run the report used: sealed, and not built on runs
    retrained since (the runs results.run_rows keeps)."""
    out = []
    for m in sorted(exp.glob("*/*/seed=*/metrics.json")):
        if m.parents[2].name in plan.STAGES:  # not analysis/<condition>/seed=k
            rec = read_json(m.parent / "config.json")
            if runs.finished(m.parent) and not plan.changed_in(exp, rec):
                out.append((rec, read_json(m)))
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


class PublishError(ValueError):
    """A destination publish will not write into (without --force)."""


def check_destination(exp: Path, dest: Path, force: bool = False):
    """Refuse a destination inside the outputs folder (another experiment's or a run's folder)
    and a non-empty folder that is not an earlier publication, unless `force`."""
    exp, dest = exp.resolve(), dest.resolve()
    out_dir = exp.parent
    if dest == out_dir or out_dir in dest.parents or dest in exp.parents:
        raise PublishError(f"--publish {dest}: inside the outputs folder {out_dir} (runs and "
                           f"experiments live there); publish into a tracked folder such as "
                           f"results/{exp.name}")
    if not force and dest.is_dir() and any(dest.iterdir()) and not (dest / "PROVENANCE.md").exists():
        raise PublishError(f"--publish {dest}: a non-empty folder that is not an earlier "
                           f"publication (no PROVENANCE.md); choose an empty or new folder, or "
                           f"add --force to replace what it holds")


def publish(exp, dest, command: str | None = None, force: bool = False) -> list[Path]:
    """Copy the report of `exp` (rebuild it first) and its provenance into `dest`, whole: the
    publication is built in a temporary folder beside `dest` and swapped in, replacing every
    file of an earlier one; a failure leaves the earlier publication as it was."""
    exp, dest = Path(exp), Path(dest)
    check_destination(exp, dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        names = [name for name in FILES if (exp / name).exists()]
        for name in names:
            shutil.copyfile(exp / name, new / name)
        (new / "PROVENANCE.md").write_text(provenance(exp, command))
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return [dest / name for name in names] + [dest / "PROVENANCE.md"]
