"""The study's analyses as numbers with their spread, and the figures behind them.

`run_analyses(cfg, seed)` analyses every condition of cfg.conditions whose bilateral run of this
seed exists, and writes to outputs/<experiment>/analysis/<condition>/seed=<k>/:

- scenarios.csv: the 4x4 table of outcome scenarios on the test set. A scenario is named by
  who is right: L = left hemisphere (fine), R = right hemisphere (coarse), F and C = the
  bilateral fine and coarse heads, 1 = right, 0 = wrong; "L1R1-F1C1" is all four right.
- Grad-CAM (see cam.py): gradcam/<scenario>.png grids (image, left hemisphere, right
  hemisphere, bilateral fine, coarse and both heads; both heads also per hemisphere),
  gradcam_overview.png (one image per scenario), cam_localisation.csv/.png: per heatmap the
  fraction of the image at or above half its peak (small = local) on a random sample of test
  images, summarised per heatmap kind over images.
- Feature similarity: for pairs of test images with the same fine label, both in the same
  scenario, the cosine similarity of their left, right and concatenated [left | right]
  features; similarity_joint.png (left vs right, bilateral as colour, marginal histograms,
  one panel per scenario and one for all pairs) and similarity_medians.csv.
- Head attribution: for each head of the bilateral model (and of bilateral_unspecialised when
  its run of this condition exists), the share of the predicted class's logit that comes from
  each half of the features. Softmax ignores what all classes share, so the weights are
  centred over classes first: contribution of a half = (w_k - mean_j w_j) . x over that half,
  share = |contribution| / (|left| + |right|), per image, then mean and std over the test set,
  overall and per true coarse class. attribution.csv/.png.
- Specialisation probes: logistic regression on frozen features (standardised on the train
  sample, small L2, full-batch L-BFGS), fitted on a fixed random sample of the train split
  and scored on the whole test split, for each hemisphere and label level: probes.csv (2x2).
  Differential specialisation = mean of (left - right on fine) and (right - left on coarse):
  > 0 when each hemisphere serves its own level better than the other one does.
- metrics.json: every scalar above, flat {name: float}; results.csv ingests it.

Spread over seeds comes from running this per seed; `compare(cfg)` tabulates it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cam, data, runs, stages, train

OUTCOMES = ("left", "right", "bilateral_fine", "bilateral_coarse")
HEMI_CODES = ("L1R1", "L1R0", "L0R1", "L0R0")
BILAT_CODES = ("F1C1", "F1C0", "F0C1", "F0C0")
SCENARIOS = tuple(f"{h}-{b}" for h in HEMI_CODES for b in BILAT_CODES)  # all right first
# Heatmap kinds: hemisphere models alone, and the bilateral model per head (or both heads
# summed), on both hemispheres' residual blocks together or on one hemisphere's.
CAM_KINDS = ("left_hemisphere", "right_hemisphere", "bilateral_fine", "bilateral_coarse",
             "bilateral_both", "bilateral_fine.left", "bilateral_fine.right",
             "bilateral_coarse.left", "bilateral_coarse.right",
             "bilateral_both.left", "bilateral_both.right")
GRID_COLUMNS = ("left_hemisphere", "right_hemisphere", "bilateral_fine", "bilateral_coarse",
                "bilateral_both", "bilateral_both.left", "bilateral_both.right")

DEFAULTS = dict(
    cam_images=256,        # random test images for the localisation statistics
    cam_per_scenario=4,    # images per scenario in the Grad-CAM grids
    cam_frac=0.5,          # localisation: fraction of pixels >= cam_frac * peak
    max_pairs=5000,        # same-fine-label pairs per scenario for similarity (sampled)
    plot_pairs=1500,       # of those, points drawn per panel
    probe_train=10000,     # train images the probes are fitted on (sampled)
    probe_l2=1e-4,
    probe_iters=200,
    batch_size=256,
)


# --------------------------------------------------------------------------------- outcomes

def scenario_index(correct: dict) -> torch.Tensor:
    """Index into SCENARIOS of every image, from the four bool tensors of OUTCOMES."""
    L, R, Fc, Cc = (correct[k].long() for k in OUTCOMES)
    hemi = (1 - L) * 2 + (1 - R)       # L1R1=0, L1R0=1, L0R1=2, L0R0=3
    bil = (1 - Fc) * 2 + (1 - Cc)
    return hemi * 4 + bil


def scenario_table(index: torch.Tensor):
    import pandas as pd
    counts = torch.bincount(index, minlength=16).reshape(4, 4).numpy()
    return pd.DataFrame(counts, index=pd.Index(HEMI_CODES, name="hemispheres"),
                        columns=pd.Index(BILAT_CODES, name="bilateral"))


# ------------------------------------------------------------------------------ similarity

def same_label_pairs(labels: torch.Tensor, members: torch.Tensor | None = None,
                     max_pairs: int | None = None, generator=None):
    """(i, j), i < j, of the images among `members` (indices; default all) that share a label,
    and the number of such pairs before subsampling to max_pairs."""
    members = torch.arange(len(labels)) if members is None else torch.as_tensor(members)
    ii, jj = [], []
    lab = labels[members]
    for c in torch.unique(lab):
        idx = members[lab == c]
        if len(idx) >= 2:
            t = torch.triu_indices(len(idx), len(idx), 1)
            ii.append(idx[t[0]])
            jj.append(idx[t[1]])
    if not ii:
        e = torch.empty(0, dtype=torch.long)
        return e, e, 0
    i, j = torch.cat(ii), torch.cat(jj)
    total = len(i)
    if max_pairs is not None and total > max_pairs:
        keep = torch.randperm(total, generator=generator)[:max_pairs]
        i, j = i[keep], j[keep]
    return i, j, total


def pair_cosine(feats: torch.Tensor, i, j) -> torch.Tensor:
    f = F.normalize(feats.float(), dim=1)
    return (f[i] * f[j]).sum(1)


# ---------------------------------------------------------------------------- attribution

def head_attribution(weight: torch.Tensor, feats: torch.Tensor, n_left: int,
                     target: torch.Tensor | None = None) -> torch.Tensor:
    """Left share per image of the target logit (default: the predicted class) of a linear
    head on [left | right] features; the right share is 1 minus it. Weights are centred over
    classes (softmax ignores a shift shared by all classes). NaN where both halves give 0."""
    w = weight.float()
    feats = feats.float().to(w.device)
    if target is None:
        target = (feats @ w.T).argmax(1)
    wc = (w - w.mean(0, keepdim=True))[target.to(w.device)]          # (N, D)
    contrib = wc * feats
    left = contrib[:, :n_left].sum(1).abs()
    right = contrib[:, n_left:].sum(1).abs()
    total = left + right
    return torch.where(total > 0, left / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


# ---------------------------------------------------------------------------------- probes

@dataclasses.dataclass
class Probe:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x):
        return ((x.float().to(self.mean.device) - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, x, y) -> float:
        return (self.logits(x).argmax(1).cpu() == y.cpu()).float().mean().item()


def fit_probe(x, y, n_classes: int, l2: float = 1e-4, iters: int = 200) -> Probe:
    """Multinomial logistic regression on standardised features: full-batch L-BFGS."""
    x = x.float()
    y = y.to(x.device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-8)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(mean, std, w.detach(), b.detach())


def differential_specialisation(acc: dict) -> dict:
    """acc[(side, level)] -> gaps and their mean; > 0 when each hemisphere is better at its own
    level (left: fine, right: coarse) than the other hemisphere is."""
    gap_fine = acc[("left", "fine")] - acc[("right", "fine")]
    gap_coarse = acc[("right", "coarse")] - acc[("left", "coarse")]
    return {"gap_fine": gap_fine, "gap_coarse": gap_coarse,
            "differential_specialisation": (gap_fine + gap_coarse) / 2}


# ------------------------------------------------------------------------------ statistics

def spread(values, prefix: str) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {f"{prefix}.mean": float(v.mean()), f"{prefix}.std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            f"{prefix}.median": float(med), f"{prefix}.q25": float(q25), f"{prefix}.q75": float(q75),
            f"{prefix}.n": float(len(v))}


# ------------------------------------------------------------------------- models and data

def _finished(cfg, stage, seed) -> bool:
    c = stages.stage_config(cfg, stage)
    return runs.finished(runs.run_dir(c, stage, stages.run_name(stage, c), seed))


def available(cfg, seed, condition) -> bool:
    c = dataclasses.replace(cfg, condition=condition)
    return _finished(c, "bilateral", seed) and all(
        _finished(dataclasses.replace(c, side=s), "hemisphere", seed) for s in ("left", "right"))


def out_dir(cfg, condition, seed) -> Path:
    return Path(cfg.out_dir) / cfg.experiment / "analysis" / condition / f"seed={seed}"


def _subset(split, idx):
    return data.Split(split.images[idx], split.fine[idx], split.coarse[idx], split.hierarchy, split.name)


def _loader(split, device, batch_size):
    return data.DeviceLoader(split, batch_size, device=device, shuffle=False, augment=False)


def _collect(fn, loader, device, amp):
    return train.predict(fn, loader, device, amp)[0]


def _bilateral_outputs(bil, left_head=None, right_head=None):
    def fn(x):
        fl, fr = bil.left(x).float(), bil.right(x).float()
        out = {"left_feat": fl, "right_feat": fr, **bil.classify(torch.cat([fl, fr], 1))}
        if left_head is not None:
            out["left_logits"] = left_head(fl)
            out["right_logits"] = right_head(fr)
        return out
    return fn


def _normalised(split, idx, device):
    dl = _loader(_subset(split, idx), device, max(1, len(idx)))
    return next(iter(dl))["x"]


# -------------------------------------------------------------------------------- figures

def _save(fig, path: Path, show: bool, dpi=110, tight=True):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    png = buf.getvalue()
    runs.atomic_write_bytes(path, png)
    if show:
        _display_png(png)


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and type(ip).__name__ != "TerminalInteractiveShell"


def _display_png(png: bytes):
    if _in_ipython():
        from IPython.display import Image, display
        display(Image(data=png))


def _display(obj):
    if _in_ipython():
        from IPython.display import display
        display(obj)


def _figure(**kw):
    from matplotlib.figure import Figure  # no pyplot: no backend, no global figure registry
    return Figure(**kw)


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


def _grid_figure(images, maps, columns, row_labels, title):
    mosaic, step = _mosaic(images, maps, columns)
    n_rows, n_cols = len(images), len(columns) + 1
    # margins in inches, so the figure needs no bbox_inches="tight" (which draws it twice)
    tile, left, top, bottom = 0.95, 0.1 + 0.055 * max(map(len, row_labels)), 0.75, 0.1
    w, h = tile * n_cols + left + 0.1, tile * n_rows + top + bottom
    fig = _figure(figsize=(w, h))
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


def _similarity_figure(panels, title):
    """panels: [(name, left, right, bilateral)] of 1-D arrays; left vs right, bilateral as colour."""
    n = len(panels)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig = _figure(figsize=(3.4 * ncol + 0.8, 3.5 * nrow + 0.5))
    axes = fig.subplots(nrow, ncol, squeeze=False, gridspec_kw=dict(
        left=0.6 / (3.4 * ncol + 0.8), right=1 - 1.3 / (3.4 * ncol + 0.8), wspace=0.45,
        top=1 - 1.0 / (3.5 * nrow + 0.5), bottom=0.5 / (3.5 * nrow + 0.5), hspace=0.55)).ravel()
    allb = np.concatenate([p[3] for p in panels]) if panels else np.zeros(1)
    vmin, vmax = float(np.nanmin(allb)), float(np.nanmax(allb))
    sc = None
    bins = np.linspace(min(0.0, min(float(np.min(p[1:3])) for p in panels)), 1.0, 31)
    for ax, (name, l, r, b) in zip(axes, panels):
        sc = ax.scatter(l, r, c=b, s=4, cmap="viridis", vmin=vmin, vmax=vmax, linewidths=0)
        ax.set_xlim(bins[0], 1)
        ax.set_ylim(bins[0], 1)
        ax.plot([bins[0], 1], [bins[0], 1], color="0.6", lw=0.6, ls="--")
        ax.set_xlabel("left cosine", fontsize=7)
        ax.set_ylabel("right cosine", fontsize=7)
        ax.tick_params(labelsize=6)
        top = ax.inset_axes([0, 1.02, 1, 0.18], sharex=ax)
        side = ax.inset_axes([1.02, 0, 0.18, 1], sharey=ax)
        top.hist(l, bins=bins, color="C0")
        side.hist(r, bins=bins, color="C1", orientation="horizontal")
        top.axis("off")
        side.axis("off")
        top.set_title(f"{name} ({len(l)} pairs shown)", fontsize=8)
    for ax in axes[n:]:
        ax.axis("off")
    if sc is not None:
        cax = fig.add_axes((1 - 0.75 / (3.4 * ncol + 0.8), 0.25, 0.15 / (3.4 * ncol + 0.8), 0.5))
        fig.colorbar(sc, cax=cax, label="bilateral (concatenated) cosine")
    fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------- one condition

def analyse_condition(cfg, seed: int, condition: str, show: bool = False, log=print, **caps) -> dict:
    """Every analysis of one condition and seed; writes its folder and returns its metrics."""
    unknown = set(caps) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown analysis parameter(s): {', '.join(sorted(unknown))}; "
                        f"allowed: {', '.join(DEFAULTS)}")
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, condition=condition)
    device = train.pick_device(cfg.device)
    train_split, _, test_split = stages.load_splits(cfg)
    hier = test_split.hierarchy
    load = lambda stage, c=cfg: stages.load_run_model(stage, c, seed, hier, device)  # noqa: E731
    unspec = load("bilateral_unspecialised") if _finished(cfg, "bilateral_unspecialised", seed) else None
    ctx = _Context(
        cfg=cfg, seed=seed, condition=condition, p={**DEFAULTS, **caps}, device=device,
        folder=out_dir(cfg, condition, seed), show=show, train_split=train_split,
        test_split=test_split, hier=hier, left=load("hemisphere", dataclasses.replace(cfg, side="left")),
        right=load("hemisphere", dataclasses.replace(cfg, side="right")), bil=load("bilateral"),
        unspec=unspec)
    ctx.test_dl = _loader(test_split, device, ctx.p["batch_size"])
    ctx.out = _collect(_bilateral_outputs(ctx.bil, ctx.left.heads["fine"], ctx.right.heads["coarse"]),
                       ctx.test_dl, device, cfg.amp)
    if unspec is not None:
        ctx.u_out = _collect(_bilateral_outputs(unspec), ctx.test_dl, device, cfg.amp)
    metrics: dict[str, float] = {}
    for section in (_outcomes_section, _gradcam_section, _similarity_section,
                    _attribution_section, _probe_section):
        metrics.update(section(ctx))
    metrics["wall_s"] = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    runs.write_json(ctx.folder / "meta.json", {  # what results.csv files these metrics under
        "model": "analysis", "condition": condition, "seed": seed, "backbone": cfg.backbone,
        "split": "test", "caps": ctx.p, "bilateral_unspecialised": unspec is not None,
        "scenario_names": "L/R: left/right hemisphere right (1) or wrong (0); "
                          "F/C: bilateral fine/coarse head right (1) or wrong (0)"})
    runs.write_json(ctx.folder / "metrics.json", metrics)
    log(_summary_line(condition, seed, metrics))
    if show:
        _display(ctx.scenario_table)
        _display(ctx.probe_table)
    return metrics


@dataclasses.dataclass
class _Context:
    """What the sections of one condition's analysis share."""
    cfg: object
    seed: int
    condition: str
    p: dict
    device: torch.device
    folder: Path
    show: bool
    train_split: object
    test_split: object
    hier: object
    left: object                 # hemisphere models (backbone + their own head)
    right: object
    bil: object                  # bilateral (frozen hemispheres + heads)
    unspec: object = None        # bilateral_unspecialised of this condition, if its run exists
    test_dl: object = None
    out: dict = None             # test features and logits of the bilateral model
    u_out: dict = None           # ... and of bilateral_unspecialised
    scen: torch.Tensor = None    # test image -> index into SCENARIOS
    scenario_table: object = None
    probe_table: object = None

    def gen(self, k):
        return torch.Generator().manual_seed(self.seed * 1_000_003 + k)

    @property
    def title(self):
        return f"condition {self.condition}, seed {self.seed}"

    def write_csv(self, name, df):
        runs.atomic_write_bytes(self.folder / name, df.to_csv(index=False).encode())


