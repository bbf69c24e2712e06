"""Command line: `python -m bilateral --help`."""
from __future__ import annotations

import argparse
import errno
import shutil
import sys
from pathlib import Path

from . import bench, budget, callosum, data, models, pipeline, plan, publish, results, runs, sweep
from . import config as C
from .data import DataError
from .execute import EXECUTORS
from .runs import RecordError, RunConflict


def stage_help() -> str:
    return "\n".join(f"  {s.name:<25} {s.help}" for s in plan.STAGES.values())


SEEDS_HELP = "seeds as 0-4, 0 1 2 or 0,2"


def add_study_args(p):
    """A params file, its seeds and --set overrides: what run, sweep and plan start from."""
    p.add_argument("params")
    p.add_argument("--seeds", nargs="+", default=["0"], help=SEEDS_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def add_executor_args(p, jobs_help):
    """--executor, --jobs and the SLURM job options (also the `slurm:` keys of a params file)."""
    p.add_argument("--executor", choices=list(EXECUTORS), default="local",
                   help="local worker processes, or SLURM jobs through submitit")
    p.add_argument("--jobs", type=int, default=1, help=jobs_help)
    g = p.add_argument_group("SLURM job options (--executor slurm; override the params "
                             "file's slurm: section)")
    g.add_argument("--partition")
    g.add_argument("--time", type=int, metavar="MINUTES", help="time limit per job (default 1440)")
    g.add_argument("--gpus", type=int, help="GPUs per job (default 0)")
    g.add_argument("--cpus", type=int, help="CPUs per job (default 1)")
    g.add_argument("--mem", help="memory per job, e.g. 16G")
    g.add_argument("--max-parallel", type=int, help="jobs of one array running at once")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bilateral",
        description="Bilateral brain with hemispheric specialisation (arXiv 2209.06862).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + stage_help())
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train one stage for one seed")
    t.add_argument("stage", help=f"one of: {', '.join(plan.STAGES)}")
    t.add_argument("--params", help="YAML params file (params/*.yaml)")
    seed = t.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument("--seeds", nargs="+", default=None, help=f"several: {SEEDS_HELP}")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--force", action="store_true", help="replace a finished, stale or different run")

    r = sub.add_parser("run", help="the whole study for some seeds, notebook by notebook")
    add_study_args(r)
    r.add_argument("--only", nargs="+", default=None, metavar="NOTEBOOK")
    r.add_argument("--download", action="store_true", help="fetch CIFAR-100 when missing")
    add_executor_args(r, "local: seeds run in N processes; slurm: unused")

    sw = sub.add_parser("sweep", help="train every unfinished run of the plan: local workers "
                                      "or SLURM jobs, dependants after their upstream runs")
    add_study_args(sw)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="one experiment per combination (repeatable)")
    sw.add_argument("--force", action="store_true", help="retrain stale runs and their dependants")
    add_executor_args(sw, "local worker processes (each its share of the CPU threads or its own GPU)")

    bu = sub.add_parser("budget", help="each model's budget on validation: every run at several "
                                       "budgets under the wsd schedule (one long run per model, "
                                       "shorter budgets branched from it)")
    add_study_args(bu)
    bu.add_argument("--budgets", nargs="+", type=int, default=[4, 8, 16, 32], metavar="EPOCHS")
    bu.add_argument("--threshold", type=float, default=budget.THRESHOLD,
                    help="points of validation accuracy within the best budget (default 0.3)")
    bu.add_argument("--jobs", type=int, default=1, help="local worker processes")

    cu = sub.add_parser("curves", help="test accuracy of every model against its budget and its "
                                       "compute, from a study trained with sweep --grid epochs=...; "
                                       "trains nothing")
    add_study_args(cu)
    cu.add_argument("--budgets", nargs="+", type=int, required=True, metavar="EPOCHS")

    pl = sub.add_parser("plan", help="every run of the study: status, dependencies, cost; "
                                     "trains nothing")
    add_study_args(pl)

    rep = sub.add_parser("report", help="rebuild results.csv and results.md from run records")
    rep.add_argument("experiment_dir")
    rep.add_argument("--publish", metavar="DIR", help="then copy the report and PROVENANCE.md into "
                     "DIR (a tracked folder such as results/fashion_mnist)")
    rep.add_argument("--command", help="the command that ran the study, for PROVENANCE.md "
                     "(default: the one the last sweep recorded)")
    rep.add_argument("--force", action="store_true", help="--publish into a non-empty folder "
                     "that is not an earlier publication, replacing what it holds")

    b = sub.add_parser("bench", help="fast path against the conventional pipeline")
    b.add_argument("--device", default="auto")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None, help="JSON file for the figures")
    b.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections, e.g. cpu packing "
                   "(an unknown name lists them all; the list lives in bilateral.bench)")

    sub.add_parser("params-table", help="total and trainable parameters of every model of the study")

    d = sub.add_parser("download", help="fetch a dataset into --data-dir")
    d.add_argument("dataset", choices=["cifar100"])
    d.add_argument("--data-dir", default="data")

    a = p.parse_args(argv)
    try:
        return dispatch(a)
    except KeyboardInterrupt:
        print("error: interrupted (train, run again, resumes from the last finished epoch)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anticipated failures get one line, others a traceback
        code = exit_code(e)
        if code is None:
            raise
        hint = disk_hint(e) if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else ""
        print("error: " + C.clip(" ".join(str(e).split()), 2000) + hint, file=sys.stderr)
        return code


def disk_hint(e: OSError) -> str:
    """Where a write failed and, for a full disk, how much room is left there."""
    where = getattr(e, "filename", None)
    if not where:
        return "; set out_dir/data_dir to another place"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = next((p for p in [Path(where), *Path(where).parents] if p.exists()), Path("/"))
        free = shutil.disk_usage(folder).free
        return f" (writing {where}; {free / 2**20:,.0f} MiB free on {folder}); free some space or set out_dir to another disk"
    return f" (at {where}); check that path, or set out_dir/data_dir to another place"


def exit_code(e: BaseException) -> int | None:
    """2 for a problem the user can fix (params, data, records, files), 3 for a refusal (the
    run is another config's or another process's), None for a bug: its traceback is shown."""
    if isinstance(e, RunConflict):
        return 3
    if isinstance(e, (C.ConfigError, DataError, RecordError, publish.PublishError, FileNotFoundError,
                      PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)):
        return 2
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG):
        return 2
    return None


