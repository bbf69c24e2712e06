"""Command line: `python -m bilateral --help`."""
from __future__ import annotations

import argparse
import sys

from . import config as C

STAGE_HELP = {
    "hemisphere": "one backbone, one head: left = fine labels, right = coarse (--set side=...)",
    "bilateral": "frozen left + right hemispheres of this seed and condition, two new heads",
    "bilateral_unspecialised": "the same two-hemisphere model trained end to end from scratch",
    "unilateral": "one backbone with both heads (--set member=i for the ensemble pool)",
    "resnet18": "ResNet-18 dual-head baseline (about the bilateral model's size)",
    "resnet34": "ResNet-34 dual-head baseline (about twice the bilateral model's size)",
    "ensemble": "top-k unilateral pool members by validation accuracy, logits averaged",
    "callosal": "the hemispheres joined by callosal connections (--set callosum=add|gate|concat)",
    "callosal_unspecialised": "the same callosal model trained end to end from scratch",
}


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bilateral",
        description="Bilateral brain with hemispheric specialisation (arXiv 2209.06862).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {s:<25} {h}" for s, h in STAGE_HELP.items()))
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train one stage for one seed")
    t.add_argument("stage", help=f"one of: {', '.join(C.STAGES)}")
    t.add_argument("--params", help="YAML params file (params/*.yaml)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--force", action="store_true", help="replace a finished or different run")

    r = sub.add_parser("run", help="the whole study for some seeds, notebook by notebook")
    r.add_argument("params")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--only", nargs="+", default=None, metavar="NOTEBOOK")
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--download", action="store_true", help="fetch CIFAR-100 when missing")

    rep = sub.add_parser("report", help="rebuild results.csv and results.md from run records")
    rep.add_argument("experiment_dir")

    b = sub.add_parser("bench", help="fast path against the conventional pipeline")
    b.add_argument("--device", default="auto")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None, help="JSON file for the figures")

    sub.add_parser("params-table", help="trainable parameters of every model of the study")

    d = sub.add_parser("download", help="fetch a dataset into --data-dir")
    d.add_argument("dataset", choices=["cifar100"])
    d.add_argument("--data-dir", default="data")

    a = p.parse_args(argv)
    try:
        return dispatch(a)
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a RunConflict and friends get the same plain line
        from .runs import RunConflict
        if isinstance(e, RunConflict):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise


def dispatch(a):
    if a.cmd == "train":
        from . import stages
        if a.stage not in C.STAGES:
            raise C.ConfigError(f"unknown stage {a.stage!r}; allowed: {', '.join(C.STAGES)}")
        cfg = C.load(a.params, a.overrides)
        stages.run_stage(a.stage, cfg, a.seed, force=a.force)
        return 0
    if a.cmd == "params-table":
        from . import models
        print(models.params_table())
        return 0
    if a.cmd == "download":
        from . import data
        data.load_dataset(a.dataset, "test", data_dir=a.data_dir, download=True)
        print(f"{a.dataset} is in {a.data_dir}")
        return 0
    if a.cmd == "run":
        from . import pipeline
        return pipeline.main(a)
    if a.cmd == "report":
        from . import results
        results.report(a.experiment_dir)
        return 0
    if a.cmd == "bench":
        from . import bench
        return bench.main(a)
    raise AssertionError(a.cmd)


if __name__ == "__main__":
    sys.exit(main())