def _outcomes_section(ctx) -> dict:
    out, test = ctx.out, ctx.test_split
    correct = {"left": out["left_logits"].argmax(1) == test.fine,
               "right": out["right_logits"].argmax(1) == test.coarse,
               "bilateral_fine": out["fine"].argmax(1) == test.fine,
               "bilateral_coarse": out["coarse"].argmax(1) == test.coarse}
    ctx.scen = scenario_index(correct)
    ctx.scenario_table = scenario_table(ctx.scen)
    runs.atomic_write_bytes(ctx.folder / "scenarios.csv", ctx.scenario_table.to_csv().encode())
    m = {f"scenario.{name}.n_images": float((ctx.scen == s).sum()) for s, name in enumerate(SCENARIOS)}
    m.update({f"test_acc.{k}": v.float().mean().item() for k, v in correct.items()})
    return m


def _gradcam_section(ctx) -> dict:
    import pandas as pd
    p, test, scen = ctx.p, ctx.test_split, ctx.scen
    n_test = len(test)
    sample = torch.randperm(n_test, generator=ctx.gen(1))[:min(p["cam_images"], n_test)]
    order = torch.randperm(n_test, generator=ctx.gen(2))
    picks = {}
    for s, name in enumerate(SCENARIOS):
        members = order[scen[order] == s][:p["cam_per_scenario"]]
        if len(members):
            picks[name] = members
    union = torch.unique(torch.cat([sample, *picks.values()]))
    pos = {int(i): k for k, i in enumerate(union)}
    x = _normalised(test, union, ctx.device)
    maps = cam_maps(ctx.left, ctx.right, ctx.bil, x, ctx.out, union, p["batch_size"])
    rows = {"image": union.numpy(), "scenario": [SCENARIOS[int(scen[i])] for i in union],
            "fine": test.fine[union].numpy(), "coarse": test.coarse[union].numpy(),
            "in_sample": np.isin(union.numpy(), sample.numpy())}
    for k in CAM_KINDS:
        rows[f"area.{k}"] = cam.localisation(maps[k], p["cam_frac"])
    df = pd.DataFrame(rows)
    ctx.write_csv("cam_localisation.csv", df)
    samp = df[df["in_sample"]]
    m = {"cam.n_images": float(len(samp))}
    for k in CAM_KINDS:
        a = samp[f"area.{k}"].to_numpy()
        m.update(spread(a, f"cam.area.{k}"))
        m[f"cam.degenerate.{k}"] = float(np.isnan(a).sum())
    d = (samp["area.left_hemisphere"] - samp["area.right_hemisphere"]).to_numpy()
    m.update(spread(d, "cam.area.left_minus_right"))
    if np.isfinite(d).any():
        m["cam.area.left_smaller_frac"] = float((d[np.isfinite(d)] < 0).mean())

    fig = _figure(figsize=(7, 3))
    ax = fig.subplots()
    kinds = CAM_KINDS[:5]
    vals = [samp[f"area.{k}"].dropna().to_numpy() for k in kinds]
    if all(len(v) for v in vals):
        ax.boxplot(vals, showfliers=False)
    ax.set_xticks(range(1, len(kinds) + 1))
    ax.set_xticklabels([k.replace("_", "\n") for k in kinds], fontsize=7)
    ax.set_ylabel(f"fraction of image >= {p['cam_frac']:g} x peak", fontsize=8)
    ax.set_title(f"Grad-CAM localisation, {ctx.title} ({len(samp)} test images; lower = more local)",
                 fontsize=9)
    _save(fig, ctx.folder / "cam_localisation.png", ctx.show)

    names = ctx.hier
    label = lambda i: f"{names.fine_names[int(test.fine[i])]} / {names.coarse_names[int(test.coarse[i])]}"  # noqa: E731
    for name, members in picks.items():
        k = [pos[int(i)] for i in members]
        fig = _grid_figure(test.images[members], {c: maps[c][k] for c in GRID_COLUMNS}, GRID_COLUMNS,
                           [label(i) for i in members],
                           f"{ctx.title}, scenario {name} ({int((scen == SCENARIOS.index(name)).sum())} "
                           f"test images)")
        _save(fig, ctx.folder / "gradcam" / f"{name}.png", False, tight=False)
    if picks:
        first = [(name, int(members[0])) for name, members in picks.items()]
        ids = torch.tensor([i for _, i in first])
        k = [pos[i] for _, i in first]
        fig = _grid_figure(test.images[ids], {c: maps[c][k] for c in GRID_COLUMNS}, GRID_COLUMNS,
                           [f"{n}: {label(i)}" for n, i in first],
                           f"Grad-CAM, {ctx.title}: one image per scenario")
        _save(fig, ctx.folder / "gradcam_overview.png", ctx.show, tight=False)
    return m


