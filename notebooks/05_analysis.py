# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python (bilateral)
#     language: python
#     name: bilateral
# ---

# %% [markdown]
# # Analysis: when does the bilateral model get it right?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/05_analysis.ipynb)
#
# For every test image, four things can be right (1) or wrong (0): the left hemisphere's fine
# prediction (**L**), the right hemisphere's coarse prediction (**R**), and the bilateral model's
# fine (**F**) and coarse (**C**) heads. A scenario such as `L1R0-F1C1` names one combination; the
# outcome-scenario table counts the test images of each. Then Grad-CAM heatmaps, the similarity of
# the hemispheres' features, how much each head draws on each hemisphere, and linear probes of
# what each hemisphere knows (`bilateral.analysis`; nothing is trained here).
#
# Run the cells from top to bottom; each analysis cell can be rerun alone. Only the
# **parameters** cell is meant to be edited; `params/smoke.yaml` runs in minutes on a CPU,
# `params/quick.yaml` is CIFAR-100 sized for about an hour on a Colab GPU. Notebooks 02-04 train
# the runs read here.

# %% tags=["parameters"]
# Parameters: the only cell to edit. `python -m bilateral run` sets them through papermill.
params_file = "params/smoke.yaml"  # a preset in params/ (path from the repository root)
experiment = None                  # outputs go to outputs/<experiment>/; None: the preset's
overrides = {}                     # any other parameter, e.g. {"epochs": 3, "device": "cpu"}
seed = 0
condition = None                   # "A".."D" for one condition; None: all of the preset

# %%
import sys, os, subprocess
if "google.colab" in sys.modules:  # on Colab: fetch the repository and install it (not editable)
    if not os.path.isdir("/content/bilateral-brain"):
        subprocess.run(["git", "clone", "-q", "https://github.com/bilateral-brain/bilateral-brain", "/content/bilateral-brain"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/bilateral-brain"], check=True)
    os.chdir("/content/bilateral-brain")

import pandas as pd
from bilateral import analysis, models, pipeline, results, figures
cfg, device, figures_dir = pipeline.notebook_setup(params_file, overrides, experiment, condition, seed=seed)

# %% [markdown]
# The runs each condition's analysis reads: its two hemispheres, its bilateral model and, for
# condition A, the bilateral model trained without specialisation (a baseline of notebook 04).
# A condition is analysed when its hemispheres and bilateral model are *finished*.

# %%
pd.DataFrame([{"condition": cond, "role": role, "key": r.key, "status": r.status()}
              for cond in cfg.conditions
              for role, r in analysis.condition_runs(cfg, seed, cond).items()])

# %% [markdown]
# Load the models of each condition and run them once over the test split and a sample of the
# train split (the probes' training data): every analysis below works from these predictions and
# features. `analysis.load(cfg, seed, "A", probe_train=2000, ...)` changes a parameter
# (`analysis.DEFAULTS` lists them).

# %%
studied = {cond: analysis.load(cfg, seed, cond, device) for cond in analysis.ready(cfg, seed)}
print("analysed:", ", ".join(studied) or "none (train the runs first)")

# %% [markdown]
# ## Outcome scenarios
# Test images per scenario (rows: hemispheres, columns: bilateral heads).

# %%
tables = {}
for cond, c in studied.items():
    analysis.outcomes(c)
    tables[cond] = analysis.scenario_table(c.scen, margins=True)
    tables[cond].to_csv(figures_dir / f"05_outcomes_{cond}.csv")
    print(f"condition {cond}, seed {seed}")
    display(tables[cond])
figures.save(analysis.plots.outcome_heatmaps(tables), figures_dir, "05_outcomes")

# %% [markdown]
# Trainable parameters of every model of the study at full width (CIFAR-100 heads)...

# %%
from IPython.display import Markdown
Markdown(models.params_table())

# %% [markdown]
# ...and of the runs of this experiment, at its width, as each run recorded them.

# %%
results.trainable_params(pipeline.experiment_dir(cfg), seed)

# %% [markdown]
# ## Grad-CAM
# Where in the image each hemisphere, and each head of the bilateral model, finds its evidence;
# one image per scenario here, a few per scenario in `analysis/<condition>/seed=<k>/gradcam/`.
# Localisation: the fraction of the image at or above half the heatmap's peak (lower = more local).

# %%
for c in studied.values():
    analysis.gradcam(c)

# %% [markdown]
# ## Feature similarity
# Pairs of test images with the same fine label: the cosine similarity of their left features
# against that of their right features (and of both together, as colour).

# %%
for c in studied.values():
    analysis.similarity(c)

# %% [markdown]
# ## Head attribution
# How much of each bilateral head's predicted logit comes from the left and from the right
# hemisphere's features, measured from the average training image (centred features), with the
# signed contributions; the uncentred share is shown faded.

# %%
for c in studied.values():
    analysis.attribution(c)

# %% [markdown]
# ## Probes
# What each hemisphere's frozen features know: logistic probes for fine and coarse labels, raw and
# with both hemispheres reduced to the same dimension (`eqdim`).

# %%
for cond, c in studied.items():
    analysis.probes(c)
    print(f"condition {cond}: test accuracy of the probes")
    display(analysis.probe_table(c).round(3))

# %% [markdown]
# ## The numbers
# Every number above goes to `analysis/<condition>/seed=<k>/metrics.json`, which notebook 06
# collects over seeds.

# %%
numbers = {cond: analysis.write_metrics(c) for cond, c in studied.items()}
