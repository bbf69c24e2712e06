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
chosen `stage_epochs`, to copy into the study's preset), and the learning curves of every model
(`curves`: curves.csv and curves.png, test accuracy included, which the choice never reads).
`python -m bilateral curves PARAMS --budgets ... --seeds ...` draws them for a study trained at
several budgets (`sweep --grid epochs=...`), without training anything.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from . import config as C
from . import figures, plan, results, runs, stats, sweep, train

THRESHOLD = 0.3  # percentage points of validation accuracy


def missing(table: pd.DataFrame, budgets) -> list[str]:
    """The (run, seed, budget) cells of the search without a score: a run of the plan that did
    not finish at a budget (search_table gives it a row with score NaN), or no row at all."""
    have = table.dropna(subset=["score"])
    done = set(zip(have.stage, have.run, have.seed, have.budget))
    units = sorted(set(zip(table.stage, table.run, table.seed)), key=str)
    return [f"{stage} {run} seed {seed} at {b} epochs" for stage, run, seed in units
            for b in budgets if (stage, run, seed, b) not in done]


def choose(table: pd.DataFrame, threshold: float = THRESHOLD, budgets=None) -> pd.DataFrame:
    """Per stage: the smallest budget whose mean validation score (over runs and seeds) is
    within `threshold` points of the best budget's. table: one row per run and budget (stage,
    run, seed, budget, score in [0, 1]); budgets: those the search asked for (default: those in
    the table). Every run must have a score at every budget: a mean over another mix of runs
    (the fine and the coarse hemisphere are 3 points apart) would move the choice, so an
    incomplete search raises ValueError naming the missing cells. Returns stage, budget, mean
    score at it, the best budget, its mean, and `plateau` (False when only the longest budget
    asked for comes within the threshold: the model may still be learning there)."""
    budgets = sorted({int(b) for b in (table.budget.unique() if budgets is None else budgets)})
    gaps = missing(table, budgets)
    if gaps:
        raise ValueError(f"incomplete search, no budget chosen: {len(gaps)} missing "
                         f"(run, seed, budget): " + "; ".join(gaps[:10]) + ("; ..." if len(gaps) > 10 else ""))
    means = table[table.budget.isin(budgets)].groupby(["stage", "budget"]).score.mean().reset_index()
    rows = []
    for stage, g in means.groupby("stage", sort=False):
        g = g.sort_values("budget")
        best = g.loc[g.score.idxmax()]
        # scores are counts over the validation images: a gap of exactly `threshold` must not
        # be decided by float rounding
        ok = g[g.score >= best.score - threshold / 100 - 1e-9]
        pick = ok.iloc[0]
        rows.append(dict(stage=stage, budget=int(pick.budget), score=float(pick.score),
                         best_budget=int(best.budget), best_score=float(best.score),
                         plateau=bool(pick.budget < max(budgets))))
    return pd.DataFrame(rows)


def search_table(points, seeds) -> pd.DataFrame:
    """One row per trained run of the search's plan and budget: stage, run, seed, budget, status
    and the validation score (NaN where the run did not finish: `choose` refuses to choose then)."""
    rows = []
    for cfg, point in points:
        for r in plan.plan(cfg, seeds):
            if not r.spec.build:
                continue
            status = r.status()
            m = r.metrics() if status == "finished" else None
            rows.append(dict(stage=r.stage, run=r.name, seed=r.seed, budget=int(point["epochs"]),
                             status=status, score=train.score(m["val"], r.heads) if m else float("nan"),
                             **({f"val_{k}": v for k, v in m["val"].items()} if m else {})))
    return pd.DataFrame(rows)


HEADS = ("fine_acc", "coarse_acc")


def compute(run) -> float:
    """What a model costs to make, in ResNet-9 epochs: its own training and that of every run
    it is built on (a bilateral model's hemispheres, an ensemble's whole pool, from which its
    members are chosen), each at its budget as if trained alone (a wsd branch costs less)."""
    seen, todo, total = set(), [run], 0.0
    while todo:
        r = todo.pop()
        if r.key not in seen:
            seen.add(r.key)
            total += r.cost()
            todo += r.upstream()
    return total


def model_name(r) -> str:
    """One curve per model, named by its run (stage/name, as results.md names it): a label
    such as "A callosal add" leaves out the depth, which would merge the callosal models of
    every depth into one curve. The unilateral pool's members are one model (their mean per
    seed)."""
    key = results.model_key(r.stage, r.name)
    return f"{key} (pool mean)" if r.stage == "unilateral" else key


