"""The sections of one condition's analysis: each takes a condition.Condition, writes its
tables and figures to the condition's folder, adds its numbers to `c.metrics` and returns them.
They can run in any order and each can be rerun alone; `write_metrics` writes metrics.json.
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np
import pandas as pd
import torch

from .. import cam, runs
from .. import figures
from . import measures as M
from . import plots
from .condition import normalised

GRID_COLUMNS = ("left_hemisphere", "right_hemisphere", "bilateral_fine", "bilateral_coarse",
                "bilateral_both", "bilateral_both.left", "bilateral_both.right")


def save(fig, folder, name, **kw):
    figures.save(fig, folder, name, log=None, **kw)


def _record(c, m: dict) -> dict:
    c.metrics.update(m)
    return m


def _timed(section):
    """Adds the section's wall time to c.seconds (metrics.json's wall_s: this condition's own
    time, however the sections of several conditions interleave in a notebook)."""
    @functools.wraps(section)
    def run(c, *args, **kw):
        t0 = time.perf_counter()
        try:
            return section(c, *args, **kw)
        finally:
            c.seconds += time.perf_counter() - t0
    return run


@_timed
def outcomes(c) -> dict:
    """The outcome scenarios on the test set: scenarios.csv and the count per scenario."""
    c.write_csv("scenarios.csv", M.scenario_table(c.scen), index=True)
    m = {f"scenario.{name}.n_images": float((c.scen == s).sum()) for s, name in enumerate(M.SCENARIOS)}
    m.update({f"test_acc.{k}": v.float().mean().item() for k, v in c.right_wrong.items()})
    return _record(c, m)


@_timed
def gradcam(c, show: bool = True) -> dict:
    """Grad-CAM localisation on a random sample of test images, and grids of a few images per
    scenario. cam_localisation.csv/.png, gradcam/<scenario>.png, gradcam_overview.png."""
    p, test, scen = c.p, c.test_split, c.scen
    n_test = len(test)
    sample = torch.randperm(n_test, generator=c.gen("cam sample"))[:min(p["cam_images"], n_test)]
    order = torch.randperm(n_test, generator=c.gen("cam picks"))
    picks = {}
    for s, name in enumerate(M.SCENARIOS):
        members = order[scen[order] == s][:p["cam_per_scenario"]]
        if len(members):
            picks[name] = members
    union = torch.unique(torch.cat([sample, *picks.values()]))
    pos = {int(i): k for k, i in enumerate(union)}
    x = normalised(test, union, c.device)
    pred = {k: c.out[v][union].argmax(1) for k, v in
            (("left", "left_logits"), ("right", "right_logits"), ("fine", "fine"), ("coarse", "coarse"))}
    maps = cam.cam_maps(c.bil, c.left.heads["fine"], c.right.heads["coarse"], x, pred, p["batch_size"])
    rows = {"image": union.numpy(), "scenario": [M.SCENARIOS[int(scen[i])] for i in union],
            "fine": test.fine[union].numpy(), "coarse": test.coarse[union].numpy(),
            "in_sample": np.isin(union.numpy(), sample.numpy())}
    for k in cam.CAM_KINDS:
        rows[f"area.{k}"] = cam.localisation(maps[k], p["cam_frac"])
    df = pd.DataFrame(rows)
    c.write_csv("cam_localisation.csv", df)
    samp = df[df["in_sample"]]
    m = {"cam.n_images": float(len(samp))}
    for k in cam.CAM_KINDS:
        a = samp[f"area.{k}"].to_numpy()
        m.update(M.spread(a, f"cam.area.{k}"))
        m[f"cam.degenerate.{k}"] = float(np.isnan(a).sum())
    d = (samp["area.left_hemisphere"] - samp["area.right_hemisphere"]).to_numpy()
    m.update(M.spread(d, "cam.area.left_minus_right"))
    if np.isfinite(d).any():
        m["cam.area.left_smaller_frac"] = float((d[np.isfinite(d)] < 0).mean())
    save(plots.localisation_figure(samp, cam.CAM_KINDS[:5], p["cam_frac"], c.title), c.folder,
         "cam_localisation", show=show)

    names = c.hier
    label = lambda i: f"{names.fine_names[int(test.fine[i])]} / {names.coarse_names[int(test.coarse[i])]}"  # noqa: E731
    for name, members in picks.items():
        k = [pos[int(i)] for i in members]
        fig = plots.grid_figure(test.images[members], {g: maps[g][k] for g in GRID_COLUMNS}, GRID_COLUMNS,
                                [label(i) for i in members],
                                f"{c.title}, scenario {name} "
                                f"({int((scen == M.SCENARIOS.index(name)).sum())} test images)")
        save(fig, c.folder / "gradcam", name, show=False, tight=False, dpi=110)
    if picks:
        first = [(name, int(members[0])) for name, members in picks.items()]
        ids = torch.tensor([i for _, i in first])
        k = [pos[i] for _, i in first]
        fig = plots.grid_figure(test.images[ids], {g: maps[g][k] for g in GRID_COLUMNS}, GRID_COLUMNS,
                                [f"{n}: {label(i)}" for n, i in first],
                                f"Grad-CAM, {c.title}: one image per scenario")
        save(fig, c.folder, "gradcam_overview", show=show, tight=False, dpi=110)
    return _record(c, m)


@_timed
def similarity(c, show: bool = True) -> dict:
    """Cosine similarity of same-fine-label test pairs in the same scenario, for left, right and
    concatenated features: similarity_medians.csv, similarity_joint.png (all pairs),
    similarity_scenarios.png (the pairs within each scenario)."""
    out, fine, scen = c.out, c.test_split.fine, c.scen
    feats = {"left": out["left_feat"], "right": out["right_feat"],
             "bilateral": torch.cat([out["left_feat"], out["right_feat"]], 1)}
    m, rows, points = {}, [], []
    groups = [("all", None)] + [(n, (scen == s).nonzero().flatten()) for s, n in enumerate(M.SCENARIOS)]
    for name, members in groups:
        i, j, total = M.same_label_pairs(fine, members, c.p["max_pairs"], c.gen("pairs", name))
        if total == 0:
            continue
        sims = {h: M.pair_cosine(f, i, j).numpy() for h, f in feats.items()}
        row = {"scenario": name, "n_pairs": total, "n_used": len(i),
               **{f"median_{h}": float(np.median(v)) for h, v in sims.items()}}
        rows.append(row)
        m.update({f"similarity.{name}.{col}": float(row[col]) for col in row if col != "scenario"})
        keep = M.shuffled(len(i), c.p["plot_pairs"], c.gen("plotted pairs", name)).numpy()
        points.append(pd.DataFrame({"group": name, **{h: v[keep] for h, v in sims.items()}}))
    c.write_csv("similarity_medians.csv", pd.DataFrame(rows))
    if points:  # every pair, and the pairs within each scenario by hemisphere outcome
        pts = pd.concat(points, ignore_index=True)
        name = f"same-fine-label test pairs, {c.title}"
        save(plots.similarity_joint(pts[pts.group == "all"], f"Cosine similarity of {name}"),
             c.folder, "similarity_joint", show=show, dpi=90)
        if (pts.group != "all").any():
            save(plots.similarity_joint(pts[pts.group != "all"], f"Within a scenario: {name}",
                                        by="hemispheres"),
                 c.folder, "similarity_scenarios", show=show, dpi=90)
    return _record(c, m)


@_timed
def attribution(c, show: bool = True) -> dict:
    """Share of each head's predicted logit drawn from the left and right halves of the
    features, centred by the train sample's mean feature (and, as before, uncentred), with the
    signed contributions: attribution.csv/.png."""
    coarse = c.test_split.coarse
    m, rows = {}, []
    studied = [("bilateral", c.bil, c.out, c.train_out)]
    if c.unspec is not None:
        studied.append(("bilateral_unspecialised", c.unspec, c.u_out, c.u_train_out))
    for mname, model, o, tr in studied:
        feats = torch.cat([o["left_feat"], o["right_feat"]], 1)
        mean = torch.cat([tr["left_feat"], tr["right_feat"]], 1).mean(0)
        n_left = model.left.out_features
        for head in ("fine", "coarse"):
            w = model.heads[head][-1].weight.detach().cpu()
            for centring, centre in (("centred", mean), ("uncentred", None)):
                lc, rc = M.head_contributions(w, feats, n_left, o[head].argmax(1), centre)
                share = M.left_share(lc, rc)
                key = f"attribution.{mname}.{head}" + ("" if centre is not None else ".uncentred")
                m.update(M.spread(share.numpy(), f"{key}.left_share"))
                m[f"{key}.right_share.mean"] = 1 - m[f"{key}.left_share.mean"]
                m.update(M.spread(lc.numpy(), f"{key}.left_contrib"))
                m.update(M.spread(rc.numpy(), f"{key}.right_contrib"))
                base = {"model": mname, "head": head, "centring": centring}
                rows.append({**base, "coarse_class": "all", "left_share_mean": m[f"{key}.left_share.mean"],
                             "left_share_std": m[f"{key}.left_share.std"], "n": m[f"{key}.left_share.n"],
                             "left_contrib_mean": lc.mean().item(), "left_contrib_std": lc.std().item(),
                             "right_contrib_mean": rc.mean().item(), "right_contrib_std": rc.std().item()})
                for k, cname in enumerate(c.hier.coarse_names):
                    s = share[coarse == k]
                    s = s[torch.isfinite(s)]
                    if len(s):
                        m[f"{key}.left_share.coarse={cname}"] = s.mean().item()
                        rows.append({**base, "coarse_class": cname, "left_share_mean": s.mean().item(),
                                     "left_share_std": s.std().item() if len(s) > 1 else 0.0, "n": len(s)})
    df = pd.DataFrame(rows)
    df["right_share_mean"] = 1 - df["left_share_mean"]
    c.write_csv("attribution.csv", df)
    save(plots.attribution_figure(df, c.hier.coarse_names, c.title), c.folder, "attribution", show=show)
    return _record(c, m)


@_timed
def probes(c) -> dict:
    """Logistic probes of each hemisphere's features for each label level, fitted on the train
    sample and scored on the test split, raw and at equal dimension (each side's features
    projected on its first k principal axes, k the smaller side's dimension): probes.csv."""
    p, test = c.p, c.test_split
    n_classes = {"fine": c.hier.n_fine, "coarse": c.hier.n_coarse}
    y_tr = {"fine": c.train_split.fine[c.train_idx], "coarse": c.train_split.coarse[c.train_idx]}
    y_te = {"fine": test.fine, "coarse": test.coarse}
    studied = [("probe", c.train_out, c.out)]
    if c.unspec is not None:
        studied.append(("probe_unspecialised", c.u_train_out, c.u_out))
    m, rows = {"probe.n_train": float(len(c.train_idx)), "probe.n_test": float(len(test))}, []
    for prefix, tr, te in studied:
        dims = {s: tr[f"{s}_feat"].shape[1] for s in ("left", "right")}
        k = min(dims.values())
        m.update({f"{prefix}.dim.{s}": float(d) for s, d in dims.items()})
        m[f"{prefix}_eqdim.dim"] = float(k)
        for variant in ("raw", "eqdim"):
            acc = {}
            for side in ("left", "right"):
                x_tr, x_te = tr[f"{side}_feat"].to(c.device), te[f"{side}_feat"].to(c.device)
                if variant == "eqdim":
                    pca = M.fit_pca(x_tr, k)
                    x_tr, x_te = pca(x_tr), pca(x_te)
                for level in ("fine", "coarse"):
                    probe = M.fit_probe(x_tr, y_tr[level], n_classes[level], p["probe_l2"], p["probe_iters"])
                    acc[(side, level)] = probe.accuracy(x_te, y_te[level])
                    rows.append({"model": prefix, "variant": variant, "dim": x_tr.shape[1],
                                 "features": side, "level": level, "test_acc": acc[(side, level)]})
            name = prefix if variant == "raw" else f"{prefix}_eqdim"
            m.update({f"{name}.{s}.{lv}": v for (s, lv), v in acc.items()})
            m.update({f"{name}.{key}": v for key, v in M.differential_specialisation(acc).items()})
    c.write_csv("probes.csv", pd.DataFrame(rows))
    return _record(c, m)


def probe_table(c):
    """The (model, variant, features) x level table of probe test accuracies."""
    df = pd.read_csv(c.folder / "probes.csv")
    return df.pivot_table(index=["model", "variant", "features"], columns="level",
                          values="test_acc")[["fine", "coarse"]]


def write_metrics(c, log=print) -> dict:
    """metrics.json (every number the sections recorded, flat {name: float}) and meta.json (what
    results.csv files them under)."""
    m = {**c.metrics, "wall_s": c.seconds}
    m = {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
    runs.write_json(c.folder / "meta.json", {
        "model": "analysis", "condition": c.condition, "seed": c.seed, "backbone": c.cfg.backbone,
        "split": "test", "caps": c.p, "bilateral_unspecialised": c.unspec is not None,
        "scenario_names": "L/R: left/right hemisphere right (1) or wrong (0); "
                          "F/C: bilateral fine/coarse head right (1) or wrong (0)"})
    runs.write_json(c.folder / "metrics.json", m)
    log(summary_line(c.condition, c.seed, m))
    return m


def summary_line(condition, seed, m) -> str:
    g = lambda k, f="{:.3f}": f.format(m[k]) if k in m else "n/a"  # noqa: E731
    parts = [f"[analysis {condition} seed={seed}]",
             f"CAM area left {g('cam.area.left_hemisphere.mean')}±{g('cam.area.left_hemisphere.std')}"
             f" right {g('cam.area.right_hemisphere.mean')}±{g('cam.area.right_hemisphere.std')};",
             f"left share (centred) fine-head {g('attribution.bilateral.fine.left_share.mean')}"
             f" coarse-head {g('attribution.bilateral.coarse.left_share.mean')};",
             f"probes L/fine {g('probe.left.fine')} R/fine {g('probe.right.fine')}"
             f" L/coarse {g('probe.left.coarse')} R/coarse {g('probe.right.coarse')}"
             f" D {g('probe.differential_specialisation', '{:+.3f}')}"
             f" (equal dim {g('probe_eqdim.differential_specialisation', '{:+.3f}')});",
             f"{g('wall_s', '{:.1f}')}s"]
    if "probe_unspecialised.differential_specialisation" in m:
        parts.insert(-1, f"unspecialised: left share fine {g('attribution.bilateral_unspecialised.fine.left_share.mean')}"
                         f" coarse {g('attribution.bilateral_unspecialised.coarse.left_share.mean')},"
                         f" D {g('probe_unspecialised.differential_specialisation', '{:+.3f}')};")
    return " ".join(parts)
