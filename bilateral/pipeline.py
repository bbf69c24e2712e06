"""`python -m bilateral run PARAMS`: the numbered notebooks, executed by papermill per seed.

Notebooks 01-05 run in order for every seed (a failure stops that seed's chain only), then
06_results once over all seeds. Executed copies go to outputs/<experiment>/notebooks/seed=<k>/.
The stages reuse finished runs with the same config, so rerunning after an interruption
continues where it stopped. The notebooks themselves call `notebook_setup` (below) to find the
repository and read the params file, so they behave the same from JupyterLab, Colab or here.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from . import config as C

PER_SEED = ("01_data", "02_hemispheres", "03_bilateral", "04_baselines", "05_analysis",
            "07_callosum")  # 07 goes beyond the paper; 06 gathers every seed, so it runs last
FINAL = "06_results"
NOTEBOOKS = tuple(sorted(PER_SEED + (FINAL,)))
KERNEL = "python3"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ notebook helpers

def find_root(start=None) -> Path:
    """The repository folder (the one holding params/): the working directory or one of its
    parents, else the checkout this package was imported from."""
    start = Path.cwd() if start is None else Path(start)
    for d in (start, *start.resolve().parents):
        if (d / "params").is_dir() and (d / "bilateral").is_dir():
            return d.resolve()
    if (PACKAGE_ROOT / "params").is_dir():
        return PACKAGE_ROOT
    raise FileNotFoundError(f"no folder holding params/ found at or above {start}; run the "
                            f"notebook from a checkout of the repository")


def notebook_config(params_file, overrides=None, experiment=None, condition=None,
                    chdir=True) -> C.Config:
    """What the `parameters` cell of every notebook turns into: the validated Config.

    A relative params_file is read from the repository root, and the working directory moves
    there (with chdir), so outputs/ and data/ are the same whether the notebook runs from
    notebooks/, from the root, or under papermill. `condition` restricts the notebook to one
    condition; without it, cfg.condition is the preset's first condition.
    """
    root = find_root()
    if chdir:
        os.chdir(root)
    path = Path(params_file)
    if not path.is_absolute():
        path = root / path
    overrides = dict(C.parse_overrides(overrides or {}))
    if experiment:
        overrides["experiment"] = experiment
    if condition:
        overrides.update(condition=condition, conditions=[condition])
    cfg = C.load(path, overrides)
    if cfg.condition not in cfg.conditions:
        cfg = dataclasses.replace(cfg, condition=cfg.conditions[0])
    return cfg


def notebook_setup(params_file, overrides=None, experiment=None, condition=None, seed=0):
    """The setup cell of a per-seed notebook: its Config (notebook_config), the device it runs
    on and its seed's figure folder; printed, so the notebook's output says what it ran."""
    from .train import pick_device  # late: torch is needed only once a notebook runs
    cfg = notebook_config(params_file, overrides, experiment, condition)
    device = pick_device(cfg.device)
    print(f"experiment {cfg.experiment}: {cfg.dataset}, recipe {cfg.recipe}, width {cfg.width}, "
          f"seed {seed}, device {device}")
    return cfg, device, figure_dir(cfg, seed)


def runs_table(runs):
    """The runs of a notebook's phase as a table: label, key, status, and what each is built
    on (a column only when some run is built on others)."""
    import pandas as pd
    rows = [{"label": r.label, "key": r.key, "status": r.status(),
             "built on": ", ".join(u.label for u in r.upstream())} for r in runs]
    df = pd.DataFrame(rows, columns=["label", "key", "status", "built on"])
    return df if df["built on"].any() else df.drop(columns="built on")


def experiment_dir(cfg: C.Config) -> Path:
    return Path(cfg.out_dir) / cfg.experiment


def figure_dir(cfg: C.Config, seed=None) -> Path:
    """outputs/<experiment>/figures/seed=<k>/ (or the experiment's figures/ for seed None)."""
    d = experiment_dir(cfg) / "figures"
    d = d if seed is None else d / f"seed={seed}"
    d.mkdir(parents=True, exist_ok=True)
    return d


# The notebooks ask for the runs of their phase (plan.py); a notebook's name names its phase
# ("02_hemispheres" -> "hemispheres"). Labels are each run's label in the plan.

def runs_of(cfg: C.Config, notebook: str, seed: int = 0) -> list[tuple[str, str, C.Config]]:
    """(label, stage, config) of every run a notebook (or phase) trains, in order."""
    from . import plan
    return [(r.label, r.stage, r.cfg) for r in plan.phase_runs(cfg, notebook, seed)]


def train_runs(cfg: C.Config, notebook: str, seed: int) -> dict:
    """Train every run of a notebook's phase (a finished one with the same config is just
    read); {label: metrics}."""
    from . import plan
    return {r.label: r.train() for r in plan.phase_runs(cfg, notebook, seed)}


def read_runs(cfg: C.Config, notebook: str, seed: int) -> dict:
    """{label: metrics} of the finished runs of a notebook's phase (missing, unfinished and
    stale ones are left out)."""
    from . import plan
    return {r.label: r.metrics() for r in plan.phase_runs(cfg, notebook, seed)
            if r.status() == "finished"}


def histories(cfg: C.Config, notebook: str, seed: int) -> dict:
    """{label: history DataFrame} of the trained runs of a notebook's phase (ensembles have
    none)."""
    from . import plan
    out = {r.label: r.history() for r in plan.phase_runs(cfg, notebook, seed)}
    return {k: v for k, v in out.items() if not v.empty}


# ------------------------------------------------------------------------------- planning

def select(only) -> list[str]:
    """Notebook names from --only: '02_hemispheres', '02_hemispheres.ipynb' or '02'."""
    if not only:
        return list(NOTEBOOKS)
    chosen = set()
    for item in only:
        key = Path(item).name.removesuffix(".ipynb")
        hits = [n for n in NOTEBOOKS if n == key or n.split("_", 1)[0] == key]
        if not hits:
            raise C.ConfigError(f"--only: unknown notebook {item!r}; notebooks: {', '.join(NOTEBOOKS)}")
        chosen.update(hits)
    return [n for n in NOTEBOOKS if n in chosen]


@dataclasses.dataclass
class Result:
    notebook: str
    seed: int | None        # None: 06_results, over all seeds
    status: str             # ok, failed, skipped (an earlier notebook of the seed failed)
    seconds: float = 0.0
    output: str = ""
    error: str = ""


def describe_error(e: BaseException) -> str:
    """One line naming the failing cell, for papermill's PapermillExecutionError and others."""
    def first(text):
        lines = str(text).strip().splitlines() or [""]
        return lines[0] + (" ..." if len(lines) > 1 else "")
    if getattr(e, "ename", None) is not None:
        cell = getattr(e, "exec_count", None) or getattr(e, "cell_index", "?")
        return f"cell [{cell}] raised {e.ename}: {first(e.evalue)}"
    return f"{type(e).__name__}: {first(e)}"


def pin_kernel(folder) -> None:
    """Make the notebooks' kernel ("python3") this very interpreter: a kernelspec in `folder`,
    put first on JUPYTER_PATH (which kernels and spawned workers inherit), wins over any user
    or system "python3" kernelspec that may point to another Python."""
    spec = Path(folder) / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        # log_level: the kernel's own log (e.g. "KeyboardInterrupt caught", which jupyter_client's
        # interrupt-before-shutdown provokes) is noise here; cell errors reach the notebook
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--IPKernelApp.log_level=CRITICAL"],
        "display_name": f"Python 3 ({sys.executable})", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(folder) + (os.pathsep + old if old else "")


def papermill_execute(source: Path, output: Path, parameters: dict, cwd: Path):
    import papermill
    papermill.execute_notebook(str(source), str(output), parameters=parameters, cwd=str(cwd),
                               kernel_name=KERNEL, progress_bar=False, log_output=False)


def say(msg):
    print(msg, flush=True)


def run_chain(seed, notebooks, nb_dir, out_dir, parameters, cwd, env=None, execute=None,
              log=say) -> list[Result]:
    """Run notebooks in order for one seed; the first failure skips the rest."""
    execute = execute or papermill_execute
    os.environ.update(env or {})  # the kernels inherit it: threads, GPU
    results, failed = [], False
    for nb in notebooks:
        out = Path(out_dir) / f"{nb}.ipynb"
        if failed:
            results.append(Result(nb, seed, "skipped", output=str(out)))
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tag = f"[seed {seed}]" if seed is not None else "[all seeds]"
        log(f"{tag} {nb} ...")
        try:
            params = parameters if seed is None else dict(parameters, seed=seed)
            execute(Path(nb_dir) / f"{nb}.ipynb", out, params, Path(cwd))
            r = Result(nb, seed, "ok", time.perf_counter() - t0, str(out))
        except Exception as e:  # noqa: BLE001 - any failure stops this chain, not the others
            r = Result(nb, seed, "failed", time.perf_counter() - t0, str(out), describe_error(e))
            failed = True
        log(f"{tag} {nb} {r.status} ({r.seconds:.0f}s)" + (f": {r.error}" if r.error else ""))
        results.append(r)
    return results


def _chain_job(kwargs):  # top level, so a spawned worker can unpickle it
    return run_chain(**kwargs)


def seed_env(i: int, jobs: int) -> dict:
    """Environment of the i-th seed's kernels: its own GPU, or its share of the CPU threads."""
    if jobs <= 1:
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
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def summary(results: list[Result]) -> str:
    w = max(len(n) for n in NOTEBOOKS)
    lines = [f"{'seed':>5}  {'notebook':<{w}}  {'status':<7}  {'time':>7}  details"]
    for r in results:
        seed = "all" if r.seed is None else str(r.seed)
        detail = r.error + (f" (see {r.output})" if r.status == "failed" else "")
        lines.append(f"{seed:>5}  {r.notebook:<{w}}  {r.status:<7}  {r.seconds:6.0f}s  {detail}".rstrip())
    n_bad = sum(r.status != "ok" for r in results)
    lines.append(f"{len(results) - n_bad} of {len(results)} notebooks ran" +
                 ("" if not n_bad else f"; {sum(r.status == 'failed' for r in results)} failed, "
                                       f"{sum(r.status == 'skipped' for r in results)} skipped"))
    return "\n".join(lines)


def check_data(cfg: C.Config, download: bool = False):
    """Stop at once (FileNotFoundError with the loader's message) when the data is missing."""
    from . import data
    if download and cfg.dataset == "cifar100":
        data.load_dataset("cifar100", "test", data_dir=cfg.data_dir, download=True)
        return
    kw = dict(size=cfg.synthetic_size, seed=cfg.split_seed) if cfg.dataset == "synthetic" else {}
    data.load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=download, **kw)


