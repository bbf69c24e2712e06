"""`python -m bilateral sweep`: train the runs of a plan on local worker processes or a SLURM
cluster, one job per run (or per packed group of runs, see `pack`), each after its upstream
runs succeeded.

Read top to bottom:
1. `to_train`: what a sweep trains (plan.pending: not finished, or downstream of such a run)
   and which of those are retrained (stale, or built on a run being retrained: --force).
2. `make_jobs`: the runs as jobs for an executor (execute/): one per run or packed group, each
   a call of `train_job`, with the jobs it waits for.
3. `estimate`: how many trainings and how long on this device, printed before any work: per
   run from the finished records of the same stage on this machine at this width and batch
   (`calibration`), else Run.cost() x a measured second per ResNet-9 epoch; a wsd branch costs
   only its decay epochs.
4. `sweep`: the above, an executor (execute.EXECUTORS) running the jobs, a summary (a failed
   job's traceback, its dependants skipped), the exit code; `expand_grid` turns
   `--grid key=v1,v2` into one experiment per combination.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from . import config as C
from . import data, models, plan, results, runner, runs, train
from .execute import EXECUTORS, Job
from .execute import slurm as slurm_executor
from .execute.jobs import hms, say



@dataclasses.dataclass
class RunOutcome:
    """How one run of a sweep went (a packed job's outcome is each of its runs')."""
    run: object             # plan.Run
    status: str             # ok, failed, skipped (an upstream run failed)
    seconds: float = 0.0
    error: str = ""
    log: str = ""
    job_id: str = ""


# ----------------------------------------------------------------------- 1. what to train

def to_train(runs: list, force: bool = False) -> tuple[list, set]:
    """(runs to train in dependency order, those among them that are retrained and need force).

    Retrained: a run with a record that is stale, or finished/in progress on an upstream run
    that this sweep trains (its record would go stale). Without force they stop the sweep
    before any work, named, as `train` does for one run."""
    todo = plan.pending(runs)
    todo_set = set(todo)
    retrain = {r for r in todo if r.status() == "stale"
               or r.status() != "missing" and any(u in todo_set for u in r.upstream())}
    if retrain and not force:
        names = "\n  ".join(f"{r.key} ({r.status().replace('_', ' ')})" for r in todo if r in retrain)
        raise C.ConfigError(f"{len(retrain)} run(s) would be retrained (stale, or built on runs "
                            f"this sweep trains):\n  {names}\nrerun with --force to retrain them")
    return todo, retrain


# ------------------------------------------------------------------------------ 2. jobs

def train_job(group: tuple, forces: tuple, precisions: tuple = ()) -> float:
    """What one job of a sweep runs (in a worker process or a SLURM job): the runs of `group`
    (one run, or one packed group) through runner.train_runs; a run that another live process holds
    is waited for, not refused. `precisions`: the sweep's measured `precision: auto` decisions
    (train.PRECISION_DECISIONS items), so that a worker trains in what the sweep decided rather
    than measuring again. Returns the training's seconds."""
    train.PRECISION_DECISIONS.update(dict(precisions))
    t0 = time.perf_counter()
    runner.train_runs(list(group), list(forces), log=say, wait=True)
    return time.perf_counter() - t0


def all_finished(group: tuple) -> bool:
    return all(r.status() == "finished" for r in group)


def jobs_dir(cfg) -> Path:
    return runs.experiment_dir(cfg) / "jobs"


def make_jobs(todo: list, retrain: set, executor: str = "local", precisions: tuple = ()) -> tuple[list, dict, dict]:
    """(jobs, {job: the jobs it waits for}, {job: its runs}): one job per run, but where packing
    is on the runs that runner.packable_groups puts together (a run across seeds, a seed's
    pool) are one job that trains them as one packed model."""
    jobs, runs_of = [], {}
    for g in runner.packable_groups(todo):
        g = tuple(g)
        key = g[0].key if len(g) == 1 else f"{g[0].key}+{len(g) - 1}"
        folder = jobs_dir(g[0].cfg)
        job = Job(key, functools.partial(train_job, g, tuple(r in retrain for r in g), precisions),
                  resume=functools.partial(train_job, g, (False,) * len(g), precisions),
                  cost=sum(r.cost() for r in g), folder=str(folder),
                  log=str(folder / "local" / f"{key.replace('/', '_')}.log") if executor == "local" else "",
                  name=f"{g[0].cfg.experiment}:{g[0].stage}", array=g[0].cfg.experiment,
                  done=functools.partial(all_finished, g))
        jobs.append(job)
        runs_of[job] = g
    job_of = {r: j for j in jobs for r in runs_of[j]}
    by_place = {(str(runs.experiment_dir(r.cfg)), r.stage, r.name, r.seed): r for r in job_of}
    deps = {}
    for j in jobs:
        ups = [u for r in runs_of[j] for u in r.upstream()]
        ups += [by_place.get((r.cfg.branch_from, r.stage, r.name, r.seed))  # its wsd trunk
                for r in runs_of[j] if r.cfg.branch_from]
        deps[j] = list(dict.fromkeys(job_of[u] for u in ups if u in job_of and job_of[u] is not j))
    return jobs, deps, runs_of