def curves(points, seeds) -> pd.DataFrame:
    """One row per finished run (ensembles too), budget and head: the model, its compute
    (`compute`), validation and test accuracy. For figures and the report, never the choice."""
    rows = []
    for cfg, point in points:
        for r in plan.plan(cfg, seeds):
            if r.status() != "finished":
                continue
            m, cost = r.metrics(), compute(r)
            for h in HEADS:
                if h in m["test"]:
                    rows.append(dict(model=model_name(r), stage=r.stage, run=r.name, seed=r.seed,
                                     budget=int(point["epochs"]), compute=cost, head=h[:-4],
                                     val=m["val"][h], test=m["test"][h]))
    return pd.DataFrame(rows)


def half_width(sd: float, n: int, level: float = 0.95) -> float:
    """Half-width of the t interval of a mean of n values (0 for one value: no interval)."""
    from scipy import stats as st  # deferred: scipy costs a second at every command's start

    return float(st.t.ppf(0.5 + level / 2, n - 1) * sd / n ** 0.5) if n > 1 else 0.0


def curve_summary(table: pd.DataFrame, x: str = "budget") -> pd.DataFrame:
    """Per model, head and x: the mean test accuracy over seeds (unilateral members averaged
    within a seed first), n seeds and the 95% t interval's half-width (0 with one seed)."""
    per_seed = table.groupby(["model", "head", x, "seed"], sort=False).test.mean().reset_index()
    rows = []
    for (model, head, xv), g in per_seed.groupby(["model", "head", x], sort=False):
        mean, sd, n = stats.mean_sd(g.test.tolist())
        rows.append(dict(model=model, head=head, **{x: xv}, n=n, mean=mean, half=half_width(sd, n)))
    return pd.DataFrame(rows)


def reference_model(table: pd.DataFrame) -> str | None:
    """The model the gaps are measured from: condition A's bilateral model, else the first
    bilateral model, else none."""
    bil = list(dict.fromkeys(table.loc[table.stage == "bilateral", "model"]))
    return next((m for m in bil if m.endswith("-A")), bil[0] if bil else None)


def gap_summary(table: pd.DataFrame, ref: str) -> pd.DataFrame:
    """Per model, head and budget: its test accuracy minus the reference model's, seed by seed
    (the same seed and budget; unilateral members averaged within a seed first), the mean over
    seeds, n and the 95% t interval's half-width. Does the gap close, hold or widen?"""
    per_seed = table.groupby(["model", "head", "budget", "seed"], sort=False).test.mean()
    base = per_seed.xs(ref, level="model")
    rows = []
    for (model, head, b), g in per_seed.groupby(level=["model", "head", "budget"], sort=False):
        if model == ref:
            continue
        d = [v - base[(head, b, seed)] for (_, _, _, seed), v in g.items() if (head, b, seed) in base]
        if d:
            mean, sd, n = stats.mean_sd(d)
            rows.append(dict(model=model, head=head, budget=b, n=n, mean=mean, half=half_width(sd, n)))
    return pd.DataFrame(rows)


# a gap panel spans the models within this many points of the reference; one further away
# (a control on the coarse hemisphere alone, 20 points behind in fine) is drawn at the edge
# and named in the legend, so 1-2 point gaps stay visible
GAP_SPAN = 6.0


