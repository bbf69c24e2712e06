"""`python -m bilateral budget PARAMS`: each model's training budget, chosen on validation only,
before the study's seeds are run (and then written into the preset: pre-registered).

The protocol:
1. Train every run of the plan at budgets B = (4, 8, 16, 32 epochs, say) under the wsd schedule
   (warm-up, constant lr, a linear decay over the last fifth), on search seeds that the study
   does not use. One long run per model serves every budget: a shorter budget branches from
   the longest run's checkpoint where its own decay starts (sweep.wsd_branches, runner.branch),
   so the search costs about 1.2 times the longest budget, not the sum of the budgets, and
   each branched run computes exactly what a separate run would.
2. For each stage (model family), the mean validation score over its runs and search seeds at
   each budget (train.score: the mean accuracy of the heads it trains); the test set is never
   read.
3. The budget of a stage is the smallest budget whose mean is within `threshold` points of the
   best budget tried (`choose`); a stage whose best is its longest budget is flagged: the
   search did not reach a plateau for it.
Writes outputs/<experiment>-budget/budgets.csv (the search table) and budgets.yaml (the
chosen `stage_epochs`, to copy into the study's preset).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from . import config as C
from . import plan, runs, sweep, train

THRESHOLD = 0.3  # percentage points of validation accuracy


def choose(table: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """Per stage: the smallest budget whose mean validation score (over runs and seeds) is
    within `threshold` points of the best budget's. table: one row per run (stage, budget,
    seed, score in [0, 1]). Returns stage, budget, mean score at it, the best budget, its
    mean, and `plateau` (False when only the longest budget tried comes within the threshold:
    the model may still be learning there)."""
    means = table.groupby(["stage", "budget"]).score.mean().reset_index()
    rows = []
    for stage, g in means.groupby("stage", sort=False):
        g = g.sort_values("budget")
        best = g.loc[g.score.idxmax()]
        ok = g[g.score >= best.score - threshold / 100]
        pick = ok.iloc[0]
        rows.append(dict(stage=stage, budget=int(pick.budget), score=float(pick.score),
                         best_budget=int(best.budget), best_score=float(best.score),
                         plateau=bool(pick.budget < g.budget.max())))
    return pd.DataFrame(rows)


def search_table(points, seeds) -> pd.DataFrame:
    """One row per finished trained run of the search: stage, run, seed, budget, val score."""
    rows = []
    for cfg, point in points:
        for r in plan.plan(cfg, seeds):
            if not r.spec.build or r.status() != "finished":
                continue
            m = r.metrics()
            rows.append(dict(stage=r.stage, run=r.name, seed=r.seed, budget=int(point["epochs"]),
                             score=train.score(m["val"], r.heads),
                             **{f"val_{k}": v for k, v in m["val"].items()}))
    return pd.DataFrame(rows)


def run(params, budgets, seeds, jobs=1, overrides=None, threshold=THRESHOLD, executor="local",
        log=sweep.say) -> int:
    """The whole protocol; the exit code of its sweep."""
    budgets = sorted({int(b) for b in budgets})
    if len(budgets) < 2 or budgets[0] < 2:
        raise C.ConfigError(f"--budgets: give two or more budgets of 2 epochs or more, got {budgets}")
    overrides = {**C.parse_overrides(overrides), "schedule": "wsd", "stage_epochs": {}}
    grid = [f"epochs={','.join(map(str, budgets))}"]
    code, _ = sweep.sweep(params, seeds, executor, jobs=jobs, overrides=overrides, grid=grid, log=log)
    points = sweep.expand_grid(params, sweep.absolute_dirs(params, overrides), grid)
    table = search_table(points, plan.parse_seeds(seeds))
    if table.empty:
        log("no finished run to choose budgets from")
        return code or 1
    base = C.load(params, overrides)
    out = runs.experiment_dir(base).with_name(f"{base.experiment}-budget")
    chosen = choose(table, threshold)
    write(out, table, chosen, budgets, seeds, threshold)
    log(f"\n{chosen.to_string(index=False)}\n\nbudgets chosen on validation: {out / 'budgets.yaml'}")
    return code


def write(out: Path, table, chosen, budgets, seeds, threshold):
    runs.atomic_write_bytes(out / "budgets.csv", table.to_csv(index=False).encode())
    lines = [f"# chosen by `python -m bilateral budget` on validation accuracy only: budgets "
             f"{budgets}, search seeds {seeds}, the smallest budget within {threshold} points of "
             f"the best; copy into the study's preset before running its seeds"]
    lines += [f"# {r.stage}: no plateau within the budgets tried (only the longest is within the threshold)"
              for r in chosen.itertuples() if not r.plateau]
    body = yaml.safe_dump({"schedule": "wsd",
                           "stage_epochs": {r.stage: int(r.budget) for r in chosen.itertuples()}},
                          sort_keys=False)
    runs.atomic_write_bytes(out / "budgets.yaml", ("\n".join(lines) + "\n" + body).encode())
