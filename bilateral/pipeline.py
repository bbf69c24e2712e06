"""`python -m bilateral run PARAMS`: the numbered notebooks, executed by papermill per seed.

Notebooks 01-05 run in order for every seed (a failure stops that seed's chain only), then
06_results once over all seeds. Executed copies go to outputs/<experiment>/notebooks/seed=<k>/.
The stages reuse finished runs with the same config, so rerunning after an interruption
continues where it stopped. The notebooks themselves call `notebook_setup` (notebook.py,
re-exported here) to find the repository and read the params file, so they behave the same
from JupyterLab, Colab or here. Several seeds run on an executor (execute/), locally or as
SLURM jobs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import config as C
from . import data, plan, runs, sweep
from .execute import EXECUTORS, Job
from .execute.jobs import say
from .notebook import (KERNEL, KERNEL_DISPLAY, KERNEL_ENV, PACKAGE_ROOT,  # noqa: F401
                       experiment_dir, figure_dir, find_root, histories, kernel_note,
                       notebook_config, notebook_setup, read_runs, runs_of, runs_table, train_runs)

PER_SEED = ("01_data", "02_hemispheres", "03_bilateral", "04_baselines", "05_analysis",
            "07_callosum")  # 07 goes beyond the paper; 06 gathers every seed, so it runs last
FINAL = "06_results"
NOTEBOOKS = tuple(sorted(PER_SEED + (FINAL,)))
check_data = data.check_available  # the name notebook 01 calls


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
    """Make the notebooks' kernel (KERNEL, the one `make lab` registers and the notebooks'
    metadata names) this very interpreter: a kernelspec in `folder`, put first on JUPYTER_PATH
    (which kernels and spawned workers inherit), wins over a registered one that may point to
    another Python (another checkout's .venv)."""
    spec = Path(folder) / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        # log_level: the kernel's own log (e.g. "KeyboardInterrupt caught", which jupyter_client's
        # interrupt-before-shutdown provokes) is noise here; cell errors reach the notebook
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--IPKernelApp.log_level=CRITICAL"],
        "display_name": KERNEL_DISPLAY, "language": "python",
        "env": {KERNEL_ENV: KERNEL}}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(folder) + (os.pathsep + old if old else "")


def papermill_execute(source: Path, output: Path, parameters: dict, cwd: Path):
    import papermill
    papermill.execute_notebook(str(source), str(output), parameters=parameters, cwd=str(cwd),
                               kernel_name=KERNEL, progress_bar=False, log_output=False)


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


def chain_on_node(kw):
    """One seed's notebook chain as an executor's job (a local worker, a SLURM job), with the
    kernel pinned to that process's interpreter."""
    with tempfile.TemporaryDirectory(prefix="bilateral-kernel-") as d:
        pin_kernel(d)
        return run_chain(**kw)


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


def run(params, seeds=(0,), only=None, jobs=1, overrides=None, download=False, execute=None,
        nb_dir=None, log=say, executor="local", slurm=None) -> tuple[int, list[Result]]:
    """Everything `python -m bilateral run` does; returns (exit code, results).
    executor="slurm": the plan's trainings as SLURM jobs first (bilateral.sweep), then each
    seed's notebooks as a SLURM job (they find every run finished and only analyse), then 06."""
    params = Path(params).resolve()
    overrides = C.parse_overrides(overrides)
    cfg = C.load(params, overrides)                     # bad params stop before anything runs
    notebooks = select(only)
    seeds = plan.parse_seeds(seeds)                          # 0-4, [0, 1, 2], "0,2": each once, in order
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
    options = {**cfg.slurm, **(slurm or {})}
    if executor == "slurm" and any(n in notebooks for n in PER_SEED[1:4]):
        code, _ = sweep.sweep(params, seeds, "slurm", slurm=options, overrides=overrides, log=log)
        if code:
            log("some trainings failed on SLURM (summary above); the notebooks were not run")
            return code, []
    else:
        sweep.announce(cfg, seeds, jobs, log)
    exp_dir = runs.experiment_dir(cfg)
    # no progress bars in the executed notebooks unless asked (--set progress=true)
    parameters = dict(params_file=str(params), overrides={"progress": False, **overrides})
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
    runs.atomic_write_bytes(exp_dir / "notebooks" / "summary.txt", (text + "\n").encode())
    log("\n" + text)
    return (0 if all(r.status == "ok" for r in results) else 1), results


def _run_all(seeds, per_seed, notebooks, jobs, nb_dir, root, parameters, exp_dir, execute, log,
             slurm=None):
    results: list[Result] = []
    if per_seed:
        chains = [dict(seed=s, notebooks=per_seed, nb_dir=nb_dir, cwd=root, parameters=parameters,
                       out_dir=exp_dir / "notebooks" / f"seed={s}", execute=execute)
                  for s in seeds]
        if slurm is None and jobs == 1:
            for kw in chains:
                results += run_chain(**kw, log=log)
        else:  # one job per seed: local workers (each its share of threads, or its GPU) or SLURM
            executor = "slurm" if slurm is not None else "local"
            folder = str(exp_dir / "jobs" / "notebooks")
            todo = [Job(f"notebooks seed={kw['seed']}", functools.partial(chain_on_node, kw),
                        folder=folder, name="notebooks") for kw in chains]
            if executor == "slurm":
                log(f"the notebooks of {len(chains)} seed(s) as SLURM jobs")
            options = slurm if slurm is not None else {"workers": jobs}
            for kw, o in zip(chains, EXECUTORS[executor](todo, {}, options, log)):
                if o.status == "ok":
                    results += o.value
                else:  # the job died: its notebooks count as failed
                    why = o.error.strip().splitlines()[-1] if o.error.strip() else o.status
                    results += [Result(nb, kw["seed"], "failed", error=why, output=o.log)
                                for nb in kw["notebooks"]]
    if FINAL in notebooks:
        results += run_chain(None, [FINAL], nb_dir, exp_dir / "notebooks",
                             dict(parameters, seeds=seeds), root, execute=execute, log=log)
    return results


def main(args) -> int:
    code, _ = run(args.params, seeds=args.seeds, only=args.only, jobs=args.jobs,
                  overrides=args.overrides, download=args.download, executor=args.executor,
                  slurm=sweep.slurm_options(args))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m bilateral run PARAMS")
