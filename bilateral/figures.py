"""Figures of the notebooks: each function returns a matplotlib Figure; `save` writes it (the
one way every figure of the package is written: atomically, and shown once in a notebook). The
analyses' figures are in analysis/plots.py."""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy import stats

from . import plan, runs
from .results import reference_key
from .seeds import derive_seed

ACC_LABELS = {"fine_acc": "fine", "coarse_acc": "coarse", "fine_as_coarse_acc": "fine→coarse"}


def save(fig, folder, name: str, *, dpi: int = 120, tight: bool = True, show: bool = True,
         log=print) -> None:
    """Write fig as folder/name.png, atomically (a reader never sees half a file), and show it
    inline when running in a notebook, once: the figure is closed, so pyplot's inline backend
    does not show it a second time. Every figure of the package is saved through here. It
    returns nothing, so a notebook cell ending with it echoes no path (log names the file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    path = Path(folder) / f"{name}.png"
    runs.atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)  # a no-op for a Figure made without pyplot
    if show and in_notebook():
        from IPython.display import Image
        display(Image(data=buf.getvalue()))
    if log:
        log(f"saved {path}")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Colab, papermill), False in a terminal."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and type(ip).__name__ != "TerminalInteractiveShell"


def display(obj):
    """IPython's display in a notebook; nothing elsewhere."""
    if in_notebook():
        from IPython.display import display as show
        show(obj)


# ------------------------------------------------------------------------------------ data

def _show(ax, img: torch.Tensor):
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def sample_grid(split, n: int = 16, seed: int = 0, cols: int = 8):
    """n random images of a split, each titled with its fine and (coarse) label."""
    g = torch.Generator().manual_seed(derive_seed(seed, "sample grid"))
    idx = torch.randperm(len(split), generator=g)[:n]
    rows = math.ceil(len(idx) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.95 * rows), squeeze=False,
                             layout="constrained")
    hier = split.hierarchy
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx.tolist()):
        ax.axis("on")
        _show(ax, split.images[i])
        fine = hier.fine_names[split.fine[i]].replace("_", " ")
        coarse = textwrap.shorten(hier.coarse_names[split.coarse[i]].replace("_", " "), 24)
        ax.set_title(f"{fine}\n({coarse})", fontsize=7)
    fig.suptitle(f"{split.name}: fine label (coarse label)", fontsize=10)
    return fig