def _similarity_section(ctx) -> dict:
    import pandas as pd
    out, fine, scen = ctx.out, ctx.test_split.fine, ctx.scen
    feats = {"left": out["left_feat"], "right": out["right_feat"],
             "bilateral": torch.cat([out["left_feat"], out["right_feat"]], 1)}
    m, panels, rows = {}, [], []
    groups = [("all", None)] + [(n, (scen == s).nonzero().flatten()) for s, n in enumerate(SCENARIOS)]
    for k, (name, members) in enumerate(groups):
        i, j, total = same_label_pairs(fine, members, ctx.p["max_pairs"], ctx.gen(100 + k))
        if total == 0:
            continue
        sims = {h: pair_cosine(f, i, j).numpy() for h, f in feats.items()}
        row = {"scenario": name, "n_pairs": total, "n_used": len(i),
               **{f"median_{h}": float(np.median(v)) for h, v in sims.items()}}
        rows.append(row)
        m.update({f"similarity.{name}.{c}": float(row[c]) for c in row if c != "scenario"})
        n = min(len(i), ctx.p["plot_pairs"])
        panels.append((name, sims["left"][:n], sims["right"][:n], sims["bilateral"][:n]))
    ctx.write_csv("similarity_medians.csv", pd.DataFrame(rows))
    if panels:
        fig = _similarity_figure(panels, f"Cosine similarity of same-fine-label test pairs, {ctx.title}")
        _save(fig, ctx.folder / "similarity_joint.png", ctx.show, dpi=90, tight=False)
    return m


