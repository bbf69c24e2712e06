"""The local executor: jobs on this machine, each in a worker process of its own.

`run(jobs, deps, {"workers": N})` starts a job once every job it depends on succeeded, the
ready job of highest priority first (jobs.priorities), at most N at a time; worker i gets its
share of the CPU threads or its own GPU (jobs.worker_env) before anything imports torch. With
N = 1 the jobs run in this process, one after another.

A worker is a fresh `python -m bilateral.execute.worker` process per job: one that dies (out
of memory, a signal) fails its own job only, with the signal in the summary, and the next job
gets a fresh process; workers die with the executor (PR_SET_PDEATHSIG), however it is stopped.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .jobs import Outcome, priorities, report, say, skip_reason, tail, worker_env

POLL = 0.2  # seconds between looks at the running workers
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def run(jobs: list, deps: dict, options: dict | None = None, log=say) -> list[Outcome]:
    """Every job of `jobs`, each after those `deps[job]` lists; their outcomes, in order."""
    workers = max(1, int((options or {}).get("workers", 1)))
    rank = priorities(jobs, deps)
    waiting, done = sorted(jobs, key=lambda j: -rank[j]), {}
    pool = Workers(workers) if workers > 1 else None
    try:
        while waiting or (pool and pool.running):
            for j in list(waiting):  # highest priority first; a job waits for its dependencies
                why = skip_reason(j, deps, done)
                if why:
                    done[j] = report(Outcome(j, "skipped", error=why), len(done) + 1, len(jobs), log)
                elif all(u in done for u in deps.get(j, [])) and (pool is None or pool.free()):
                    if pool is None:
                        log(f"[{len(done) + 1}/{len(jobs)}] {j.key} ...")
                        done[j] = report(call_here(j), len(done) + 1, len(jobs), log)
                    else:
                        pool.start(j)
                else:
                    continue
                waiting.remove(j)
            if pool:
                for o in pool.wait():
                    done[o.job] = report(o, len(done) + 1, len(jobs), log)
    finally:
        if pool:
            pool.close()
    return [done[j] for j in jobs]


def call_here(job) -> Outcome:
    """Run a job in this process, its output to job.log; a failure comes back as an Outcome."""
    t0 = time.perf_counter()
    out = Outcome(job, "ok", log=job.log)
    with contextlib.ExitStack() as stack:
        if job.log:
            Path(job.log).parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(job.log, "a"))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        try:
            out.value = job.fn()
        except Exception:  # noqa: BLE001 - one failed job must not stop the others
            text = traceback.format_exc()
            print(text, flush=True)
            out.status, out.error = "failed", tail(text)
    out.seconds = time.perf_counter() - t0
    return out


class Workers:
    """At most n worker processes, one job each; slot i keeps worker i's environment."""

    def __init__(self, n: int):
        self.n, self.running, self.count = n, {}, 0
        self.dir = tempfile.TemporaryDirectory(prefix="bilateral-jobs-")

    def free(self) -> bool:
        return len(self.running) < self.n

    def start(self, job):
        slot = min(set(range(self.n)) - {s for _, s, *_ in self.running.values()})
        self.count += 1
        base = Path(self.dir.name) / str(self.count)
        with open(f"{base}.job", "wb") as f:
            pickle.dump(job.fn, f)
        out = None
        if job.log:
            Path(job.log).parent.mkdir(parents=True, exist_ok=True)
            out = open(job.log, "a")
        env = dict(os.environ, **worker_env(slot, self.n))
        env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT] + [p for p in [env.get("PYTHONPATH")] if p])
        p = subprocess.Popen([sys.executable, "-m", "bilateral.execute.worker", f"{base}.job",
                              f"{base}.result", str(os.getpid())], env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT if out else None)
        self.running[p] = (job, slot, time.perf_counter(), f"{base}.result", out)

    def wait(self) -> list[Outcome]:
        """The outcomes of the workers that ended (waits until one does)."""
        while True:
            ended = [p for p in self.running if p.poll() is not None]
            if ended:
                return [self.collect(p) for p in ended]
            time.sleep(POLL)

    def collect(self, p) -> Outcome:
        job, _, t0, result, out = self.running.pop(p)
        if out:
            out.close()
        o = Outcome(job, "ok", time.perf_counter() - t0, log=job.log)
        try:
            with open(result, "rb") as f:
                status, value = pickle.load(f)  # written by our own worker
        except (OSError, EOFError, pickle.UnpicklingError):
            code = p.returncode
            why = (f"killed by signal {signal.Signals(-code).name}" if code < 0
                   else f"exit code {code}")
            o.status, o.error = "failed", (f"its worker process died ({why}) without a result"
                                           + (f"; see {job.log}" if job.log else ""))
            return o
        if status == "ok":
            o.value = value
        else:
            o.status, o.error = "failed", tail(value)
        return o

    def close(self):
        """Stop every worker still running (an interrupted executor) and remove the files."""
        for p, (_, _, _, _, out) in list(self.running.items()):
            with contextlib.suppress(OSError):
                p.kill()
            p.wait()
            if out:
                out.close()
        self.running.clear()
        self.dir.cleanup()