# --------------------------------------------------------------------------- 3. estimate

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
    hp = train.hyper(cfg, "unilateral")
    bs = hp.batch_size if device.type != "cpu" else min(hp.batch_size, 16)
    model = models.Unilateral(models.build_backbone("resnet9", cfg.width), 100, 20).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(bs, 3, 32, 32, device=device)
    batch = {"fine": torch.randint(0, 100, (bs,), device=device),
             "coarse": torch.randint(0, 20, (bs,), device=device)}
    prec = "fp32" if cfg.precision == "auto" and device.type == "cpu" else cfg.precision
    ctx, _ = train.autocast(device, prec)
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


def trained_epochs(epochs: int, hyper: dict, branched: bool) -> int:
    """Epochs a run trains itself: a wsd run branched from a longer one (branch_from) starts
    at its decay (runner.branch), so it trains only its decay epochs."""
    if branched and hyper.get("schedule") == "wsd":
        return epochs - train.decay_start(epochs, hyper.get("decay_frac", 0.2))
    return epochs


def machine(device) -> str:
    """This machine as run records name it: the CPU model and its cores, or the GPU."""
    if device.type == "cuda":
        return runs.provenance(device)["device"].partition(" ")[2] or "cuda"
    return f"{runs.cpu_model()}, {os.cpu_count()} CPUs"


def record_machine(rec: dict) -> str:
    if rec.get("device", "").startswith("cuda"):
        return rec["device"].partition(" ")[2] or "cuda"
    return f"{rec.get('cpu')}, {rec.get('cpu_count')} CPUs"


def cost_key(stage: str, name: str, cfg: dict) -> tuple:
    """Runs that cost the same per image and epoch: one stage and run name (the members of a
    pool as one), width, batch size and precision (a record without one: float32)."""
    if stage == "unilateral":
        name = cfg.get("backbone", name)
    hyper = cfg.get("hyper") or {}
    return stage, name, cfg.get("width"), hyper.get("batch_size"), cfg.get("precision", "fp32")


def calibration(out_dir, device) -> dict:
    """{cost_key: [seconds per epoch per training image]} of every finished run under out_dir
    (every experiment) trained on this machine (machine(): the same CPU model and core count,
    or GPU): its wall_s over the epochs it trained itself (trained_epochs) and its n_train.
    An ensemble (no epochs): its seconds per run. Records of other machines are left out."""
    here, out = machine(device), {}
    for m in sorted(Path(out_dir).glob("*/*/*/seed=*/metrics.json")):
        try:
            rec = runs.read_json(m.with_name("config.json"))
            met = runs.read_json(m)
        except (OSError, ValueError):
            continue
        kind = str(rec.get("device", "")).split(" ")[0].split(":")[0]
        if kind != device.type or record_machine(rec) != here or "wall_s" not in met:
            continue
        hyper, cfg = rec.get("hyper") or {}, rec.get("config") or {}
        if "branched_at" in met:  # recorded by the run: the epoch its training started from
            epochs = (met.get("epochs") or 0) - met["branched_at"]
        else:  # an older record: a wsd run given branch_from is assumed to have branched
            epochs = trained_epochs(met.get("epochs") or 0, hyper,
                                    bool((rec.get("resolved") or {}).get("branch_from")))
        key = cost_key(rec.get("stage"), rec.get("name"), {**cfg, "hyper": hyper})
        per = met["wall_s"] / (epochs * rec["n_train"]) if epochs and rec.get("n_train") else met["wall_s"]
        out.setdefault(key, []).append(per)
    return out


def run_seconds(r, per_image_epoch: float) -> float:
    """A run's seconds from its stage's calibrated seconds per epoch per image."""
    epochs = trained_epochs(r.epochs(), dataclasses.asdict(train.hyper(r.cfg, r.stage)) if r.epochs() else {},
                            bool(r.cfg.branch_from))
    return per_image_epoch * epochs * train_size(r.cfg) if r.epochs() else per_image_epoch