def _attribution_section(ctx) -> dict:
    import pandas as pd
    coarse = ctx.test_split.coarse
    m, rows = {}, []
    studied = [("bilateral", ctx.bil, ctx.out)]
    if ctx.unspec is not None:
        studied.append(("bilateral_unspecialised", ctx.unspec, ctx.u_out))
    for mname, model, o in studied:
        feats = torch.cat([o["left_feat"], o["right_feat"]], 1)
        for head in ("fine", "coarse"):
            w = model.heads[head][-1].weight.detach().cpu()
            share = head_attribution(w, feats, model.left.out_features, o[head].argmax(1))
            key = f"attribution.{mname}.{head}"
            m.update(spread(share.numpy(), f"{key}.left_share"))
            m[f"{key}.right_share.mean"] = 1 - m[f"{key}.left_share.mean"]
            rows.append({"model": mname, "head": head, "coarse_class": "all",
                         "left_share_mean": m[f"{key}.left_share.mean"],
                         "left_share_std": m[f"{key}.left_share.std"], "n": m[f"{key}.left_share.n"]})
            for c, cname in enumerate(ctx.hier.coarse_names):
                s = share[coarse == c]
                s = s[torch.isfinite(s)]
                if len(s):
                    m[f"{key}.left_share.coarse={cname}"] = s.mean().item()
                    rows.append({"model": mname, "head": head, "coarse_class": cname,
                                 "left_share_mean": s.mean().item(),
                                 "left_share_std": s.std().item() if len(s) > 1 else 0.0, "n": len(s)})
    df = pd.DataFrame(rows)
    df["right_share_mean"] = 1 - df["left_share_mean"]
    ctx.write_csv("attribution.csv", df)
    _save(_attribution_figure(df, ctx.hier.coarse_names, ctx.title), ctx.folder / "attribution.png",
          ctx.show)
    return m


