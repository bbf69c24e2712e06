"""The callosal models in the study: traffic across the callosum, analyses, results rows.

- `traffic`: per link (depth) and direction, for every test image, the norm of what crosses
  divided by the norm of the map that receives it (0: nothing crosses; 1: the change is as
  large as the map itself); summarised overall and per coarse class; for `gate`, every gate
  value (a histogram figure).
- `analyse(cfg, seed, kind)` writes outputs/<experiment>/analysis/callosal/<run name>/seed=<k>/
  (traffic.csv, traffic.png, gates.png, attribution.csv, metrics.json, meta.json), where
  results.csv picks the metrics up; the head attribution and Grad-CAM localisation are the
  bilateral model's (analysis.head_attribution, cam.gradcam), applied to the callosal one.
(Its results.md section, each callosal model against the bilateral model of its condition, is
callosum.markdown_section, registered with the stages.)
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import cam, callosum, data, figures, plan, runs, train
from .analysis import condition, measures, plots
from .seeds import derive_seed


# ------------------------------------------------------------------------------- traffic

@torch.no_grad()
def traffic(model: callosum.Callosal, loader, device, amp=False) -> dict:
    """{(depth, direction): {"ratio": (N,), "gate": (N, C) for gate}} over a loader, and the
    labels; ratio = |what crosses| / |receiving map| per image (Frobenius norms)."""
    ctx, _ = train.autocast(device, amp)
    model.eval()
    got, coarse = {}, []
    for batch in loader:
        rec = {}
        with ctx:
            model.sides(batch["x"], rec)
        for depth, dirs in rec.items():
            for d, r in dirs.items():
                g = got.setdefault((depth, d), {"ratio": [], "gate": []})
                g["ratio"].append((r["cross"] / r["recv"].clamp_min(1e-12)).cpu())
                if "gate" in r:
                    g["gate"].append(r["gate"].cpu())
        coarse.append(batch["coarse"].cpu())
    out = {k: {n: torch.cat(v) for n, v in g.items() if v} for k, g in got.items()}
    return {"links": out, "coarse": torch.cat(coarse)}


def traffic_table(tr: dict, coarse_names) -> pd.DataFrame:
    """One row per (depth, direction, coarse class or 'all'): mean, sd and n of the ratio."""
    rows, coarse = [], tr["coarse"]
    for (depth, d), g in tr["links"].items():
        groups = [("all", torch.ones_like(coarse, dtype=torch.bool))]
        groups += [(name, coarse == c) for c, name in enumerate(coarse_names)]
        for cname, sel in groups:
            r = g["ratio"][sel]
            if not len(r):
                continue
            row = dict(depth=depth, direction=d, coarse_class=cname, ratio_mean=r.mean().item(),
                       ratio_sd=r.std().item() if len(r) > 1 else float("nan"), n=len(r))
            if "gate" in g:
                row["gate_mean"] = g["gate"][sel].mean().item()
            rows.append(row)
    return pd.DataFrame(rows)


DIRECTION_LABEL = {"to_left": "right → left", "to_right": "left → right"}


def traffic_figure(table: pd.DataFrame, title: str):
    """Bars per link and direction: the overall ratio, and one dot per coarse class."""
    fig = plots.figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    overall = table[table.coarse_class == "all"].reset_index(drop=True)
    labels = [f"{r.depth}\n{DIRECTION_LABEL[r.direction]}" for r in overall.itertuples()]
    xs = np.arange(len(overall))
    ax.bar(xs, overall.ratio_mean, yerr=overall.ratio_sd, color="C2", capsize=3, alpha=0.8,
           label="all test images (mean ± sd)")
    for i, r in enumerate(overall.itertuples()):
        per = table[(table.depth == r.depth) & (table.direction == r.direction)
                    & (table.coarse_class != "all")]
        ax.plot(np.full(len(per), i) + np.linspace(-0.25, 0.25, len(per)), per.ratio_mean, "k.",
                ms=4, label="per coarse class" if i == 0 else None)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("|crossing| / |receiving map|")
    ax.set_title(f"Callosal traffic, {title}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def gate_figure(tr: dict, title: str):
    """Histogram of the gate values of every channel and image, per link and direction."""
    gated = [(k, g["gate"]) for k, g in tr["links"].items() if "gate" in g]
    fig = plots.figure(figsize=(3.2 * max(1, len(gated)), 2.8))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(gated)), squeeze=False)[0])
    for ax, ((depth, d), g) in zip(axes, gated):
        ax.hist(g.flatten().numpy(), bins=40, range=(0, 1), color="C4")
        ax.set_title(f"{depth}, {DIRECTION_LABEL[d]}", fontsize=8)
        ax.set_xlabel("gate value")
    axes[0].set_ylabel("channels x images")
    fig.suptitle(f"Gate values, {title}", fontsize=9)
    return fig


def traffic_metrics(table: pd.DataFrame, tr: dict, prefix: str) -> dict:
    m = {}
    for r in table.itertuples():
        key = f"{prefix}.{r.depth}.{r.direction}"
        if r.coarse_class == "all":
            m[f"{key}.ratio.mean"], m[f"{key}.ratio.std"] = r.ratio_mean, r.ratio_sd
        else:
            m[f"{key}.ratio.coarse={r.coarse_class}"] = r.ratio_mean
    for (depth, d), g in tr["links"].items():
        if "gate" in g:
            v = g["gate"].flatten()
            m.update({f"{prefix}.{depth}.{d}.gate.mean": v.mean().item(),
                      f"{prefix}.{depth}.{d}.gate.std": v.std().item(),
                      f"{prefix}.{depth}.{d}.gate.open_frac": (v > 0.5).float().mean().item()})
    return m


# ------------------------------------------------------------------------------ analysis

def out_dir(cfg, seed) -> Path:
    c = plan.stage_config(cfg, "callosal")
    return (runs.experiment_dir(cfg) / "analysis" / "callosal"
            / plan.spec("callosal").run_name(c) / f"seed={seed}")


def analyse(cfg, seed: int, kind: str | None = None, show=False, cam_images=64, log=print) -> dict:
    """Traffic, head attribution and Grad-CAM localisation of one finished callosal run."""
    cfg = dataclasses.replace(cfg, callosum=kind or cfg.callosum)
    device = train.pick_device(cfg.device)
    _, _, test = data.load_splits(cfg)
    hier = test.hierarchy
    model = plan.load_run_model("callosal", cfg, seed, hier, device)
    folder, prefix = out_dir(cfg, seed), f"callosum.{cfg.callosum}"
    title = f"{cfg.callosum}, condition {cfg.condition}, seed {seed}"
    dl = condition.loader(test, device, 512)
    tr = traffic(model, dl, device, cfg.amp)
    table = traffic_table(tr, hier.coarse_names)
    runs.atomic_write_bytes(folder / "traffic.csv", table.to_csv(index=False).encode())
    figures.save(traffic_figure(table, title), folder, "traffic", show=show, log=None)
    if cfg.callosum == "gate":
        figures.save(gate_figure(tr, title), folder, "gates", show=show, log=None)
    m = traffic_metrics(table, tr, prefix)
    m.update(attribution(model, dl, train_sample(cfg, seed, device), device, cfg.amp, folder, prefix))
    m.update(localisation(model, test, device, cam_images, seed, prefix))
    m = {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
    runs.write_json(folder / "meta.json", {"model": f"callosal/{out_dir(cfg, seed).parent.name}",
                                           "condition": cfg.condition, "seed": seed,
                                           "backbone": cfg.backbone, "split": "test"})
    runs.write_json(folder / "metrics.json", m)
    log(f"[callosal analysis {title}] " + ", ".join(
        f"{k.split('.', 2)[2]} {v:.3f}" for k, v in m.items() if k.endswith("ratio.mean")))
    return m


def train_sample(cfg, seed, device, n=1000):
    """A seeded sample of the train split: the features' mean over it centres the attribution."""
    train_split = data.load_splits(cfg)[0]
    g = torch.Generator().manual_seed(derive_seed(seed, "analysis", "callosal_centre"))
    idx = torch.randperm(len(train_split), generator=g)[:n].sort().values
    return condition.loader(condition.subset(train_split, idx), device, 512)


