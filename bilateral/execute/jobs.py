"""The vocabulary every executor shares, torch-free: a Job (a key and a callable), its Outcome,
the dependencies between jobs, priorities, and the environment of a worker.

An executor is `run(jobs, deps, options, log) -> [Outcome]` (local.py, slurm.py): it runs each
job's callable once every job it depends on succeeded, and skips the dependants of a failure.
It knows nothing of what the callables do: sweeps hand it trainings, `run` notebook chains.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

TAIL = 12  # traceback lines a summary keeps of a failed job


@dataclasses.dataclass(eq=False)
class Job:
    key: str                           # what logs and the summary call it (unique in a sweep)
    fn: Callable[[], object]           # the work; picklable (a top-level function or a partial)
    resume: Callable | None = None     # what a requeued (preempted) SLURM job runs; default fn
    cost: float = 0.0                  # estimated, in any unit: longer chains start first
    log: str = ""                      # local workers: the file the job's output goes to
    folder: str = ""                   # where an executor keeps the job's files (SLURM logs)
    name: str = ""                     # SLURM job name
    array: str = ""                    # SLURM: jobs of one array key and level may share an array
    done: Callable[[], bool] | None = None  # the work is complete though the job left no result

    def __repr__(self):
        return f"Job({self.key})"


@dataclasses.dataclass
class Outcome:
    job: Job
    status: str             # ok, failed, skipped (a job it depends on did not succeed)
    seconds: float = 0.0
    error: str = ""         # the last lines of the traceback, or why it was skipped
    log: str = ""           # the job's log file
    job_id: str = ""        # SLURM job id
    value: object = None    # what the callable returned


def say(msg):
    print(msg, flush=True)


def tail(text: str, n: int = TAIL) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def topological(jobs: list, deps: dict) -> list:
    out, seen = [], set()

    def visit(j):
        if j not in seen:
            seen.add(j)
            for d in deps.get(j, []):
                visit(d)
            out.append(j)
    for j in jobs:
        visit(j)
    return out


def priorities(jobs: list, deps: dict) -> dict:
    """{job: its cost plus the costliest chain of jobs that wait on it}. Workers take the ready
    job of highest priority, so the long chains start first and no long job is left to run
    alone at the end while the other workers idle."""
    after = {j: [] for j in jobs}
    for j, ds in deps.items():
        for d in ds:
            after[d].append(j)
    rank = {}
    for j in reversed(topological(jobs, deps)):
        rank[j] = j.cost + max((rank[k] for k in after[j]), default=0.0)
    return rank


def skip_reason(job, deps, done) -> str | None:
    bad = [u.key for u in deps.get(job, []) if u in done and done[u].status != "ok"]
    return f"upstream job {', '.join(bad)} did not finish" if bad else None


def report(o: Outcome, i: int, n: int, log) -> Outcome:
    log(f"[{i}/{n}] {o.job.key} {o.status} ({o.seconds:.0f}s)"
        + (f": {o.error.splitlines()[-1]}" if o.error else ""))
    return o


def worker_env(i: int, workers: int) -> dict:
    """Environment of the i-th of `workers` processes: its own GPU, or its share of the CPU
    threads (set before torch starts in it)."""
    if workers <= 1:
        return {}
    env = {}
    try:
        import torch
        n_gpu = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n_gpu = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if n_gpu:
        ids = visible.split(",") if visible else [str(g) for g in range(n_gpu)]
        env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env