def run(params, seeds=(0,), only=None, jobs=1, overrides=None, download=False, execute=None,
        nb_dir=None, log=say, executor="local", slurm=None) -> tuple[int, list[Result]]:
    """Everything `python -m bilateral run` does; returns (exit code, results).
    executor="slurm": the plan's trainings as SLURM jobs first (bilateral.sweep), then each
    seed's notebooks as a SLURM job (they find every run finished and only analyse), then 06."""
    params = Path(params).resolve()
    overrides = C.parse_overrides(overrides)
    cfg = C.load(params, overrides)                     # bad params stop before anything runs
    notebooks = select(only)
    from .plan import parse_seeds
    seeds = parse_seeds(seeds)                          # 0-4, [0, 1, 2], "0,2": each once, in order
    if jobs < 1:
        raise C.ConfigError(f"--jobs must be at least 1, got {jobs}")
    nb_dir = Path(nb_dir) if nb_dir else find_root() / "notebooks"
    missing = [n for n in notebooks if not (nb_dir / f"{n}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(f"notebooks missing from {nb_dir}: {', '.join(missing)}")
    check_data(cfg, download)
    root = find_root()
    # out_dir and data_dir mean the same as on this command line although the kernels run
    # from the repository root
    for key in ("out_dir", "data_dir"):
        if not Path(getattr(cfg, key)).is_absolute() and (Path.cwd().resolve() != root
                                                          or executor == "slurm"):
            overrides[key] = str(Path(getattr(cfg, key)).resolve())
    cfg = C.load(params, overrides)
    from . import sweep
    options = {**cfg.slurm, **(slurm or {})}
    if executor == "slurm" and any(n in notebooks for n in PER_SEED[1:4]):
        code, _ = sweep.sweep(params, seeds, "slurm", slurm=options, overrides=overrides, log=log)
        if code:
            log("some trainings failed on SLURM (summary above); the notebooks were not run")
            return code, []
    else:
        sweep.announce(cfg, seeds, jobs, log)
    exp_dir = Path(cfg.out_dir) / cfg.experiment
    parameters = dict(params_file=str(params), overrides=overrides)
    per_seed = [n for n in notebooks if n in PER_SEED]
    jobs = min(jobs, len(seeds))
    log(f"{cfg.experiment}: {', '.join(notebooks)} for seeds {seeds} ({jobs} job{'s' * (jobs > 1)});"
        f" executed notebooks in {exp_dir / 'notebooks'}")
    t0 = time.perf_counter()
    results: list[Result] = []
    saved = dict(os.environ)
    kernel_dir = tempfile.TemporaryDirectory(prefix="bilateral-kernel-")
    pin_kernel(kernel_dir.name)
    try:
        results = _run_all(seeds, per_seed, notebooks, jobs, nb_dir, root, parameters, exp_dir,
                           execute, log, options if executor == "slurm" else None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        kernel_dir.cleanup()
    text = summary(results) + f"\nwall time {time.perf_counter() - t0:.0f}s"
    from .runs import atomic_write_bytes
    atomic_write_bytes(exp_dir / "notebooks" / "summary.txt", (text + "\n").encode())
    log("\n" + text)
    return (0 if all(r.status == "ok" for r in results) else 1), results


def _run_all(seeds, per_seed, notebooks, jobs, nb_dir, root, parameters, exp_dir, execute, log,
             slurm=None):
    results: list[Result] = []
    if per_seed:
        jobs_kw = [dict(seed=s, notebooks=per_seed, nb_dir=nb_dir, cwd=root, parameters=parameters,
                        out_dir=exp_dir / "notebooks" / f"seed={s}", env=seed_env(i, jobs),
                        execute=execute)
                   for i, s in enumerate(seeds)]
        if slurm is not None:  # one SLURM job per seed
            from .slurm import run_chains_slurm
            results += run_chains_slurm(jobs_kw, slurm, exp_dir / "jobs" / "notebooks", log)
        elif jobs == 1:
            for kw in jobs_kw:
                results += run_chain(**kw, log=log)
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                for res in pool.map(_chain_job, jobs_kw):
                    results += res
    if FINAL in notebooks:
        results += run_chain(None, [FINAL], nb_dir, exp_dir / "notebooks",
                             dict(parameters, seeds=seeds), root, execute=execute, log=log)
    return results


def main(args) -> int:
    from .sweep import slurm_options
    code, _ = run(args.params, seeds=args.seeds, only=args.only, jobs=args.jobs,
                  overrides=args.overrides, download=args.download, executor=args.executor,
                  slurm=slurm_options(args))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m bilateral run PARAMS")
