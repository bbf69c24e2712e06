"""The forest plot of results.md: every comparison of results.comparison_table as a difference
with its 95% interval, fine and coarse side by side, rows grouped (hemispheres, bilateral,
baselines, controls, callosal), each row's numbers and n printed beside it.

Rows whose interval reaches far beyond the others (the failed pyramid hemispheres of B and D:
+20 points, intervals 30 points wide) get a panel of their own below, on their own scale, so
they do not squash the 1-2 point differences of the rest. Formatting only: every number comes
in through the table. matplotlib is imported when a figure is drawn.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

HEADS = ("fine_acc", "coarse_acc")
# (group title, stages of the row's label): the order of the groups, top to bottom
GROUPS = (
    ("hemispheres", ("hemisphere",)),
    ("bilateral, other conditions", ("bilateral",)),
    ("baselines", ("bilateral_unspecialised", "unilateral", "resnet18", "resnet34", "ensemble")),
    ("controls (bilateral minus its heads on one hemisphere)", ("one_hemisphere",)),
    ("callosal (minus its bilateral model; own Holm family)", ("callosal", "callosal_unspecialised")),
)
FAR = 3.0       # a row is far when an interval end lies beyond FAR x the near rows' extent
MIN_SPAN = 4.0  # the near panel spans at least +-MIN_SPAN / 2 points: 1-2 points stay visible
FONT = 9


def group_of(label: str) -> str:
    stage = label.split("/", 1)[0]
    return next((g for g, stages in GROUPS if stage in stages), "other")


def _n(r, metric) -> str:
    if f"{metric}_n" not in r or pd.isna(r.get(f"{metric}_n")):
        return ""
    if r[f"{metric}_method"] == "Welch" and f"{metric}_n_a" in r:
        return f"n={int(r[f'{metric}_n_a'])}+{int(r[f'{metric}_n_b'])}"
    return f"n={int(r[f'{metric}_n'])}"


def row_text(r, metric) -> str:
    d, lo, hi = (100 * float(r[f"{metric}_{k}"]) for k in ("diff", "lo", "hi"))
    if math.isnan(d):
        return ""
    n = r.get(f"{metric}_n")
    # no interval: one seed, or (n >= 2) differences without spread, where no test can be made
    ci = (f"[{lo:+.1f}, {hi:+.1f}]" if not math.isnan(lo)
          else "[no spread]" if n is not None and not pd.isna(n) and n >= 2 else "[1 seed]")
    holm = r.get(f"{metric}_p_holm")
    p = "" if holm is None or pd.isna(holm) else f" {holm:.2g}" if holm >= 0.001 else " <.001"
    return f"{d:+.1f} {ci} {_n(r, metric)}{p}"


def layout(comp: pd.DataFrame) -> tuple[list, list]:
    """(near, far): each a list of ("header", title) and ("row", row) in drawing order."""
    comp = comp.copy()
    if "label" not in comp:
        comp["label"] = comp["model"]
    comp["group"] = [group_of(x) for x in comp.label]
    ends = np.abs(np.nan_to_num(np.stack(
        [100 * comp[f"{m}_{k}"].astype(float).to_numpy() for m in HEADS for k in ("diff", "lo", "hi")],
        axis=1)))
    reach = ends.max(axis=1) if len(comp) else np.zeros(0)
    typical = np.median(reach) if len(reach) else 0.0
    far = reach > FAR * max(typical, MIN_SPAN / 2)
    order = [g for g, _ in GROUPS] + ["other"]
    parts = []
    for sel in (~far, far):
        items = []
        for g in order:
            rows = comp[sel & (comp.group == g).to_numpy()]
            if len(rows):
                items.append(("header", g))
                items += [("row", r) for _, r in rows.iterrows()]
        parts.append(items)
    return parts[0], parts[1]


def _panel(ax, tax, items, metric, xlim=None):
    y = np.arange(len(items))
    for yi, (kind, r) in zip(y, items):
        if kind == "header":
            if yi:
                ax.axhline(yi - 0.5, color="0.75", lw=0.8)
                tax.axhline(yi - 0.5, color="0.75", lw=0.8)
            continue
        d, lo, hi = (100 * float(r[f"{metric}_{k}"]) for k in ("diff", "lo", "hi"))
        if math.isnan(d):
            continue
        paired = r[f"{metric}_method"] == "paired"
        family = r.get("family", "main" if r.get("in_family", True) else "")
        colour = {"main": "C0", "callosal": "C3"}.get(family, "0.45")
        err = None if math.isnan(lo) else [[d - lo], [hi - d]]
        ax.errorbar([d], [yi], xerr=err, fmt="o" if paired else "s", color=colour,
                    mfc=colour if paired else "white", ms=5, capsize=2.5, lw=1.3)
        tax.text(0, yi, row_text(r, metric), va="center", ha="left", fontsize=FONT - 0.5,
                 family="monospace")
    ax.axvline(0, color="0.3", lw=1)
    ax.grid(axis="x", alpha=0.35)
    ax.tick_params(labelsize=FONT)
    if xlim is not None:
        ax.set_xlim(*xlim)
    for a in (ax, tax):
        a.set_ylim(len(items) - 0.5, -0.5)
    tax.set_xlim(0, 1)
    tax.axis("off")


def _xlim(items, metric):
    vals = [100 * float(r[f"{metric}_{k}"]) for kind, r in items if kind == "row"
            for k in ("diff", "lo", "hi")]
    vals = [v for v in vals if not math.isnan(v)] + [0.0]
    lo, hi = min(vals), max(vals)
    if hi - lo < MIN_SPAN:
        mid = (hi + lo) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def forest_plot(comp: pd.DataFrame):
    """The figure: near rows on top, far rows (if any) in their own panel below."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    near, far = layout(comp)
    parts = [p for p in (near, far) if p]
    heights = [len(p) + 1.2 for p in parts]
    fig = plt.figure(figsize=(15, 0.27 * sum(heights) + 2.2), layout="constrained")
    grid = fig.add_gridspec(len(parts), 4, height_ratios=heights, width_ratios=[3, 2.7, 3, 2.7])
    ref = comp.reference.iloc[0] if len(comp) else ""
    for i, items in enumerate(parts):
        is_far = items is far
        for j, metric in enumerate(HEADS):
            ax, tax = fig.add_subplot(grid[i, 2 * j]), fig.add_subplot(grid[i, 2 * j + 1])
            _panel(ax, tax, items, metric, _xlim(items, metric))
            head = metric.replace("_acc", "")
            ax.set_title(f"{head}{', far rows' if is_far else ''}", fontsize=FONT + 2)
            tax.set_title("Δ [95% CI] n Holm-p", fontsize=FONT, loc="left", family="monospace")
            ax.set_xlabel("difference, % points", fontsize=FONT)
            labels = [f"— {r} —" if kind == "header" else r.get("label", r["model"])
                      for kind, r in items]
            ax.set_yticks(np.arange(len(items)), labels if j == 0 else [""] * len(items))
            if j == 0:
                for t, (kind, _) in zip(ax.get_yticklabels(), items):
                    if kind == "header":
                        t.set_fontweight("bold")
                        t.set_fontsize(FONT)
            else:
                ax.tick_params(axis="y", length=0)
    handles = [Line2D([], [], marker="o", color="k", ls="", label="paired (shared runs)"),
               Line2D([], [], marker="s", color="k", mfc="white", ls="", label="Welch (independent seeds)"),
               Line2D([], [], color="C0", lw=3, label="main family (Holm)"),
               Line2D([], [], color="C3", lw=3, label="callosal family (Holm)"),
               Line2D([], [], color="0.45", lw=3, label="exploratory (no correction)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize=FONT, frameon=False)
    fig.suptitle(f"Test accuracy differences with 95% intervals: {ref} minus each model "
                 f"(callosal rows: callosal minus its bilateral model)\n"
                 f"positive: the first model ahead. Rows reaching far beyond the rest: own panel "
                 f"below, own scale. n: paired seeds, or seeds of each model (Welch)",
                 fontsize=FONT + 2)
    return fig