def dispatch(a):
    if a.cmd == "train":
        plan.spec(a.stage)  # an unknown stage stops here, naming the stages
        cfg = C.load(a.params, a.overrides)
        for seed in plan.parse_seeds(a.seeds if a.seeds else [a.seed]):
            plan.run_stage(a.stage, cfg, seed, force=a.force)
        return 0
    if a.cmd == "params-table":
        print(models.params_table(extra_rows=callosum.params_rows()))
        return 0
    if a.cmd == "download":
        data.load_dataset(a.dataset, "test", data_dir=a.data_dir, download=True)
        print(f"{a.dataset} is in {a.data_dir}")
        return 0
    if a.cmd == "run":
        return pipeline.main(a)
    if a.cmd == "sweep":
        return sweep.main(a)
    if a.cmd == "budget":
        return budget.run(a.params, a.budgets, a.seeds, jobs=a.jobs, overrides=a.overrides,
                          threshold=a.threshold)
    if a.cmd == "curves":
        return budget.draw(a.params, a.budgets, a.seeds, overrides=a.overrides)
    if a.cmd == "plan":
        seeds = plan.parse_seeds(a.seeds)
        cfg = C.load(a.params, a.overrides)
        print(f"plan of {cfg.experiment} for seeds {', '.join(map(str, seeds))} "
              f"(runs under {runs.experiment_dir(cfg)}):\n")
        print(plan.describe(plan.plan(cfg, seeds)))
        return 0
    if a.cmd == "report":
        if a.publish:  # a bad destination stops before the report is rebuilt
            publish.check_destination(Path(a.experiment_dir), Path(a.publish), a.force)
        results.report(a.experiment_dir)
        if a.publish:
            for path in publish.publish(a.experiment_dir, a.publish, a.command, a.force):
                print(f"published {path}")
        return 0
    if a.cmd == "bench":
        return bench.main(a)
    raise AssertionError(a.cmd)


if __name__ == "__main__":
    sys.exit(main())