def hierarchy_figure(hier):
    """The label hierarchy: every coarse class with its fine classes."""
    groups = [(c, [f for f, k in zip(hier.fine_names, hier.fine_to_coarse) if k == i])
              for i, c in enumerate(hier.coarse_names)]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(groups) + 0.6))
    ax.axis("off")
    for r, (coarse, fines) in enumerate(groups):
        y = 1 - (r + 0.5) / len(groups)
        ax.text(0, y, coarse.replace("_", " "), fontweight="bold", fontsize=8, va="center")
        ax.text(0.33, y, ", ".join(f.replace("_", " ") for f in fines), fontsize=8, va="center")
    fig.suptitle(f"{hier.n_coarse} coarse classes (bold) and their {hier.n_fine} fine classes",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------------------- training

def load_history(stage: str, cfg, seed: int) -> pd.DataFrame:
    """history.csv of a run (one row per epoch)."""
    return plan.Run(stage, cfg, seed).history()


def learning_curves(histories: dict):
    """Training loss and validation accuracies per epoch; one colour per run label."""
    from matplotlib.ticker import MaxNLocator
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for label, h in histories.items():
        if h.empty:
            continue
        line, = a.plot(h.epoch, h.train_loss, marker=".", label=label)
        for col, style in (("val_fine_acc", "-"), ("val_coarse_acc", "--"),
                           ("val_fine_as_coarse_acc", ":")):
            if col in h:
                b.plot(h.epoch, h[col], style, marker=".", color=line.get_color())
    a.set(xlabel="epoch", ylabel="training loss", title="training loss")
    b.set(xlabel="epoch", ylabel="validation accuracy",
          title="validation accuracy (— fine, - - coarse, ··· fine→coarse)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*a.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- accuracies

def accuracy_frame(metrics: dict, key: str = "test") -> pd.DataFrame:
    """{label: metrics dict of run_stage} -> rows = labels, columns = fine / coarse / fine→coarse."""
    rows = {label: {ACC_LABELS[k]: v for k, v in (m.get(key, m) or {}).items() if k in ACC_LABELS}
            for label, m in metrics.items()}
    return pd.DataFrame.from_dict(rows, orient="index").reindex(
        columns=[c for c in ACC_LABELS.values() if any(c in r for r in rows.values())])


HEAD_COLOURS = {"fine": "C0", "coarse": "C1", "fine→coarse": "C2"}
LEVEL = 0.95  # the intervals of the accuracy plots


def plural(n: int, word: str) -> str:
    """'1 seed', '5 seeds'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def accuracy_plot(frame: pd.DataFrame, lo: pd.DataFrame | None = None,
                  hi: pd.DataFrame | None = None, title: str = "", note: str | None = None,
                  reference: str | None = None):
    """Accuracies (0-1) as points in percent: one panel per column of frame (a head), each on
    its own axis zoomed to the range of its values, one row per row of frame (top to bottom).
    lo / hi (same shape): the 95% interval of each point, drawn as a line; reference (a row
    label): a dashed line at its value in each panel, so every model reads against it."""
    if note is None:
        note = "one run per model: no interval" if lo is None and hi is None else ""
    frame = frame.astype(float)
    lo, hi = (frame if e is None else e.reindex_like(frame).astype(float).fillna(frame)
              for e in (lo, hi))
    frame, lo, hi = 100 * frame, 100 * lo, 100 * hi
    n, k = frame.shape
    width = 1.2 + 0.068 * max((len(str(i)) for i in frame.index), default=0) + 3.4 * max(k, 1)
    fig, axes = plt.subplots(1, max(k, 1), figsize=(width, 0.3 * n + 1.5), sharey=True,
                             squeeze=False, layout="constrained")
    y = np.arange(n)
    for ax, col in zip(axes.flat, frame.columns):
        v, a, b = frame[col].to_numpy(), lo[col].to_numpy(), hi[col].to_numpy()
        has = ~np.isnan(v)
        colour = HEAD_COLOURS.get(col, "C0")
        if has.any():
            ax.errorbar(v[has], y[has], xerr=np.vstack([v - a, b - v])[:, has], fmt="o",
                        color=colour, ms=5, capsize=3, lw=1.4)
            for vi, bi, yi in zip(v[has], b[has], y[has]):
                ax.annotate(f"{vi:.1f}", (bi, yi), xytext=(5, 0), textcoords="offset points",
                            va="center", fontsize=8.5)
            left, right = np.nanmin(a), np.nanmax(b)
            span = max(right - left, 2.0)
            ax.set_xlim(max(0.0, left - 0.08 * span), right + 0.25 * span)  # room for the labels
            if reference in frame.index and not np.isnan(frame.at[reference, col]):
                ax.axvline(frame.at[reference, col], color="0.35", lw=0.9, ls="--")
        else:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(col, fontsize=11)
        ax.set_xlabel("test accuracy, %", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[0, 0].set_yticks(y, [str(i) for i in frame.index])
    axes[0, 0].set_ylim(n - 0.5, -0.5)  # first row at the top
    lines = [title] if title else []
    lines += [note] if note else []
    if reference in frame.index:
        lines.append(f"dashed: {reference}")
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def bilateral_vs_hemispheres(hemispheres: dict, bilateral: dict):
    """Per condition: left (fine), right (coarse) and the bilateral model's two heads.

    Labels as the plan's runs have them (plan.Stage.label): hemispheres {"A left": metrics,
    "A right": ...}, bilateral {"A bilateral": metrics, ...}."""
    rows = {}
    for label, m in bilateral.items():
        cond = label.split()[0]
        left = hemispheres.get(f"{cond} left", {}).get("test", {})
        right = hemispheres.get(f"{cond} right", {}).get("test", {})
        rows[f"{cond} left"] = {"fine": left.get("fine_acc"), "coarse": left.get("fine_as_coarse_acc")}
        rows[f"{cond} right"] = {"coarse": right.get("coarse_acc")}
        rows[label] = {"fine": m["test"].get("fine_acc"), "coarse": m["test"].get("coarse_acc")}
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=["fine", "coarse"])
    return accuracy_plot(frame, title="bilateral model against its hemispheres, test accuracy",
                         note="one run each: no interval; the left's coarse point: its fine "
                              "predictions mapped to superclasses")


def results_plot(summary: pd.DataFrame):
    """Mean test accuracy per model over seeds with the 95% t-interval of the mean (none for a
    model with one seed); the reference model (results.reference_key) as a dashed line."""
    s = summary.set_index("model")
    cols = [m for m in ("fine_acc", "coarse_acc") if f"{m}_mean" in s]
    names = [ACC_LABELS[m] for m in cols]
    mean = s[[f"{m}_mean" for m in cols]].set_axis(names, axis=1).astype(float)
    sd = s[[f"{m}_sd" for m in cols]].set_axis(names, axis=1).astype(float)
    n = s[[f"{m}_n" for m in cols]].set_axis(names, axis=1).astype(float)
    half = stats.t.ppf(0.5 + LEVEL / 2, (n - 1).where(n > 1)) * sd / np.sqrt(n)
    half = pd.DataFrame(half, index=mean.index, columns=names)
    top = n.max(axis=1)
    lo_n, hi_n = int(top.min()), int(top.max())
    seeds = plural(hi_n, "seed") if lo_n == hi_n else f"{lo_n}-{hi_n} seeds"
    note = (f"lines: {LEVEL:.0%} t-interval of the mean over seeds" if hi_n > 1
            else "one seed: no interval (run more seeds for one)")
    return accuracy_plot(mean, mean - half, mean + half, note=note,
                         title=f"test accuracy, {'mean over ' * (hi_n > 1)}{seeds}",
                         reference=reference_key(list(mean.index)))
