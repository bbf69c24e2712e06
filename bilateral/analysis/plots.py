"""Figures of the analyses: each function takes plain data and returns a matplotlib Figure;
`figures.save` writes it (and shows it in a notebook). Most are built without pyplot (no
backend, no global registry); the seaborn joint plots make their own pyplot figures, which
`save` closes."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import cam
from .measures import HEMI_CODES


def figure(**kw):
    from matplotlib.figure import Figure
    return Figure(**kw)


# --------------------------------------------------------------------------------- outcomes

def outcome_heatmaps(tables: dict, title: str = ""):
    """The 4x4 outcome-scenario counts of each condition ({condition: table}) as heatmaps."""
    fig = figure(figsize=(4.6 * len(tables), 4.2), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)
    for ax, (cond, table) in zip(axes.flat, tables.items()):
        t = table.drop(index="total", columns="total", errors="ignore")
        ax.imshow(t.values, cmap="Blues")
        ax.set_xticks(range(t.shape[1]), t.columns)
        ax.set_yticks(range(t.shape[0]), t.index)
        ax.set(xlabel="bilateral: F fine, C coarse head", title=f"condition {cond}")
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                v = t.values[i, j]
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > t.values.max() / 2 else "black")
    axes.flat[0].set_ylabel("hemispheres: L left (fine), R right (coarse)")
    fig.suptitle(title or "test images per outcome scenario (1 right, 0 wrong)")
    return fig


# --------------------------------------------------------------------------------- Grad-CAM

def localisation_figure(samp: pd.DataFrame, kinds, frac: float, title: str):
    """Box plots of the localisation measure (columns area.<kind> of samp) per heatmap kind."""
    fig = figure(figsize=(7, 3))
    ax = fig.subplots()
    vals = [samp[f"area.{k}"].dropna().to_numpy() for k in kinds]
    if all(len(v) for v in vals):
        ax.boxplot(vals, showfliers=False)
    ax.set_xticks(range(1, len(kinds) + 1))
    ax.set_xticklabels([k.replace("_", "\n") for k in kinds], fontsize=7)
    ax.set_ylabel(f"fraction of image >= {frac:g} x peak", fontsize=8)
    ax.set_title(f"Grad-CAM localisation, {title} ({len(samp)} test images; lower = more local)",
                 fontsize=9)
    return fig


def _mosaic(images, maps: dict, columns, pad=2, scale=3):
    """One RGB array: a row per image, the image then its overlays, tiles upscaled `scale`x."""
    rows = []
    for i in range(len(images)):
        img = images[i].permute(1, 2, 0).cpu().numpy()
        tiles = [img] + [cam.overlay(images[i], maps[k][i]) for k in columns]
        tiles = [np.kron(t, np.ones((scale, scale, 1), dtype=np.uint8)) for t in tiles]
        h = tiles[0].shape[0]
        sep = np.full((h, pad, 3), 255, np.uint8)
        row = np.concatenate(sum([[t, sep] for t in tiles], [])[:-1], 1)
        rows += [row, np.full((pad, row.shape[1], 3), 255, np.uint8)]
    return np.concatenate(rows[:-1], 0), h + pad


def grid_figure(images, maps, columns, row_labels, title):
    """Images (uint8, N x 3 x H x W) in rows, each followed by its heatmaps maps[k] for k in
    columns."""
    mosaic, step = _mosaic(images, maps, columns)
    n_rows, n_cols = len(images), len(columns) + 1
    # margins in inches, so the figure needs no bbox_inches="tight" (which draws it twice)
    tile, left, top, bottom = 0.95, 0.1 + 0.055 * max(map(len, row_labels)), 0.75, 0.1
    w, h = tile * n_cols + left + 0.1, tile * n_rows + top + bottom
    fig = figure(figsize=(w, h))
    ax = fig.add_axes((left / w, bottom / h, tile * n_cols / w, tile * n_rows / h))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([step * (c + 0.5) for c in range(n_cols)])
    ax.set_xticklabels(["image", *[k.replace("_", " ").replace(".", "\n@") for k in columns]],
                       fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([step * (r + 0.5) for r in range(n_rows)])
    ax.set_yticklabels(row_labels, fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(title, fontsize=9)
    return fig


# ------------------------------------------------------------------------------- similarity

def similarity_joint(points: pd.DataFrame, title: str, by: str = "bilateral"):
    """Left against right cosine similarity of pairs with marginal histograms (seaborn's
    JointGrid). points: columns left, right, bilateral (cosines) and group (a scenario).

    by="bilateral": each pair coloured by its bilateral (concatenated) cosine.
    by="hemispheres": coloured by its scenario's hemisphere outcome (L1R1, ...), one marginal
    histogram each, so whether a hemisphere was right shows as a shift along its axis."""
    import seaborn as sns

    lo = float(points[["left", "right"]].min().min()) if len(points) else 0.0
    lo = max(-1.0, lo - 0.03 * (1 - lo))   # the data's range: cosines of ReLU features crowd near 1
    lims, bins = (lo, 1.0), np.linspace(lo, 1.0, 41)
    points = points.sample(frac=1, random_state=0)  # drawing order: no group hides the others
    marg = dict(bins=bins, element="step", fill=False, stat="density")
    if by == "hemispheres":
        d = points.assign(hemispheres=points.group.str.slice(0, 4))
        order = [h for h in HEMI_CODES if h in set(d.hemispheres)]
        g = sns.JointGrid(data=d, x="left", y="right", hue="hemispheres", hue_order=order,
                          palette="tab10", xlim=lims, ylim=lims, height=5.5)
        g.plot_joint(sns.scatterplot, s=5, linewidth=0)
        g.plot_marginals(sns.histplot, common_norm=False, **marg)
    elif by == "bilateral":
        g = sns.JointGrid(data=points, x="left", y="right", xlim=lims, ylim=lims, height=5.5)
        g.plot_joint(sns.scatterplot, hue=points.bilateral.to_numpy(), palette="viridis", s=5,
                     linewidth=0)
        g.plot_marginals(sns.histplot, **marg)
    else:
        raise ValueError(f"by={by!r}; allowed: bilateral, hemispheres")
    leg = g.ax_joint.get_legend()
    if leg is not None:
        leg.set_title("bilateral cosine" if by == "bilateral" else "hemispheres", prop={"size": 7})
        for t in leg.get_texts():
            t.set_fontsize(7)
    g.ax_joint.plot(lims, lims, color="0.6", lw=0.6, ls="--")
    g.set_axis_labels("left cosine", "right cosine")
    g.figure.suptitle(f"{title} ({len(points)} pairs shown)", fontsize=9)
    g.figure.subplots_adjust(top=0.93)
    return g.figure


# ------------------------------------------------------------------------------ attribution

def attribution_figure(df: pd.DataFrame, coarse_names, title: str):
    """Left share of each head's predicted logit (centred and uncentred features), the mean
    signed contributions of each half, and the centred left share per true coarse class (one
    row per class, so 20 class names read at full size)."""
    names = [str(c) for c in coarse_names]
    fig = figure(figsize=(14, max(3.8, 0.24 * len(names) + 1.6)), layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1.1, 1.1, 1.5]))
    overall = df[df["coarse_class"] == "all"]
    cen, unc = overall[overall.centring == "centred"], overall[overall.centring == "uncentred"]
    labels = [f"{m.replace('bilateral_unspecialised', 'unspec.')}\n{h}" for m, h in zip(cen["model"], cen["head"])]
    xs = np.arange(len(cen))
    ax0.bar(xs - 0.2, cen["left_share_mean"], 0.4, yerr=cen["left_share_std"], color="C0",
            capsize=2, label="centred")
    ax0.bar(xs + 0.2, unc["left_share_mean"], 0.4, color="C0", alpha=0.35, label="uncentred")
    ax0.axhline(0.5, color="0.3", lw=0.6, ls="--")
    ax0.set(ylim=(0, 1), xticks=xs)
    ax0.set_xticklabels(labels, fontsize=8.5)
    ax0.set_ylabel("left share of the predicted logit", fontsize=9)
    ax0.legend(fontsize=8.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax1.bar(xs - 0.2, cen["left_contrib_mean"], 0.4, yerr=cen["left_contrib_std"], color="C0",
            capsize=2, label="left")
    ax1.bar(xs + 0.2, cen["right_contrib_mean"], 0.4, yerr=cen["right_contrib_std"], color="C1",
            capsize=2, label="right")
    ax1.axhline(0, color="0.3", lw=0.6)
    ax1.set_xticks(xs)
    ax1.set_xticklabels(labels, fontsize=8.5)
    ax1.set_ylabel("signed contribution (centred), logit units", fontsize=9)
    ax1.legend(fontsize=8.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    per = df[(df["coarse_class"] != "all") & (df.centring == "centred")]
    cy = np.arange(len(names))
    for (m, h), g in per.groupby(["model", "head"], sort=False):
        x = g.assign(coarse_class=g["coarse_class"].astype(str)).set_index("coarse_class")
        x = x.reindex(names)["left_share_mean"]
        ax2.plot(x.to_numpy(), cy, marker="o", ms=4, lw=1, ls="-" if m == "bilateral" else ":",
                 label=f"{m} {h}")
    ax2.axvline(0.5, color="0.3", lw=0.6, ls="--")
    ax2.set_yticks(cy, [c.replace("_", " ") for c in names], fontsize=8.5)
    ax2.set_ylim(len(names) - 0.5, -0.5)
    ax2.set_xlim(0, 1)
    ax2.grid(alpha=0.3)
    ax2.set_xlabel("centred left share, per true coarse class", fontsize=9)
    fig.legend(*ax2.get_legend_handles_labels(), fontsize=8.5, loc="outside right upper")
    fig.suptitle(f"Head attribution to the left / right hemisphere features, {title}", fontsize=10)
    return fig
