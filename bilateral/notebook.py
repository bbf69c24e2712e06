"""What the notebooks call: the setup cell, the runs of a notebook's phase, figure folders.

Every numbered notebook starts with `notebook_setup` (or `notebook_config`), which finds the
repository and reads the params file, so a notebook behaves the same from JupyterLab, Colab or
papermill (pipeline.py runs them). The notebooks ask for the runs of their phase (plan.py); a
notebook's name names its phase ("02_hemispheres" -> "hemispheres").
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from . import config as C
from . import plan, runs, train

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The project's kernel: `make lab` registers it (this checkout's interpreter), pipeline.pin_kernel
# writes it for papermill, and every notebook's metadata names it. Both kernelspecs set
# KERNEL_ENV, so a notebook knows whether it runs on it.
KERNEL = "bilateral"
KERNEL_DISPLAY = "Python (bilateral)"
KERNEL_ENV = "BILATERAL_KERNEL"


def kernel_note() -> str:
    """'' on the project's kernel; elsewhere (a plain "python3" kernel, Colab) one line saying
    which interpreter runs the notebook and how to get the project's kernel."""
    if os.environ.get(KERNEL_ENV) == KERNEL:
        return ""
    return (f'kernel: not the project\'s "{KERNEL_DISPLAY}" but {sys.executable}; '
            f"carrying on with it (`make lab` registers the project's kernel)")


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
    cfg = notebook_config(params_file, overrides, experiment, condition)
    device = train.pick_device(cfg.device)
    if kernel_note():
        print(kernel_note())
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


experiment_dir = runs.experiment_dir


def figure_dir(cfg: C.Config, seed=None) -> Path:
    """outputs/<experiment>/figures/seed=<k>/ (or the experiment's figures/ for seed None)."""
    d = experiment_dir(cfg) / "figures"
    d = d if seed is None else d / f"seed={seed}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_of(cfg: C.Config, notebook: str, seed: int = 0) -> list[tuple[str, str, C.Config]]:
    """(label, stage, config) of every run a notebook (or phase) trains, in order."""
    return [(r.label, r.stage, r.cfg) for r in plan.phase_runs(cfg, notebook, seed)]


def train_runs(cfg: C.Config, notebook: str, seed: int) -> dict:
    """Train every run of a notebook's phase (a finished one with the same config is just
    read); {label: metrics}."""
    return {r.label: r.train() for r in plan.phase_runs(cfg, notebook, seed)}


def read_runs(cfg: C.Config, notebook: str, seed: int) -> dict:
    """{label: metrics} of the finished runs of a notebook's phase (missing, unfinished and
    stale ones are left out)."""
    return {r.label: r.metrics() for r in plan.phase_runs(cfg, notebook, seed)
            if r.status() == "finished"}


def histories(cfg: C.Config, notebook: str, seed: int) -> dict:
    """{label: history DataFrame} of the trained runs of a notebook's phase (ensembles have
    none)."""
    out = {r.label: r.history() for r in plan.phase_runs(cfg, notebook, seed)}
    return {k: v for k, v in out.items() if not v.empty}
