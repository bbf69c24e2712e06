"""The SLURM executor, through submitit: `run(jobs, deps, options, log)`, each job one SLURM job.

- Jobs of one dependency level and array key that wait for the same jobs go as one submission, a job
  array when there are several (at most `max_parallel` of it running at once); a dependant waits
  with `--dependency=afterok:<its upstream jobs>` and is cancelled by SLURM when one of them
  fails (kill-on-invalid-dep), which the summary reports as skipped.
- A job is signalled (USR2) before its time limit or on preemption: submitit calls
  `Requeueable.checkpoint`, requeues the job, and the requeued job runs `job.resume` (a
  training resumes from its last epoch checkpoint).
- submitit's files and the logs go to job.folder/<job id>/ (a shared filesystem).
- The waiting side reads job states with squeue (sacct needs accounting, which a small cluster
  may lack) and each job's result file (its return value or its traceback).
`options` are the `slurm:` keys of a params file (config.SLURM_KEYS).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .jobs import Outcome, report, say, tail


class Requeueable:
    """What a SLURM job runs: the job's callable; on preemption or at its time limit, submitit
    requeues it with `resume` (never the first call again: a forced training would clear what
    it has done)."""

    def __init__(self, fn, resume=None):
        self.fn, self.resume = fn, resume or fn

    def __call__(self):
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and not os.environ.get("OMP_NUM_THREADS"):  # without cgroups torch sees every core
            import torch
            torch.set_num_threads(int(cpus))
        return self.fn()

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(Requeueable(self.resume, self.resume))


def slurm_parameters(options: dict, n_jobs: int) -> dict:
    """submitit's SlurmExecutor parameters from the `slurm:` options (config.SLURM_KEYS)."""
    p = dict(time=options.get("time", 24 * 60), cpus_per_task=options.get("cpus", 1),
             array_parallelism=options.get("max_parallel", n_jobs),
             # a dependant of a failed job is cancelled at once instead of pending for ever
             additional_parameters={"kill-on-invalid-dep": "yes", "requeue": True})
    if options.get("gpus"):
        p["gpus_per_node"] = options["gpus"]
    if options.get("mem_gb"):
        p["mem"] = f"{int(options['mem_gb'] * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint", "setup"):
        if options.get(key):
            p[key] = options[key]
    return p


def check(options: dict) -> None:
    """Ask the cluster whether it would take a job with these options, before anything is
    submitted (`sbatch --test-only`); ValueError with the cluster's own words when it would not."""
    p = slurm_parameters(options, 1)
    args = ["sbatch", "--test-only", "--wrap", "true", f"--time={p['time']}",
            f"--cpus-per-task={p['cpus_per_task']}"]
    args += [f"--{k}={p[k]}" for k in ("partition", "account", "qos", "constraint", "mem") if k in p]
    if "gpus_per_node" in p:
        args.append(f"--gpus-per-node={p['gpus_per_node']}")
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        said = " ".join((out.stderr or out.stdout).split()) or f"sbatch exited {out.returncode}"
        raise ValueError(f"the cluster refuses these job options ({said[:300]})")


def groups(jobs: list, deps: dict) -> list[list]:
    """Jobs that wait for the same jobs, by dependency level: each is one submission (a job
    array when it holds more than one)."""
    level, out = {}, {}
    for j in jobs:
        ups = tuple(deps.get(j, []))
        level[j] = 1 + max((level[u] for u in ups), default=-1)
        out.setdefault((level[j], j.array, tuple(u.key for u in ups)), []).append(j)
    return [out[k] for k in sorted(out, key=lambda k: k[0])]


def submit(jobs: list, deps: dict, options: dict, log=say) -> dict:
    """Submit every job; {job: submitit job}."""
    import submitit
    handles = {}
    for group in groups(jobs, deps):
        ex = submitit.SlurmExecutor(folder=Path(group[0].folder) / "%j")
        params = slurm_parameters(options, len(jobs))
        ups = {u for j in group for u in deps.get(j, []) if u in handles}
        if ups:
            params["dependency"] = "afterok:" + ":".join(sorted(handles[u].job_id for u in ups))
        ex.update_parameters(job_name=group[0].name or "bilateral", **params)
        with ex.batch():
            submitted = [ex.submit(Requeueable(j.fn, j.resume)) for j in group]
        for j, h in zip(group, submitted):
            handles[j] = h
        what = group[0].key if len(group) == 1 else f"{len(group)} jobs ({group[0].key} ...)"
        log(f"submitted {what} as job {submitted[0].job_id.split('_')[0]}"
            + (f", after {params['dependency']}" if ups else ""))
    return handles


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


def queue_states(job_ids) -> dict:
    """{job id: SLURM state} from squeue (which also lists jobs that ended in the last
    MinJobAge seconds; sacct needs accounting, which a small cluster may lack)."""
    mains = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(mains)],
                         capture_output=True, text=True)
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def settle(handle, state: str, finished: bool = False) -> tuple[str, str, object] | None:
    """(status, error, value) of a submitit job once decided, else None: by its result file
    (ok, or the traceback of its failure), else by a final SLURM state (ok if the work is
    complete anyway)."""
    if handle.paths.result_pickle.exists():
        try:
            return "ok", "", handle.result()
        except Exception as e:  # noqa: BLE001 - the job's own traceback
            return "failed", tail(str(e)), None
    if state in TERMINAL or not state and finished:
        if finished:
            return "ok", "", None
        log = handle.paths.stderr
        where = f"; see {log}" if Path(log).exists() else " before it wrote a log"
        return "failed", f"job {handle.job_id} ended {state or 'without a trace'} and left no result{where}", None
    return None


def state_of(states: dict, handle) -> str:
    return (states.get(handle.job_id) or "").split(" ")[0]


def wait(handles: dict, deps: dict, log=say, poll: float = 2.0) -> list[Outcome]:
    """Wait for every job; the dependants of a failed job, cancelled by SLURM, are reported as
    skipped."""
    done, t0, n = {}, time.perf_counter(), len(handles)
    while len(done) < n:
        states = queue_states([h.job_id for j, h in handles.items() if j not in done])
        for j, h in handles.items():  # submission order: upstream jobs first
            if j in done:
                continue
            state = state_of(states, h)
            ups = deps.get(j, [])
            if state == "CANCELLED" and any(u not in done for u in ups):
                continue  # decide the upstream job first
            settled = settle(h, state, finished=bool(j.done and j.done()))
            if settled is None:
                continue
            status, error, value = settled
            secs = value if isinstance(value, (int, float)) else time.perf_counter() - t0
            o = Outcome(j, status, secs, error, log=str(h.paths.stdout), job_id=h.job_id, value=value)
            bad = [u.key for u in ups if done[u].status != "ok"] if status == "failed" else []
            if bad and state == "CANCELLED":
                o.status, o.error = "skipped", f"upstream job {', '.join(bad)} did not finish"
            done[j] = report(o, len(done) + 1, n, log)
        if len(done) < n:
            time.sleep(poll)
    return [done[j] for j in handles]


def run(jobs: list, deps: dict, options: dict | None = None, log=say) -> list[Outcome]:
    """Every job as a SLURM job, after those it depends on; their outcomes, in order."""
    if not jobs:
        return []
    handles = wait(submit(jobs, deps, options or {}, log), deps, log)
    by_job = {o.job: o for o in handles}
    return [by_job[j] for j in jobs]