def plot_gaps(ax, gaps: pd.DataFrame, colors: dict, ref: str) -> list[str]:
    """The gap panel; returns the models drawn off scale."""
    off = []
    for model, g in gaps.groupby("model", sort=False):
        g = g.sort_values("budget")
        y, yerr = 100 * g["mean"], 100 * g["half"]
        if (y.abs() > GAP_SPAN).any():
            off.append(model)
            y = y.clip(-GAP_SPAN, GAP_SPAN)
            yerr = 0 * yerr
        ax.errorbar(g["budget"], y, yerr=yerr, marker="o", ms=4, capsize=3, lw=1.2,
                    color=colors[model], label=model, ls=":" if model in off else "-")
    ax.axhline(0, color="0.3", lw=1)
    ax.set_ylim(-GAP_SPAN - 0.5, GAP_SPAN + 0.5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.set_xlabel("training budget (epochs)")
    ax.set_ylabel(f"points above {ref}")
    ax.grid(alpha=0.3)
    return off


def plot_curves(table: pd.DataFrame, title: str = ""):
    """Test accuracy (%) of every model against its training budget (left: the plateau view)
    and against its compute in ResNet-9 epochs (middle: the equal-compute view), and each
    model's gap to the bilateral model at each budget (right, seed by seed), one row per head;
    points are means over seeds with 95% intervals; legend outside the axes."""
    import matplotlib.pyplot as plt

    heads = [h for h in ("fine", "coarse") if h in set(table["head"])]
    ref = reference_model(table)
    ncol = 3 if ref else 2
    fig, axes = plt.subplots(len(heads), ncol, figsize=(6.2 * ncol, 4.2 * len(heads)), squeeze=False)
    models_ = list(dict.fromkeys(table.model))
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(models_)}
    for row, head in enumerate(heads):
        for col, x in enumerate(("budget", "compute")):
            ax = axes[row][col]
            s = curve_summary(table[table["head"] == head], x)
            for model, g in s.groupby("model", sort=False):
                g = g.sort_values(x)
                ax.errorbar(g[x], 100 * g["mean"], yerr=100 * g["half"], marker="o", ms=4,
                            capsize=3, lw=1.2, color=colors[model], label=model)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")  # 4, 8, 16, not 2^2
            ax.set_xlabel("training budget (epochs)" if x == "budget" else
                          "compute to make the model (ResNet-9 epochs, upstream runs included)")
            ax.set_ylabel(f"test accuracy, {head} (%)")
            ax.grid(alpha=0.3)
            ax.set_title(f"{head}: {'every model at each budget' if x == 'budget' else 'at equal compute'}")
        if ref:
            gaps = gap_summary(table[table["head"] == head], ref)
            off = set(plot_gaps(axes[row][2], gaps, colors, ref)) if len(gaps) else set()
            axes[row][2].set_title(f"{head}: gap to the bilateral model, seed by seed")
            if off:
                axes[row][2].text(0.02, 0.07, "dotted, at the edge: off scale\n" + "\n".join(sorted(off)),
                                  transform=axes[row][2].transAxes, fontsize=8, va="bottom")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    n = table.groupby("model").seed.nunique()
    fig.legend([handles[m] for m in handles], [f"{m} (n={n[m]})" for m in handles],
               loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    fig.suptitle(title or "Test accuracy against training (mean over seeds, 95% interval)", fontsize=11)
    fig.tight_layout()
    return fig


def write_curves(out: Path, points, seeds, title: str = "", log=sweep.say) -> pd.DataFrame:
    table = curves(points, seeds)
    if table.empty:
        log("no finished run to draw")
        return table
    runs.atomic_write_bytes(out / "curves.csv", table.to_csv(index=False).encode())
    figures.save(plot_curves(table, title), out, "curves", log=log)
    # every run's per-epoch history beside the curves (a branched run's holds its trunk's
    # epochs before the branch, as its checkpoint did)
    frames = [results.history_table(runs.experiment_dir(cfg)).assign(budget=int(point["epochs"]))
              for cfg, point in points]
    frames = [h for h in frames if not h.empty]
    hist = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    runs.atomic_write_bytes(out / results.HISTORIES, hist.to_csv(index=False).encode())
    return table


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
        log("no run to choose budgets from")
        return code or 1
    base = C.load(params, overrides)
    out = runs.experiment_dir(base).with_name(f"{base.experiment}-budget")
    runs.atomic_write_bytes(out / "budgets.csv", table.to_csv(index=False).encode())
    write_curves(out, points, plan.parse_seeds(seeds),
                 f"Budget search, seeds {seeds}: test accuracy (not used for the choice)", log)
    try:
        if code:
            raise ValueError(f"the search's sweep failed (exit code {code}), no budget chosen")
        chosen = choose(table, threshold, budgets)
    except ValueError as e:  # a partial search chooses nothing (rerun: the sweep resumes)
        log(f"{e}\nbudgets.yaml not written; rerun the same command to finish the search")
        return code or 1
    write_choice(out, chosen, budgets, seeds, threshold)
    log(f"\n{chosen.to_string(index=False)}\n\nbudgets chosen on validation: {out / 'budgets.yaml'}")
    return code


def write_choice(out: Path, chosen, budgets, seeds, threshold):
    lines = [f"# chosen by `python -m bilateral budget` on validation accuracy only: budgets "
             f"{budgets}, search seeds {seeds}, the smallest budget within {threshold} points of "
             f"the best; copy into the study's preset before running its seeds"]
    lines += [f"# {r.stage}: no plateau within the budgets tried (only the longest is within the threshold)"
              for r in chosen.itertuples() if not r.plateau]
    body = yaml.safe_dump({"schedule": "wsd",
                           "stage_epochs": {r.stage: int(r.budget) for r in chosen.itertuples()}},
                          sort_keys=False)
    runs.atomic_write_bytes(out / "budgets.yaml", ("\n".join(lines) + "\n" + body).encode())


def draw(params, budgets, seeds, overrides=None, log=sweep.say) -> int:
    """`python -m bilateral curves`: the curves of a study trained at several budgets
    (`sweep --grid epochs=...`), from its finished runs; trains nothing."""
    budgets = sorted({int(b) for b in budgets})
    overrides = {**C.parse_overrides(overrides), "stage_epochs": {}}
    grid = [f"epochs={','.join(map(str, budgets))}"]
    points = sweep.expand_grid(params, sweep.absolute_dirs(params, overrides), grid)
    base = C.load(params, overrides)
    out = runs.experiment_dir(base).with_name(f"{base.experiment}-curves")
    table = write_curves(out, points, plan.parse_seeds(seeds), log=log)
    return 0 if not table.empty else 1
