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
# # Phase 2: the bilateral model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/03_bilateral.ipynb)
#
# The **bilateral** model loads the two trained hemispheres of a condition, **freezes** them,
# concatenates their features (left | right) and trains two new linear heads on the concatenation: a
# fine head and a coarse head. Does combining the specialists beat each of them alone?
#
# Run the cells from top to bottom. Only the **parameters** cell is meant to be edited;
# `params/smoke.yaml` runs in minutes on a CPU, `params/quick.yaml` is CIFAR-100 sized for about an
# hour on a Colab GPU. Runs that already finished with the same parameters are read back instead of
# trained again.

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

from bilateral import pipeline, plan, figures
cfg, device, figures_dir = pipeline.notebook_setup(params_file, overrides, experiment, condition, seed=seed)

# %% [markdown]
# The runs of this phase: one bilateral model per condition, each built on the two hemispheres
# that notebook 02 trained.
# `status`: *finished* (trained with these parameters: it is read back, not trained again),
# *missing* (not trained yet), *in_progress* (started, interrupted) or *stale* (its folder holds
# another config, or a run it is built on was retrained: training it needs `force=True`).

# %%
bilateral_runs = plan.phase_runs(cfg, "bilateral", seed)
pipeline.runs_table(bilateral_runs)

# %% [markdown]
# Train the heads of each (a finished run is read back), then read the metrics of the
# hemispheres they are built on.

# %%
bilateral = {r.label: r.train() for r in bilateral_runs}
hemispheres = {u.label: u.metrics() for r in bilateral_runs for u in r.upstream()}

# %% [markdown]
# Learning curves of the heads.

# %%
fig = figures.learning_curves({r.label: r.history() for r in bilateral_runs})
figures.save(fig, figures_dir, "03_learning_curves")

# %% [markdown]
# The bilateral model against its own hemispheres, condition by condition.

# %%
fig = figures.bilateral_vs_hemispheres(hemispheres, bilateral)
figures.save(fig, figures_dir, "03_bilateral_vs_hemispheres")
figures.accuracy_frame({**hemispheres, **bilateral}).round(4)