def _probe_section(ctx) -> dict:
    import pandas as pd
    p, tr_split, test = ctx.p, ctx.train_split, ctx.test_split
    n_tr = min(p["probe_train"], len(tr_split))
    idx = torch.randperm(len(tr_split), generator=ctx.gen(3))[:n_tr].sort().values
    tr_dl = _loader(_subset(tr_split, idx), ctx.device, p["batch_size"])
    n_classes = {"fine": ctx.hier.n_fine, "coarse": ctx.hier.n_coarse}
    y_tr = {"fine": tr_split.fine[idx], "coarse": tr_split.coarse[idx]}
    y_te = {"fine": test.fine, "coarse": test.coarse}
    studied = [("probe", ctx.bil, ctx.out)]
    if ctx.unspec is not None:
        studied.append(("probe_unspecialised", ctx.unspec, ctx.u_out))
    m, rows = {"probe.n_train": float(n_tr), "probe.n_test": float(len(test))}, []
    for prefix, model, o in studied:
        tr = _collect(_bilateral_outputs(model), tr_dl, ctx.device, ctx.cfg.amp)
        acc = {}
        for side in ("left", "right"):
            for level in ("fine", "coarse"):
                probe = fit_probe(tr[f"{side}_feat"].to(ctx.device), y_tr[level], n_classes[level],
                                  p["probe_l2"], p["probe_iters"])
                acc[(side, level)] = probe.accuracy(o[f"{side}_feat"].to(ctx.device), y_te[level])
                m[f"{prefix}.{side}.{level}"] = acc[(side, level)]
                rows.append({"model": prefix, "features": side, "level": level,
                             "test_acc": acc[(side, level)]})
        m.update({f"{prefix}.{k}": v for k, v in differential_specialisation(acc).items()})
    df = pd.DataFrame(rows)
    ctx.write_csv("probes.csv", df)
    ctx.probe_table = probe_table(df)
    return m


