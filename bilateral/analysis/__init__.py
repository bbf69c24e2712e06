"""The study's analyses of each condition's bilateral model, per seed, and their spread over seeds.

    c = analysis.load(cfg, seed, "A")      # models read once, predictions and features made once
    analysis.outcomes(c); analysis.gradcam(c); analysis.similarity(c)
    analysis.attribution(c); analysis.probes(c)
    analysis.write_metrics(c)              # outputs/<experiment>/analysis/A/seed=<k>/metrics.json

or all of it for every condition: `analysis.run_analyses(cfg, seed)`. The pieces:
measures.py (tensors in, numbers out), condition.py (the runs read and passed over the data
once), sections.py (one analysis each: measures, tables, figures, metrics), plots.py.

What each section writes to outputs/<experiment>/analysis/<condition>/seed=<k>/:

- outcomes: scenarios.csv, the 4x4 table of outcome scenarios on the test set. A scenario is
  named by who is right: L = left hemisphere (fine), R = right hemisphere (coarse), F and C =
  the bilateral fine and coarse heads, 1 = right, 0 = wrong; "L1R1-F1C1" is all four right.
- gradcam (see cam.py): gradcam/<scenario>.png grids (image, left hemisphere, right
  hemisphere, bilateral fine, coarse and both heads; both heads also per hemisphere),
  gradcam_overview.png (one image per scenario), cam_localisation.csv/.png: per heatmap the
  fraction of the image at or above half its peak (small = local) on a random sample of test
  images, summarised per heatmap kind over images.
- similarity: for pairs of test images with the same fine label, both in the same scenario,
  the cosine similarity of their left, right and concatenated [left | right] features;
  similarity_medians.csv, and seaborn joint plots (left vs right with marginal histograms) of
  a seeded random sample of the pairs: similarity_joint.png (all pairs, the bilateral cosine
  as colour) and similarity_scenarios.png (the pairs within each scenario, by its
  hemisphere outcome).
- attribution: for each head of the bilateral model (and of bilateral_unspecialised when its
  run of this condition exists), the share of the predicted class's logit that comes from each
  half of the features. Softmax ignores what all classes share, so the weights are centred over
  classes; the features are non-negative, so they are centred by their mean over the probes'
  train sample (otherwise each half's share includes an image-independent offset): contribution
  of a half = (w_k - mean_j w_j) . (x - mean x_train) over that half (signed, reported as
  left_contrib / right_contrib), share = |left| / (|left| + |right|), per image, then spread
  over the test set, overall and per true coarse class. The uncentred share is kept as
  attribution.<model>.<head>.uncentred.*. attribution.csv/.png.
- probes: logistic regression on frozen features (standardised on the train sample, small L2,
  full-batch L-BFGS), fitted on a fixed random sample of the train split and scored on the
  whole test split, for each hemisphere and label level; raw, and at equal dimension (each
  side projected on its first k principal axes, k the smaller side's dimension: the pyramid's
  left features are narrower in conditions B and D): probes.csv. Differential specialisation
  = mean of (left - right on fine) and (right - left on coarse): > 0 when each hemisphere
  serves its own level better than the other one does.
- write_metrics: metrics.json, every scalar above, flat {name: float}; results.csv ingests it.

Spread over seeds comes from running this per seed; `compare(cfg)` tabulates it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import runs
from . import condition, measures, plots, sections  # noqa: F401
from .condition import DEFAULTS, Condition, available, condition_runs, load, out_dir, ready  # noqa: F401
from .measures import (BILAT_CODES, HEMI_CODES, OUTCOMES, SCENARIOS,  # noqa: F401
                       scenario_index, scenario_table)
from .sections import (attribution, gradcam, outcomes, probe_table, probes,  # noqa: F401
                       similarity, write_metrics)


def analyse_condition(cfg, seed: int, condition: str, show: bool = False, log=print, **caps) -> dict:
    """Every analysis of one condition and seed; writes its folder and returns its metrics."""
    c = load(cfg, seed, condition, **caps)
    outcomes(c)
    gradcam(c, show)
    similarity(c, show)
    attribution(c, show)
    probes(c)
    return write_metrics(c, log)


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
    base = runs.experiment_dir(cfg) / "analysis"
    for f in sorted(base.glob("*/seed=*/metrics.json")):
        seed = int(f.parent.name.split("=", 1)[1])
        for k, v in runs.read_json(f).items():
            rows.append({"condition": f.parent.parent.name, "seed": seed, "metric": k, "value": v})
    return pd.DataFrame(rows, columns=["condition", "seed", "metric", "value"])


KEY_METRICS = ("cam.area.left_hemisphere.mean", "cam.area.right_hemisphere.mean",
               "cam.area.left_minus_right.mean",
               "attribution.bilateral.fine.left_share.mean", "attribution.bilateral.coarse.left_share.mean",
               "probe.left.fine", "probe.right.fine", "probe.left.coarse", "probe.right.coarse",
               "probe.differential_specialisation", "probe_eqdim.differential_specialisation")


def compare(cfg, metrics=KEY_METRICS):
    """Mean, std and number of seeds of the key metrics per condition (spread over seeds)."""
    df = collect(cfg)
    df = df[df["metric"].isin(metrics)]
    return df.groupby(["metric", "condition"])["value"].agg(["mean", "std", "count"]).unstack("condition")
