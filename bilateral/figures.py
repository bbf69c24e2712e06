"""Figures of the notebooks: each function returns a matplotlib Figure; `save` writes it (the
one way every figure of the package is written: atomically, and shown once in a notebook). The
analyses' figures are in analysis/plots.py."""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from . import plan, runs
from .seeds import derive_seed

ACC_LABELS = {"fine_acc": "fine", "coarse_acc": "coarse", "fine_as_coarse_acc": "fine→coarse"}


def save(fig, folder, name: str, *, dpi: int = 120, tight: bool = True, show: bool = True,
         log=print) -> Path:
    """Write fig as folder/name.png, atomically (a reader never sees half a file), and show it
    inline when running in a notebook, once: the figure is closed, so pyplot's inline backend
    does not show it a second time. Every figure of the package is saved through here."""
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
    return path


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


def accuracy_bars(frame: pd.DataFrame, err: pd.DataFrame | None = None, title: str = "",
                  xlabel: str = "test accuracy"):
    """Grouped horizontal bars: one group per row of frame (top to bottom), one bar per column;
    err (same shape) gives error bars."""
    frame = frame.astype(float)
    n, k = frame.shape
    fig, ax = plt.subplots(figsize=(8, 0.32 * n * max(k, 1) + 1.3))
    height = 0.8 / max(k, 1)
    for j, col in enumerate(frame.columns):
        y = [i + (j - (k - 1) / 2) * height for i in range(n)]
        xerr = None if err is None or col not in err else err[col].fillna(0).values
        bars = ax.barh(y, frame[col].values, height, xerr=xerr, capsize=2, label=col)
        for rect, v, e in zip(bars, frame[col].values, xerr if xerr is not None else [0] * n):
            if pd.notna(v):
                ax.text(v + e, rect.get_y() + rect.get_height() / 2, f" {100 * v:.1f}",
                        va="center", fontsize=6)
    ax.set_yticks(range(n))
    ax.set_yticklabels(frame.index, fontsize=8)
    ax.invert_yaxis()
    top = (frame + (0 if err is None else err.reindex_like(frame).fillna(0))).max().max()
    ax.set(xlabel=xlabel, title=title, xlim=(0, min(1.05, 1.15 * top + 0.03) if pd.notna(top) else 1))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
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
    return accuracy_bars(frame, title="bilateral model against its hemispheres\n"
                                      "(the left's coarse bar: its fine predictions mapped to superclasses)")


def results_bars(summary: pd.DataFrame):
    """Mean test accuracy per model across seeds, error bars one sample standard deviation."""
    s = summary.set_index("model")
    cols = [m for m in ("fine_acc", "coarse_acc") if f"{m}_mean" in s]
    mean = s[[f"{m}_mean" for m in cols]].set_axis([ACC_LABELS[m] for m in cols], axis=1)
    sd = s[[f"{m}_sd" for m in cols]].set_axis([ACC_LABELS[m] for m in cols], axis=1)
    n = s[[f"{m}_n" for m in cols]].max(axis=1)
    seeds = f"{n.max()} seeds" if n.min() == n.max() else f"{n.min()}-{n.max()} seeds"
    return accuracy_bars(mean, err=sd, title=f"test accuracy, mean ± sample SD over {seeds}")