def probe_table(probe_df):
    """The 2x2 (features x level) table of probe test accuracies per model."""
    return probe_df.pivot_table(index=["model", "features"], columns="level", values="test_acc")[
        ["fine", "coarse"]]


def cam_maps(left_m, right_m, bil, x, out, idx, batch_size=64) -> dict:
    """Every CAM_KINDS heatmap of the images x (test indices idx, `out` the test outputs)."""
    pred = {k: out[k][idx].argmax(1) for k in ("left_logits", "right_logits", "fine", "coarse")}
    maps = {
        "left_hemisphere": cam.gradcam(left_m, cam.target_layers(left_m.backbone), x, ["fine"],
                                       pred["left_logits"][:, None], batch_size),
        "right_hemisphere": cam.gradcam(right_m, cam.target_layers(right_m.backbone), x, ["coarse"],
                                        pred["right_logits"][:, None], batch_size),
    }
    targets = {"fine": (["fine"], pred["fine"][:, None]), "coarse": (["coarse"], pred["coarse"][:, None]),
               "both": (["fine", "coarse"], torch.stack([pred["fine"], pred["coarse"]], 1))}
    for t, (heads, cls) in targets.items():
        for side in ("left", "right"):
            maps[f"bilateral_{t}.{side}"] = cam.gradcam(
                bil, cam.target_layers(getattr(bil, side)), x, heads, cls, batch_size)
        maps[f"bilateral_{t}"] = cam.combine(maps[f"bilateral_{t}.left"], maps[f"bilateral_{t}.right"])
    return maps


