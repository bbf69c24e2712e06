"""`python -m bilateral sweep`: train the runs of a plan on local worker processes or a SLURM
cluster, one job per run (or per packed group of runs, see `pack`), each after its upstream
runs succeeded.

Read top to bottom:
1. `to_train`: what a sweep trains (plan.pending: not finished, or downstream of such a run)
   and which of those are retrained (stale, or built on a run being retrained: --force).
2. `estimate`: how many trainings and how long on this device (Run.cost() x a measured second
   per ResNet-9 epoch), printed before any work.
3. `run_local`: N spawned worker processes, each with its share of the CPU threads or its own
   GPU; a run is handed out once its upstream runs are ok.
   (bilateral/slurm.py: the SLURM executor, through submitit.)
4. `sweep`: the above, a summary (a failed job's traceback, its dependants skipped), the exit
   code; `expand_grid` turns `--grid key=v1,v2` into one experiment per combination.
Nothing here imports torch at module level: spawned workers set their threads and GPU first.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

from . import config as C

EXECUTORS = ("local", "slurm")
TAIL = 12  # traceback lines a summary keeps of a failed job


@dataclasses.dataclass
class Outcome:
    run: object             # plan.Run
    status: str             # ok, failed, skipped (an upstream run failed)
    seconds: float = 0.0
    error: str = ""         # the last lines of the traceback, or why it was skipped
    log: str = ""           # the job's log file
    job_id: str = ""        # SLURM job id


def say(msg):
    print(msg, flush=True)


def tail(text: str, n: int = TAIL) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# ----------------------------------------------------------------------- 1. what to train

def to_train(runs: list, force: bool = False) -> tuple[list, set]:
    """(runs to train in dependency order, those among them that are retrained and need force).

    Retrained: a run with a record that is stale, or finished/in progress on an upstream run
    that this sweep trains (its record would go stale). Without force they stop the sweep
    before any work, named, as `train` does for one run."""
    from . import plan
    todo = plan.pending(runs)
    todo_set = set(todo)
    retrain = {r for r in todo if r.status() == "stale"
               or r.status() != "missing" and any(u in todo_set for u in r.upstream())}
    if retrain and not force:
        names = "\n  ".join(f"{r.key} ({r.status().replace('_', ' ')})" for r in todo if r in retrain)
        raise C.ConfigError(f"{len(retrain)} run(s) would be retrained (stale, or built on runs "
                            f"this sweep trains):\n  {names}\nrerun with --force to retrain them")
    return todo, retrain


def jobs_of(todo: list, retrain: set) -> tuple[list, set]:
    """(the jobs of a sweep, those forced): one per run, but where packing is on the runs that
    packed.packable_groups puts together (a run across seeds, a seed's pool) are one job, a
    packed.Group, that trains them as one packed model."""
    from . import packed
    jobs = [g[0] if len(g) == 1 else packed.Group(tuple(g), frozenset(r for r in g if r in retrain))
            for g in packed.packable_groups(todo)]
    return jobs, {j for j in jobs if any(r in retrain for r in members(j))}


def members(job) -> list:
    return list(getattr(job, "runs", [job]))


def needs(jobs: list) -> dict:
    """{job: the jobs it waits for}: those that train its runs' upstream runs."""
    job_of = {r: j for j in jobs for r in members(j)}
    return {j: list(dict.fromkeys(job_of[u] for r in members(j) for u in r.upstream()
                                  if u in job_of and job_of[u] is not j)) for j in jobs}


def priorities(jobs: list, deps: dict) -> dict:
    """{job: its estimated cost (plan.Run.cost) plus the costliest chain of jobs that wait on
    it}. Workers take the ready job of highest priority, so the long chains start first and no
    long job is left to run alone at the end while the other workers idle."""
    after = {j: [] for j in jobs}
    for j, ds in deps.items():
        for d in ds:
            after[d].append(j)
    rank = {}
    for j in reversed(_topological(jobs, deps)):
        rank[j] = sum(r.cost() for r in members(j)) + max((rank[k] for k in after[j]), default=0.0)
    return rank


def _topological(jobs: list, deps: dict) -> list:
    out, seen = [], set()

    def visit(j):
        if j not in seen:
            seen.add(j)
            for d in deps[j]:
                visit(d)
            out.append(j)
    for j in jobs:
        visit(j)
    return out


def per_run(outcomes: list) -> list:
    """A packed job's outcome as each of its runs' outcome."""
    return [dataclasses.replace(o, run=r) for o in outcomes for r in members(o.run)]


# --------------------------------------------------------------------------- 2. estimate

def train_size(cfg) -> int:
    """Training images per epoch (the split's size; a table, so that no data is read)."""
    total, n_fine, val = {"cifar100": (50000, 100, 5000), "fashion_mnist": (60000, 10, 5000),
                          "synthetic": (cfg.synthetic_size, 10, cfg.synthetic_size // 10)}[cfg.dataset]
    n = total - (val if cfg.val_size is None else cfg.val_size)
    return min(n, cfg.subset_per_class * n_fine) if cfg.subset_per_class else n


def seconds_per_epoch(cfg, device, steps: int = 2) -> float:
    """One ResNet-9 training epoch at the config's width and batch size on `device`, from a few
    timed steps on random images (on a CPU at a smaller batch, scaled: time grows with it)."""
    import torch
    from . import models, train
    hp = train.hyper(cfg, "unilateral")
    bs = hp.batch_size if device.type != "cpu" else min(hp.batch_size, 16)
    model = models.Unilateral(models.build_backbone("resnet9", cfg.width), 100, 20).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(bs, 3, 32, 32, device=device)
    batch = {"fine": torch.randint(0, 100, (bs,), device=device),
             "coarse": torch.randint(0, 20, (bs,), device=device)}
    ctx, _ = train.autocast(device, cfg.amp)
    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)  # as the runs will train
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        with ctx:
            loss = train.loss_fn(model(x), batch, ("fine", "coarse"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    per_image = min(times[1:]) / bs
    return per_image * train_size(cfg)


def estimate(todo: list, cfg, device=None, workers: int = 1) -> str:
    """What a sweep prints before any work: trainings, ResNet-9 epochs, and the time on this
    device; a warning when a GPU-sized preset is about to train on a CPU."""
    from . import train
    if not todo:
        return "nothing to train: every run of the plan is finished"
    device = device or train.pick_device(cfg.device)
    cost = sum(r.cost() for r in todo)
    first = {}  # one measurement per experiment (the points of a grid differ in width ...)
    for r in todo:
        first.setdefault(r.cfg.experiment, r.cfg)
    sec = {e: seconds_per_epoch(c, device) for e, c in first.items()} if cost else {}
    total = sum(r.cost() * sec.get(r.cfg.experiment, 0.0) for r in todo)
    per = " to ".join(dict.fromkeys(f"{v:.1f}s" for v in sorted(sec.values()))) or "0s"
    lines = [f"{len(todo)} trainings to run, {cost:,.1f} ResNet-9 epochs; on {device} one epoch "
             f"takes about {per} (measured), so about {_hms(total)} of training in all"
             + (f", about {_hms(total / workers)} on {workers} workers at best" if workers > 1 else "")]
    if device.type == "cpu" and cfg.dataset == "cifar100" and cfg.width >= 0.5:
        lines.append(f"warning: this preset (CIFAR-100 at width {cfg.width:g}) is sized for a GPU "
                     f"and this device is a CPU; on a CPU use params/fashion_mnist.yaml")
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- 3. local

def _init_worker(envs):
    """A spawned worker takes one environment (threads, GPU) before torch is imported."""
    os.environ.update(envs.get())


def train_one(run, force: bool, log_path=None) -> Outcome:
    """Train one run, its output to log_path; failures come back as an Outcome, not raised."""
    t0 = time.perf_counter()
    out = Outcome(run, "ok", log=str(log_path or ""))
    with contextlib.ExitStack() as stack:
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(log_path, "a"))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        try:
            run.train(force=force)
        except Exception:  # noqa: BLE001 - one failed run must not stop the others
            text = traceback.format_exc()
            print(text, flush=True)
            out.status, out.error = "failed", tail(text)
    out.seconds = time.perf_counter() - t0
    return out


def jobs_dir(run) -> Path:
    return Path(run.cfg.out_dir) / run.cfg.experiment / "jobs"


def _skip_reason(run, deps, done) -> str | None:
    bad = [u.key for u in deps[run] if u in done and done[u].status != "ok"]
    return f"upstream run {', '.join(bad)} did not finish" if bad else None


def run_local(todo: list, retrain: set, jobs: int = 1, log=say) -> list[Outcome]:
    """Every run of `todo` on `jobs` worker processes (in this process for jobs=1)."""
    from .pipeline import seed_env
    deps = needs(todo)
    rank = priorities(todo, deps)
    waiting, done, running = sorted(todo, key=lambda j: -rank[j]), {}, {}
    pool = None
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        envs = ctx.Queue()
        for i in range(jobs):
            envs.put(seed_env(i, jobs))
        pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                      initargs=(envs,))
    try:
        while waiting or running:
            for r in list(waiting):  # highest priority first; a run waits for its upstream runs
                why = _skip_reason(r, deps, done)
                if why:
                    done[r] = _report(Outcome(r, "skipped", error=why), len(done) + 1, len(todo), log)
                elif all(u in done for u in deps[r]) and len(running) < jobs:
                    args = (r, r in retrain, jobs_dir(r) / "local" / f"{r.key.replace('/', '_')}.log")
                    if pool is None:
                        log(f"[{len(done) + 1}/{len(todo)}] {r.key} ...")
                        done[r] = _report(train_one(*args), len(done) + 1, len(todo), log)
                    else:
                        running[pool.submit(train_one, *args)] = r
                else:
                    continue
                waiting.remove(r)
            if running:
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    r = running.pop(fut)
                    try:
                        done[r] = fut.result()
                    except Exception as e:  # noqa: BLE001 - a worker died (memory, signal)
                        done[r] = Outcome(r, "failed", error=f"worker process died: {e!r}")
                    _report(done[r], len(done), len(todo), log)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return [done[r] for r in todo]


def _report(o: Outcome, i: int, n: int, log) -> Outcome:
    log(f"[{i}/{n}] {o.run.key} {o.status} ({o.seconds:.0f}s)"
        + (f": {o.error.splitlines()[-1]}" if o.error else ""))
    return o


# ------------------------------------------------------------------- 4. sweep and grids

def parse_grid(items) -> dict:
    """`--grid key=v1,v2` (repeatable) -> {key: [v1, v2]}; values are read as YAML, so
    `--grid conditions=[A],[A,B]` gives two lists."""
    import yaml
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not raw.strip():
            raise C.ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        out[key.strip()] = yaml.safe_load(f"[{raw}]")
    return out


def _fmt(v) -> str:
    return ",".join(map(_fmt, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def expand_grid(params, overrides=None, grid=None) -> list[tuple[C.Config, dict]]:
    """(config, grid point) of every combination of the grid (the params file's `grid:`, with
    `--grid` replacing its keys); each point is its own experiment, named after the point,
    e.g. fashion_mnist-width=0.25. Without a grid: the config alone."""
    overrides = dict(C.parse_overrides(overrides))
    base = C.load(params, overrides)
    full = {**base.grid, **parse_grid(grid)}
    base = C.load(params, {**overrides, "grid": full})  # validates the grid's keys and values
    if not full:
        return [(base, {})]
    keys, out = list(full), []
    for values in itertools.product(*(full[k] for k in keys)):
        point = dict(zip(keys, values))
        name = base.experiment + "-" + "-".join(f"{k}={_fmt(v)}" for k, v in point.items())
        out.append((C.load(params, {**overrides, **point, "grid": {}, "experiment": name}), point))
    return out


def summary(outcomes: list[Outcome]) -> str:
    w = max([len(o.run.key) for o in outcomes] + [3])
    lines = [f"{'run':<{w}}  {'status':<7}  {'time':>6}  log"]
    for o in outcomes:
        where = (f"job {o.job_id}: " if o.job_id else "") + o.log
        lines.append(f"{o.run.key:<{w}}  {o.status:<7}  {o.seconds:5.0f}s  {where}".rstrip())
    for o in outcomes:
        if o.status != "ok":
            lines += ["", f"{o.run.key} {o.status}:", *("    " + x for x in o.error.splitlines())]
    count = {k: sum(o.status == k for o in outcomes) for k in ("ok", "failed", "skipped")}
    lines += ["", f"{count['ok']} of {len(outcomes)} trainings ran" +
              (f"; {count['failed']} failed, {count['skipped']} skipped" if len(outcomes) > count["ok"] else "")]
    return "\n".join(lines)


def absolute_dirs(params, overrides) -> dict:
    """overrides with out_dir and data_dir made absolute: jobs may start in another folder."""
    overrides = dict(C.parse_overrides(overrides))
    cfg = C.load(params, overrides)
    for key in ("out_dir", "data_dir"):
        overrides[key] = str(Path(getattr(cfg, key)).resolve())
    return overrides


def announce(cfg, seeds, workers: int = 1, log=say):
    """The plan's size and the estimate, for `python -m bilateral run` (local)."""
    from . import plan
    runs = plan.plan(cfg, seeds)
    todo = plan.pending(runs)
    log(f"{len(runs)} runs in the plan, {len(runs) - len(todo)} finished")
    log(estimate(todo, cfg, workers=workers))


def sweep(params, seeds=(0,), executor="local", jobs=1, slurm=None, overrides=None, grid=None,
          force=False, log=say, command=None) -> tuple[int, list[Outcome]]:
    """Everything `python -m bilateral sweep` does; (exit code, outcomes)."""
    from . import pipeline, plan
    from . import slurm as slurm_executor
    if executor not in EXECUTORS:
        raise C.ConfigError(f"--executor: unknown value {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise C.ConfigError(f"--jobs must be at least 1, got {jobs}")
    overrides = absolute_dirs(params, overrides)
    points = expand_grid(params, overrides, grid)
    options = {**points[0][0].slurm, **(slurm or {})}
    C.load(params, {**overrides, "slurm": options})  # the command line's options checked too
    if executor == "slurm" and not shutil.which("sbatch"):
        raise C.ConfigError("--executor slurm: no SLURM here (sbatch not found); "
                            "use --executor local, or start one with scripts/slurm-up.sh")
    for cfg in {(c.dataset, c.data_dir): c for c, _ in points}.values():
        pipeline.check_data(cfg)
    seeds = plan.parse_seeds(seeds)
    runs = [r for cfg, _ in points for r in plan.plan(cfg, seeds)]
    todo, retrain = to_train(runs, force)
    log(f"{len(points)} experiment(s) ({', '.join(c.experiment for c, _ in points)}), seeds "
        f"{', '.join(map(str, seeds))}: {len(runs)} runs, {len(runs) - len(todo)} finished")
    workers = jobs if executor == "local" else options.get("max_parallel", len(todo) or 1)
    log(estimate(todo, points[0][0], workers=workers))
    t0 = time.perf_counter()
    units, forced = jobs_of(todo, retrain)
    outcomes = per_run(run_local(units, forced, jobs, log) if executor == "local"
                       else slurm_executor.run_slurm(units, forced, options, log))
    text = summary(outcomes) + f"\nwall time {time.perf_counter() - t0:.0f}s" if todo else "nothing to do"
    if command:
        text = f"command: {command}\n{text}"
    from .runs import atomic_write_bytes
    for cfg, _ in points:
        atomic_write_bytes(Path(cfg.out_dir) / cfg.experiment / "jobs" / "summary.txt", (text + "\n").encode())
    log("\n" + text)
    code = 0 if all(o.status == "ok" for o in outcomes) else 1
    if len(points) > 1 and code == 0:
        from . import results
        out = Path(points[0][0].out_dir) / f"{C.load(params, overrides).experiment}-grid"
        results.grid_report([(Path(c.out_dir) / c.experiment, p) for c, p in points], out)
    return code, outcomes


def slurm_options(a) -> dict:
    """The `slurm:` options given on the command line (--partition ... --max-parallel)."""
    opts = dict(partition=a.partition, time=a.time, gpus=a.gpus, cpus=a.cpus,
                mem_gb=_mem_gb(a.mem) if a.mem else None, max_parallel=a.max_parallel)
    return {k: v for k, v in opts.items() if v is not None}


def _mem_gb(text: str) -> float:
    """'16G', '16GB', '512M' or '16' (GB) per job."""
    t = str(text).strip().upper().removesuffix("B")
    scale = {"G": 1, "M": 1 / 1024, "T": 1024}.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise C.ConfigError(f"--mem: expected a size such as 16G or 512M, got {text!r}") from None


def main(a) -> int:
    code, _ = sweep(a.params, seeds=a.seeds, executor=a.executor, jobs=a.jobs,
                    slurm=slurm_options(a), overrides=a.overrides, grid=a.grid, force=a.force,
                    command="python -m bilateral " + shlex.join(sys.argv[1:]))
    return code
