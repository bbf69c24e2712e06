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
# # The data: two labels per image
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/01_data.ipynb)
#
# Every image in the study carries **two labels**: a *fine* (specific) class, such as *dolphin*, and
# a *coarse* (general) superclass, such as *aquatic mammals*. In CIFAR-100 each of the 20
# superclasses holds exactly 5 of the 100 fine classes. The left hemisphere will learn the fine
# labels, the right hemisphere the coarse ones.
#
# A validation split is held out from the training set for every choice made during training; the
# test set is used only for the reported numbers.
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

# %%
import sys, os, subprocess
if "google.colab" in sys.modules:  # on Colab: fetch the repository and install it (not editable)
    if not os.path.isdir("/content/bilateral-brain"):
        subprocess.run(["git", "clone", "-q", "https://github.com/bilateral-brain/bilateral-brain", "/content/bilateral-brain"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/bilateral-brain"], check=True)
    os.chdir("/content/bilateral-brain")

from bilateral import pipeline, data, figures
cfg, device, figures_dir = pipeline.notebook_setup(params_file, overrides, experiment, seed=seed)

# %% [markdown]
# Load the three splits (CIFAR-100 is downloaded here when it is missing).

# %%
pipeline.check_data(cfg, download=True)
train_split, val_split, test_split = data.load_splits(cfg)
hier = train_split.hierarchy
print(f"{len(train_split)} train, {len(val_split)} validation, {len(test_split)} test images; "
      f"{hier.n_fine} fine and {hier.n_coarse} coarse classes")

# %% [markdown]
# Some training images with their fine label and, in brackets, their coarse label.

# %%
figures.save(figures.sample_grid(train_split, n=16, seed=seed), figures_dir, "01_samples")

# %% [markdown]
# The hierarchy: which fine classes make up each coarse class.

# %%
figures.save(figures.hierarchy_figure(hier), figures_dir, "01_hierarchy")
