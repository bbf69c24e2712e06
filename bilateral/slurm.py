"""The SLURM executor of `python -m bilateral sweep` (and of `run --executor slurm`), through
submitit: the submitting process needs no GPU, each run is one job.

- Runs that wait for the same upstream runs go as one submission, a job array when there are
  several (at most `max_parallel` of it running at once); a dependant waits with
  `--dependency=afterok:<its upstream jobs>`, and is cancelled by SLURM when one of them fails
  (kill-on-invalid-dep), which the summary reports as skipped.
- A job is signalled (USR2) before its time limit or on preemption: submitit calls
  `TrainJob.checkpoint`, requeues the job, and the requeued job resumes the run from its last
  epoch checkpoint (checkpoint.pt, which the training loop writes after every epoch).
- Logs and submitit's files go to outputs/<experiment>/jobs/<job id>/ (a shared filesystem).
- The waiting side reads job states with squeue (sacct needs accounting, which a small cluster
  may lack) and each job's result file (its return value or its traceback).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .sweep import Outcome, _report, jobs_dir, needs, say, tail


class TrainJob:
    """What a SLURM job runs: one run. submitit calls `checkpoint` when the job is signalled
    before its time limit or preempted, requeues the job, and the requeued job calls this
    again: the run then resumes from its last epoch checkpoint (never with force, which would
    clear it)."""

    def __init__(self, run, force: bool = False):
        self.run, self.force = run, force

    def __call__(self):
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and not self.run.cfg.threads:  # without cgroups torch would see every core
            import torch
            torch.set_num_threads(int(cpus))
        self.run.train(force=self.force)
        return self.run.key

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.run, force=False))


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


def _groups(todo: list) -> list[list]:
    """Runs that wait for the same upstream runs, by dependency level: each is one submission
    (a job array when it holds more than one run)."""
    deps, level, groups = needs(todo), {}, {}
    for r in todo:
        ups = tuple(deps[r])
        level[r] = 1 + max((level[u] for u in ups), default=-1)
        groups.setdefault((level[r], r.cfg.experiment, tuple(u.key for u in ups)), []).append(r)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]


def submit(todo: list, retrain: set, options: dict, log=say) -> dict:
    """Submit every run of `todo`; {run: submitit job}."""
    import submitit
    jobs, deps = {}, needs(todo)
    for group in _groups(todo):
        folder = jobs_dir(group[0]) / "%j"
        ex = submitit.SlurmExecutor(folder=folder)
        params = slurm_parameters(options, len(todo))
        ups = {u for r in group for u in deps[r] if u in jobs}
        if ups:
            params["dependency"] = "afterok:" + ":".join(sorted(jobs[u].job_id for u in ups))
        ex.update_parameters(job_name=f"{group[0].cfg.experiment}:{group[0].stage}", **params)
        with ex.batch():
            submitted = [ex.submit(TrainJob(r, r in retrain)) for r in group]
        for r, job in zip(group, submitted):
            jobs[r] = job
        what = group[0].key if len(group) == 1 else f"{len(group)} runs ({group[0].stage} ...)"
        log(f"submitted {what} as job {submitted[0].job_id.split('_')[0]}"
            + (f", after {params['dependency']}" if ups else ""))
    return jobs


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


def queue_states(job_ids) -> dict:
    """{job id: SLURM state} from squeue (which also lists jobs that ended in the last
    MinJobAge seconds; sacct needs accounting, which a small cluster may lack)."""
    mains = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(mains)],
                         capture_output=True, text=True)
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def settle(job, state: str, finished: bool = False) -> tuple[str, str] | None:
    """(status, error) of a submitit job once decided, else None: by its result file (ok, or the
    traceback of its failure), else by a final SLURM state (ok if the run finished anyway)."""
    if job.paths.result_pickle.exists():
        try:
            job.result()
            return "ok", ""
        except Exception as e:  # noqa: BLE001 - the job's own traceback
            return "failed", tail(str(e))
    if state in TERMINAL or not state and finished:
        if finished:
            return "ok", ""
        return "failed", (f"job {job.job_id} ended {state or 'without a trace'} and left no "
                          f"result; see {job.paths.stderr}")
    return None


def _state(states: dict, job) -> str:
    return (states.get(job.job_id) or "").split(" ")[0]


def wait(jobs: dict, log=say, poll: float = 2.0) -> list[Outcome]:
    """Wait for every run's job; the dependants of a failed job, cancelled by SLURM, are
    reported as skipped."""
    done, t0, n, deps = {}, time.perf_counter(), len(jobs), needs(list(jobs))
    while len(done) < n:
        states = queue_states([j.job_id for r, j in jobs.items() if r not in done])
        for r, job in jobs.items():  # submission order: upstream runs first
            if r in done:
                continue
            state = _state(states, job)
            ups = deps[r]
            if state == "CANCELLED" and any(u not in done for u in ups):
                continue  # decide the upstream job first
            settled = settle(job, state, finished=r.status() == "finished")
            if settled is None:
                continue
            secs = (r.metrics() or {}).get("wall_s", time.perf_counter() - t0)
            o = Outcome(r, settled[0], secs, settled[1],
                        log=str(job.paths.stdout), job_id=job.job_id)
            bad = [u.key for u in ups if done[u].status != "ok"] if o.status == "failed" else []
            if bad and state == "CANCELLED":
                o.status, o.error = "skipped", f"upstream run {', '.join(bad)} did not finish"
            done[r] = _report(o, len(done) + 1, n, log)
        if len(done) < n:
            time.sleep(poll)
    return [done[r] for r in jobs]


def run_slurm(todo: list, retrain: set, options: dict, log=say) -> list[Outcome]:
    if not todo:
        return []
    return wait(submit(todo, retrain, options, log), log)


def _chain_on_node(kw):
    """One seed's notebook chain inside a SLURM job, with the kernel pinned on that node."""
    import tempfile
    from . import pipeline
    with tempfile.TemporaryDirectory(prefix="bilateral-kernel-") as d:
        pipeline.pin_kernel(d)
        return pipeline.run_chain(**kw)


def run_chains_slurm(chains: list[dict], options: dict, folder: Path, log=say) -> list:
    """The notebook chains of `pipeline.run`, one SLURM job per seed (a job array); a chain
    whose job died comes back as failed notebooks."""
    import submitit
    from . import pipeline
    ex = submitit.SlurmExecutor(folder=Path(folder) / "%j")
    ex.update_parameters(job_name="notebooks", **slurm_parameters(options, len(chains)))
    with ex.batch():
        jobs = [ex.submit(_chain_on_node, dict(kw, env={})) for kw in chains]
    log(f"submitted the notebooks of {len(chains)} seed(s) as job {jobs[0].job_id.split('_')[0]}")
    results, pending = {}, dict(enumerate(jobs))
    while pending:
        states = queue_states([j.job_id for j in pending.values()])
        for i, job in list(pending.items()):
            settled = settle(job, _state(states, job))
            if settled is None:
                continue
            del pending[i]
            if settled[0] == "ok":
                results[i] = job.result()
            else:
                kw = chains[i]
                results[i] = [pipeline.Result(nb, kw["seed"], "failed", error=settled[1].splitlines()[-1],
                                              output=str(job.paths.stderr)) for nb in kw["notebooks"]]
        time.sleep(2 if pending else 0)
    return [r for i in sorted(results) for r in results[i]]