def _attribution_figure(df, coarse_names, title):
    fig = _figure(figsize=(11, 3.4))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1, 3]))
    overall = df[df["coarse_class"] == "all"]
    labels = [f"{m.replace('bilateral_unspecialised', 'unspec.')}\n{h}" for m, h in
              zip(overall["model"], overall["head"])]
    xs = np.arange(len(overall))
    ax0.bar(xs, overall["left_share_mean"], yerr=overall["left_share_std"], color="C0",
            label="left", capsize=2)
    ax0.bar(xs, overall["right_share_mean"], bottom=overall["left_share_mean"], color="C1",
            label="right", alpha=0.6)
    ax0.axhline(0.5, color="0.3", lw=0.6, ls="--")
    ax0.set_xticks(xs)
    ax0.set_xticklabels(labels, fontsize=7)
    ax0.set_ylim(0, 1)
    ax0.set_ylabel("share of the predicted logit", fontsize=8)
    ax0.legend(fontsize=7, loc="lower right")
    per = df[df["coarse_class"] != "all"]
    cx = np.arange(len(coarse_names))
    for k, ((m, h), g) in enumerate(per.groupby(["model", "head"], sort=False)):
        y = g.set_index("coarse_class").reindex(list(coarse_names))["left_share_mean"]
        ax1.plot(cx, y.to_numpy(), marker="o", ms=3, lw=1,
                 ls="-" if m == "bilateral" else ":", label=f"{m} {h}")
    ax1.axhline(0.5, color="0.3", lw=0.6, ls="--")
    ax1.set_xticks(cx)
    ax1.set_xticklabels(coarse_names, rotation=60, ha="right", fontsize=6)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("left share, per true coarse class", fontsize=8)
    ax1.legend(fontsize=7)
    fig.suptitle(f"Head attribution to the left / right hemisphere features, {title}", fontsize=9)
    return fig


