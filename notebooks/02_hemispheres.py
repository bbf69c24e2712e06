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
# # Phase 1: two specialised hemispheres
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/02_hemispheres.ipynb)
#
# A **hemisphere** is a backbone network (ResNet-9 here) that turns an image into a feature vector,
# with one classification head. The **left** hemisphere is trained on the fine labels (specifics),
# the **right** on the coarse labels (generalities). Four conditions differ in what else sets the
# two apart:
#
# - **A** only the objective; **B** the left is a *pyramid* (widths shrink with depth);
# - **C** k-winners-take-all sparsity in both; **D** B and C together.
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
# The runs of this phase: a left and a right hemisphere for every condition. Each has a folder
# under `outputs/<experiment>/` named by its key.
# `status`: *finished* (trained with these parameters: it is read back, not trained again),
# *missing* (not trained yet), *in_progress* (started, interrupted) or *stale* (its folder holds
# another config, or a run it is built on was retrained: training it needs `force=True`).

# %%
hemisphere_runs = plan.phase_runs(cfg, "hemispheres", seed)
pipeline.runs_table(hemisphere_runs)

# %% [markdown]
# Train them one after the other; a finished run is read back. After an interruption, rerunning
# this cell reads back the finished runs and resumes the others.

# %%
hemispheres = {r.label: r.train() for r in hemisphere_runs}

# %% [markdown]
# Learning curves: training loss and validation accuracy per epoch.

# %%
fig = figures.learning_curves({r.label: r.history() for r in hemisphere_runs})
figures.save(fig, figures_dir, "02_learning_curves")

# %% [markdown]
# Test accuracy on both label levels. The left hemisphere has only a fine head; mapping its fine
# prediction to that class's superclass (*fine→coarse*) gives it a coarse accuracy too.

# %%
acc = figures.accuracy_frame(hemispheres)
figures.save(figures.accuracy_plot(acc, title="hemispheres, test accuracy"), figures_dir,
             "02_hemisphere_accuracy")
acc.round(4)