def attribution(model, loader, train_loader, device, amp, folder, prefix) -> dict:
    """Share of each head's predicted logit drawn from the left half of the features, centred
    as analysis.attribution centres the bilateral model's (weights over classes, features by
    their mean over a train sample)."""
    fwd = lambda x: model(x, return_features=True)  # noqa: E731
    out, _ = train.predict(fwd, loader, device, amp)
    centre = train.predict(fwd, train_loader, device, amp)[0]["features"].float().mean(0)
    m, rows = {}, []
    for head in ("fine", "coarse"):
        w = model.heads[head][-1].weight.detach().cpu()
        share = measures.head_attribution(w, out["features"], model.left.out_features,
                                          out[head].argmax(1), centre)
        s = share[torch.isfinite(share)]
        m[f"{prefix}.attribution.{head}.left_share.mean"] = s.mean().item()
        rows.append({"head": head, "left_share_mean": s.mean().item(),
                     "left_share_std": s.std().item(), "n": len(s)})
    runs.atomic_write_bytes(folder / "attribution.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    return m


def localisation(model, test, device, n, seed, prefix) -> dict:
    """Grad-CAM of the callosal model (both heads' top logits) on each hemisphere's residual
    blocks, as for the bilateral model: mean area at or above half the peak."""
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    x = condition.normalised(test, idx.sort().values, device)
    with torch.no_grad():
        out = model.eval()(x)
    cls = torch.stack([out["fine"].argmax(1), out["coarse"].argmax(1)], 1)
    m = {}
    for side in ("left", "right"):
        maps = cam.gradcam(model, cam.target_layers(getattr(model, side)), x, ["fine", "coarse"],
                           cls, batch_size=64)
        m[f"{prefix}.cam.area.{side}.mean"] = float(np.nanmean(cam.localisation(maps)))
    return m