def _summary_line(condition, seed, m) -> str:
    g = lambda k, f="{:.3f}": f.format(m[k]) if k in m else "n/a"  # noqa: E731
    parts = [f"[analysis {condition} seed={seed}]",
             f"CAM area left {g('cam.area.left_hemisphere.mean')}±{g('cam.area.left_hemisphere.std')}"
             f" right {g('cam.area.right_hemisphere.mean')}±{g('cam.area.right_hemisphere.std')};",
             f"left share fine-head {g('attribution.bilateral.fine.left_share.mean')}"
             f" coarse-head {g('attribution.bilateral.coarse.left_share.mean')};",
             f"probes L/fine {g('probe.left.fine')} R/fine {g('probe.right.fine')}"
             f" L/coarse {g('probe.left.coarse')} R/coarse {g('probe.right.coarse')}"
             f" D {g('probe.differential_specialisation', '{:+.3f}')};",
             f"{g('wall_s', '{:.1f}')}s"]
    if "probe_unspecialised.differential_specialisation" in m:
        parts.insert(-1, f"unspecialised: left share fine {g('attribution.bilateral_unspecialised.fine.left_share.mean')}"
                         f" coarse {g('attribution.bilateral_unspecialised.coarse.left_share.mean')},"
                         f" D {g('probe_unspecialised.differential_specialisation', '{:+.3f}')};")
    return " ".join(parts)


# ------------------------------------------------------------------------------ entry point

def run_analyses(cfg, seed: int, show: bool = True, log=print, **caps) -> dict[str, float]:
    """Analyse every condition of cfg.conditions whose bilateral run of `seed` exists.

    caps override DEFAULTS (cam_images, cam_per_scenario, max_pairs, probe_train, ...).
    Returns {"<condition>/<metric>": value}.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = {}
    for cond in cfg.conditions:
        if not available(cfg, seed, cond):
            log(f"[analysis {cond} seed={seed}] skipped: no finished bilateral run (and hemispheres)")
            continue
        m = analyse_condition(cfg, seed, cond, show=show, log=log, **caps)
        result.update({f"{cond}/{k}": v for k, v in m.items()})
    return result


def collect(cfg):
    """Every analysis metrics.json of the experiment: a long DataFrame (condition, seed, metric, value)."""
    import pandas as pd
    rows = []
    base = Path(cfg.out_dir) / cfg.experiment / "analysis"
    for f in sorted(base.glob("*/seed=*/metrics.json")):
        seed = int(f.parent.name.split("=", 1)[1])
        for k, v in runs.read_json(f).items():
            rows.append({"condition": f.parent.parent.name, "seed": seed, "metric": k, "value": v})
    return pd.DataFrame(rows, columns=["condition", "seed", "metric", "value"])


KEY_METRICS = ("cam.area.left_hemisphere.mean", "cam.area.right_hemisphere.mean",
               "cam.area.left_minus_right.mean",
               "attribution.bilateral.fine.left_share.mean", "attribution.bilateral.coarse.left_share.mean",
               "probe.left.fine", "probe.right.fine", "probe.left.coarse", "probe.right.coarse",
               "probe.differential_specialisation")


def compare(cfg, metrics=KEY_METRICS):
    """Mean, std and number of seeds of the key metrics per condition (spread over seeds)."""
    df = collect(cfg)
    df = df[df["metric"].isin(metrics)]
    return df.groupby(["metric", "condition"])["value"].agg(["mean", "std", "count"]).unstack("condition")