def estimate(todo: list, cfg, device=None, workers: int = 1) -> str:
    """What a sweep prints before any work: trainings, ResNet-9 epochs, and the time on this
    device, with its basis: per run, the median seconds per epoch per training image of the
    finished records of its stage on this machine at its width, batch and precision
    (`calibration`), else its cost in ResNet-9 epochs (width-1 ratios, models.BACKBONE_COST) x
    a ResNet-9 epoch measured now; a wsd branch counts its decay epochs only. A warning when a
    GPU-sized preset is about to train on a CPU."""
    if not todo:
        return "nothing to train: every run of the plan is finished"
    device = device or train.pick_device(cfg.device)
    cost = sum(r.cost() for r in todo)
    cal = {k: sorted(v)[len(v) // 2] for k, v in calibration(cfg.out_dir, device).items()}
    seconds, from_records, measured = {}, 0, []
    for r in todo:
        hyper = dataclasses.asdict(train.hyper(r.cfg, r.stage)) if r.spec.build else {}  # ensembles: none
        key = cost_key(r.stage, r.name, {**dataclasses.asdict(r.cfg), "precision": runner.precision(r, device),
                                         "hyper": hyper})
        if key in cal:
            seconds[r], from_records = run_seconds(r, cal[key]), from_records + 1
        else:
            measured.append(r)
    first = {}  # one measurement per experiment (the points of a grid differ in width ...)
    for r in measured:
        first.setdefault(r.cfg.experiment, r.cfg)
    sec = {e: seconds_per_epoch(c, device) for e, c in first.items()} \
        if any(r.cost() for r in measured) else {}
    for r in measured:
        share = trained_epochs(r.epochs(), dataclasses.asdict(train.hyper(r.cfg, r.stage)), bool(r.cfg.branch_from)) \
            / r.epochs() if r.epochs() else 1.0
        seconds[r] = r.cost() * share * sec.get(r.cfg.experiment, 0.0)
    total = sum(seconds.values())
    basis = []
    if from_records:
        basis.append(f"{from_records} run(s) from the finished records of their stage on this machine "
                     f"({machine(device)}) at the same width, batch and precision")
    if measured:
        per = " to ".join(dict.fromkeys(f"{v:.1f}s" for v in sorted(sec.values()))) or "0s"
        basis.append(f"{len(measured)} from their cost in ResNet-9 epochs (width-1 ratios) x one "
                     f"ResNet-9 epoch measured now on {device} ({per})")
    lines = [f"{len(todo)} trainings to run, {cost:,.1f} ResNet-9 epochs; about {hms(total)} of "
             f"training in all" + (f", about {hms(total / workers)} on {workers} workers at best" if workers > 1 else "")
             + f" (basis: {'; '.join(basis)})"]
    if device.type == "cpu" and cfg.dataset == "cifar100" and cfg.width >= 0.5:
        lines.append(f"warning: this preset (CIFAR-100 at width {cfg.width:g}) is sized for a GPU "
                     f"and this device is a CPU; on a CPU use params/fashion_mnist.yaml")
    return "\n".join(lines)


# ------------------------------------------------------------------- 4. sweep and grids

def parse_grid(items) -> dict:
    """`--grid key=v1,v2` (repeatable) -> {key: [v1, v2]}; values are read as YAML by the loader
    of `--set` (config.parse_value), so `--grid conditions=[A],[A,B]` gives two lists."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not raw.strip():
            raise C.ConfigError(f"--grid expects key=v1,v2,..., got {C.short(item)}")
        out[key.strip()] = C.parse_value(f"[{raw}]", f"--grid {C.clip(item, 80)}")
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
    return wsd_branches(out)


def wsd_branches(points: list) -> list:
    """A grid over `epochs` under the wsd schedule: the longest budget of each combination of
    the other keys keeps the checkpoints where the shorter ones' decays start, and each shorter
    one branches from it (runner.branch; make_jobs runs it after its trunk). About 1.2 times the
    longest budget instead of the sum of all budgets, and the same numbers."""
    if not any("epochs" in p for _, p in points) or points[0][0].schedule != "wsd":
        return points
    if any(c.stage_epochs for c, _ in points):
        raise C.ConfigError("--grid epochs under schedule wsd: set stage_epochs: {} (a budget grid "
                            "gives every stage the same budgets)")
    groups = {}
    for cfg, p in points:
        groups.setdefault(repr(sorted((k, v) for k, v in p.items() if k != "epochs")), []).append((cfg, p))
    out = []
    for members in groups.values():
        trunk = max(members, key=lambda m: m[0].epochs)[0]
        starts = sorted({train.decay_start(c.epochs, c.decay_frac) for c, _ in members if c is not trunk})
        for cfg, p in members:
            if cfg is trunk:
                cfg = dataclasses.replace(cfg, keep_at=starts)
            else:
                cfg = dataclasses.replace(cfg, branch_from=str(runs.experiment_dir(trunk)))
            out.append((cfg, p))
    return out


def decide(todo: list, points: list, log=say) -> tuple[list, tuple]:
    """What a sweep measures at its start, before any job: `precision: auto` per architecture
    (runner.precision; on a CPU without bf16 instructions nothing is measured) and `pack: auto`
    (runner.decide_packing, written to jobs/packing.json). Returns the runs with pack set to the
    decision (so every worker packs as decided) and the precision decisions for the jobs."""
    for r in todo:
        runner.precision(r, log=log)
    precisions = tuple(train.PRECISION_DECISIONS.items())
    decision = runner.decide_packing(todo, log)
    if decision is not None:
        pack = "on" if decision["pack"] else "off"
        todo = [runner.with_pack(r, pack) if r.cfg.pack == "auto" else r for r in todo]
        for cfg, _ in points:
            runs.write_json(jobs_dir(cfg) / "packing.json", decision)
    return todo, precisions


def summary(outcomes: list[RunOutcome]) -> str:
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
    runs_ = plan.plan(cfg, seeds)
    todo = plan.pending(runs_)
    log(f"{len(runs_)} runs in the plan, {len(runs_) - len(todo)} finished")
    log(estimate(todo, cfg, workers=workers))


def sweep(params, seeds=(0,), executor="local", jobs=1, slurm=None, overrides=None, grid=None,
          force=False, log=say, command=None) -> tuple[int, list[RunOutcome]]:
    """Everything `python -m bilateral sweep` does; (exit code, outcomes)."""
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
    if executor == "slurm":
        try:
            slurm_executor.check(options)
        except ValueError as e:
            raise C.ConfigError(f"--executor slurm: {e}") from None
    for cfg in {(c.dataset, c.data_dir): c for c, _ in points}.values():
        data.check_available(cfg)
    seeds = plan.parse_seeds(seeds)
    runs_ = [r for cfg, _ in points for r in plan.plan(cfg, seeds)]
    todo, retrain = to_train(runs_, force)
    log(f"{len(points)} experiment(s) ({', '.join(c.experiment for c, _ in points)}), seeds "
        f"{', '.join(map(str, seeds))}: {len(runs_)} runs, {len(runs_) - len(todo)} finished")
    workers = jobs if executor == "local" else options.get("max_parallel", len(todo) or 1)
    todo, precisions = decide(todo, points, log)
    log(estimate(todo, points[0][0], workers=workers))
    t0 = time.perf_counter()
    job_list, deps, runs_of = make_jobs(todo, retrain, executor, precisions)
    opts = {"workers": jobs} if executor == "local" else options
    outcomes = [RunOutcome(r, o.status, o.seconds, o.error, o.log, o.job_id)
                for o in EXECUTORS[executor](job_list, deps, opts, log) for r in runs_of[o.job]]
    text = summary(outcomes) + f"\nwall time {time.perf_counter() - t0:.0f}s" if todo else "nothing to do"
    if command:
        text = f"command: {command}\n{text}"
    for cfg, _ in points:
        runs.atomic_write_bytes(jobs_dir(cfg) / "summary.txt", (text + "\n").encode())
    log("\n" + text)
    code = 0 if all(o.status == "ok" for o in outcomes) else 1
    if len(points) > 1 and code == 0:
        out = Path(points[0][0].out_dir) / f"{C.load(params, overrides).experiment}-grid"
        results.grid_report([(runs.experiment_dir(c), p) for c, p in points], out)
    return code, outcomes


def slurm_options(a) -> dict:
    """The `slurm:` options given on the command line (--partition ... --max-parallel)."""
    opts = dict(partition=a.partition, time=a.time, gpus=a.gpus, cpus=a.cpus,
                mem_gb=mem_gb(a.mem) if a.mem else None, max_parallel=a.max_parallel)
    return {k: v for k, v in opts.items() if v is not None}


def mem_gb(text: str) -> float:
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
