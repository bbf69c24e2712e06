"""results.md and its forest plot, from the tables `results` computes: formatting only.

Every number here comes in through the arguments (results.summary_table, comparison_table,
kwta_table, analysis_table), so this module neither reads records nor does statistics.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .runs import atomic_write_bytes

FOREST = "results_forest.png"  # written next to results.md, shown at its top


def _pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(row, metric):
    n = row[f"{metric}_n"]
    if not n:
        return "—"
    sd = row[f"{metric}_sd"]
    return f"{_pct(row[f'{metric}_mean'])} ± {_pct(sd) if n > 1 else 'n/a'} ({n})"


def _signed(x):
    return f"{round(100 * x, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _ci(d: dict) -> str:
    if math.isnan(d["diff"]):
        return "—"
    if math.isnan(d["lo"]):
        return f"{_signed(d['diff'])} [n/a (1 seed)]"
    return f"{_signed(d['diff'])} [{_signed(d['lo'])}, {_signed(d['hi'])}] ({d['method']})"


def row_ci(row, metric):
    return _ci({k: row[f"{metric}_{k}"] for k in ("diff", "lo", "hi", "method")})


def _count(x):
    return "—" if x is None or pd.isna(x) else f"{int(x):,}"


def _model_cell(row):
    return row["model"] + (f" ↑{row['rising']}/{row['judged']}" if row["rising"] else "")


def table(header, rows) -> list[str]:
    # cells are formatted text already: no number parsing (it would re-format "1e-05", "8")
    return pd.DataFrame(rows, columns=header).to_markdown(index=False, disable_numparse=True).splitlines()


def _describe(info: dict, forest: bool) -> list[str]:
    lines = [f"# Results: {info['name']}", ""]
    if forest:
        lines += [f"![bilateral model minus every other model, 95% intervals]({FOREST})", ""]
    if info.get("dataset"):
        data = info["dataset"]
        lines.append(f"Data: **{data}**" + (
            " (synthetic images: these numbers check the code, they say nothing about the study)"
            if data == "synthetic" else "") +
            f"; recipe {info.get('recipe')}, width {info.get('width')}, backbone "
            f"{info.get('backbone')}; the epochs of each model are in the table.")
    lines += [f"Seeds: {', '.join(map(str, info['seeds']))}. Rebuild with "
              f"`python -m bilateral report {info['path']}`.", ""]
    return lines


def accuracy_section(summ: pd.DataFrame, rising_z: float) -> list[str]:
    lines = ["## Test accuracy per model", "",
             "Accuracy in % as mean ± sample standard deviation (n-1 denominator) over seeds, "
             "with the number of seeds in brackets. `fine→coarse` is the fine prediction mapped "
             "to its superclass. The unilateral row averages each seed's pool members first. "
             "Total parameters count everything the model computes with (the specialised "
             "bilateral model: both frozen hemispheres and its heads; an ensemble: its members); "
             "trainable ones only what the run itself trained. `↑k/n`: validation accuracy was "
             f"still rising at the last epoch in k of the n runs judged (the gain over the last "
             f"max(4, epochs/4) epochs, on a least-squares line, exceeds {rising_z:g} standard "
             "errors of one validation accuracy; runs under 4 epochs are not "
             "judged): that model may be under-trained.", ""]
    rows = [[_model_cell(r), _cell(r, "fine_acc"), _cell(r, "coarse_acc"),
             _cell(r, "fine_as_coarse_acc"), _count(r["total_params"]),
             _count(r["trainable_params"]), r["epochs"] or "—",
             ", ".join(f"{w:g}" for w in r["weight_decay"]) or "—"]
            for _, r in summ.iterrows()]
    return lines + table(["model", "fine", "coarse", "fine→coarse", "total params",
                           "trainable params", "epochs", "weight decay"], rows)


def decay_note(summ: pd.DataFrame, ref: str) -> list[str]:
    """Which comparisons with the reference are free of the weight-decay confound, from the
    weight decay the runs recorded (a bilateral model's: its hemispheres')."""
    wd = {r["model"]: tuple(r["weight_decay"]) for _, r in summ.iterrows()}
    own = wd.get(ref, ())
    if not own:
        return []
    fair = [k for k in wd if k != ref and wd[k] == own]
    unfair = [f"{k} ({', '.join(f'{w:g}' for w in wd[k])})" for k in wd
              if k != ref and wd[k] and wd[k] != own]
    lines = ["", f"Weight decay (from the runs' records): {ref}'s hemispheres were trained with "
                 f"{', '.join(f'{w:g}' for w in own)}. "]
    if not unfair:
        return lines[:1] + [lines[1] + "Every model was trained with the same weight decay, so "
                            "no comparison is confounded with regularisation."]
    return lines[:1] + [lines[1] + "Free of the regularisation confound (same weight decay): "
                        + (", ".join(fair) or "none") + ". Confounded (different weight decay): "
                        + ", ".join(unfair) + "; the `weight_decay_equal` ablation removes it."]


def comparison_section(comp: pd.DataFrame, summ: pd.DataFrame) -> list[str]:
    if not len(comp):
        return []
    ref = comp.reference.iloc[0]
    lines = ["", f"## {ref} against every other model", "",
             f"Difference of mean test accuracy ({ref} minus the model), percentage points, with "
             "a 95% confidence interval over seeds (scipy.stats). **paired**: the model shares "
             f"runs with {ref} (its own hemispheres, or a callosal model built on them, seed by seed), t-interval of the per-seed "
             "differences (`ttest_rel`). **Welch**: the models were trained from independent "
             "seeds, Welch's interval (`ttest_ind(equal_var=False)`). One seed gives no "
             "interval.", ""]
    rows = [[r["model"], row_ci(r, "fine_acc"), row_ci(r, "coarse_acc")]
            for _, r in comp.iterrows()]
    return lines + table(["model", "Δ fine [95% CI]", "Δ coarse [95% CI]"], rows) + \
        decay_note(summ, ref)


def kwta_section(kw: pd.DataFrame) -> list[str]:
    if not len(kw):
        return []
    rules = [r for r in ("threshold", "map_only", "batch") if r in kw]
    lines = ["", "## k-WTA at evaluation (conditions C and D)", "",
             "Each k-WTA run evaluated on the test set under every rule (the rule changes "
             "evaluation only, so these are the same trained runs): `threshold`, per-channel "
             "thresholds tracked in training (the training sparsity, about k·k_batch of the "
             "activations); `map_only`, the per-map stage alone (about k survive, a "
             "distribution BatchNorm never saw in training); `batch`, both stages on the test "
             "batch (the original's, batch-dependent). Accuracy in % (mean ± SD (n)); the last "
             "column: threshold minus map_only, paired 95% interval.", ""]
    fmt = lambda t: f"{_pct(t[0])} ± {_pct(t[1])} ({t[2]})"  # noqa: E731
    rows = [[r["model"], r["metric"].replace("_acc", ""),
             *(fmt(r[x]) if isinstance(r.get(x), tuple) else "—" for x in rules),
             _ci(r["threshold_minus_map_only"]) if isinstance(r.get("threshold_minus_map_only"), dict)
             else "—"] for _, r in kw.iterrows()]
    return lines + table(["model", "head", *rules, "Δ threshold − map_only"], rows)


def analysis_section(an: pd.DataFrame | None, n_metrics: int) -> list[str]:
    if an is None or not len(an):
        return []
    lines = ["", "## Analyses", "",
             f"Mean ± sample standard deviation over seeds (n) of the analysis records "
             f"(`bilateral.analysis`); spreads, quantiles and counts are left out here: "
             f"results.csv holds all {n_metrics} metrics (stage `analysis`).", ""]
    rows = [[metric, *row] for metric, row in zip(an.index, an.values.tolist())]
    return lines + table(["metric", *(f"condition {c}" if c else "—" for c in an.columns)], rows)


def markdown(info: dict, summ, comp, kw, analysis, *, n_analysis=0, forest=False,
             rising_z=2.0) -> str:
    lines = (_describe(info, forest) + accuracy_section(summ, rising_z)
             + comparison_section(comp, summ) + kwta_section(kw)
             + analysis_section(analysis, n_analysis))
    return "\n".join(lines) + "\n"


def grid_markdown(df: pd.DataFrame, keys: list[str]) -> str:
    """One table across the points of a grid: a column per grid key, then the accuracies."""
    rows = [[*(r[k] for k in keys), r["model"], _cell(r, "fine_acc"), _cell(r, "coarse_acc"),
             _cell(r, "fine_as_coarse_acc")] for _, r in df.iterrows()]
    lines = [f"# Grid over {', '.join(keys)}", "", "Test accuracy in %, mean ± sample SD over "
             "seeds (n); one experiment per grid point, each with its own results.md.", "",
             *table([*keys, "model", "fine", "coarse", "fine→coarse"], rows)]
    return "\n".join(lines) + "\n"


def forest_plot(comp: pd.DataFrame):
    """The reference minus every other model, fine and coarse side by side: the point is the
    difference of means, the bar its 95% interval (filled: paired, open: Welch)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    n = len(comp)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * n + 1.4), sharey=True, squeeze=False)
    y = np.arange(n)
    for ax, metric in zip(axes.flat, ("fine_acc", "coarse_acc")):
        d, lo, hi = (100 * comp[f"{metric}_{k}"].astype(float).to_numpy() for k in ("diff", "lo", "hi"))
        for shared, fill in ((True, "C0"), (False, "white")):
            sel = (comp[f"{metric}_method"] == "paired").to_numpy() == shared
            if not sel.any():
                continue
            err = np.vstack([d - lo, hi - d])[:, sel]
            ax.errorbar(d[sel], y[sel], xerr=np.nan_to_num(err), fmt="o", color="C0",
                        mfc=fill, capsize=3, label="paired (shared runs)" if shared else "Welch")
        ax.axvline(0, color="grey", lw=1)
        ax.set(title=f"{metric.replace('_acc', '')}: reference minus model (points)",
               xlabel="difference in test accuracy, % points")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(y, comp.model)
    axes[0, 0].invert_yaxis()
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=2,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{comp.reference.iloc[0]} against every other model, 95% intervals")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def save_forest(exp: Path, comp: pd.DataFrame) -> Path | None:
    if not len(comp):
        return None
    import matplotlib.pyplot as plt
    fig = forest_plot(comp)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(exp / FOREST, buf.getvalue())
    return exp / FOREST
