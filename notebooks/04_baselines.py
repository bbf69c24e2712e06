# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Baselines: networks without specialisation
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/04_baselines.ipynb)
#
# Is the bilateral model better because of specialisation, or just because it is bigger? The
# baselines answer that:
#
# - the same two-hemisphere model trained **end to end** without specialisation;
# - a **unilateral** dual-head ResNet-9 (one backbone, both heads), trained several times to form a
#   pool;
# - **ResNet-18** (about the bilateral model's size) and **ResNet-34** (about twice);
# - **ensembles** of the k best unilateral networks of the pool (chosen on validation accuracy),
#   their logits averaged.
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

from bilateral import pipeline, train, figures
cfg = pipeline.notebook_config(params_file, overrides, experiment)
device = train.pick_device(cfg.device)
figures_dir = pipeline.figure_dir(cfg, seed)
print(f"experiment {cfg.experiment}: {cfg.dataset}, recipe {cfg.recipe}, width {cfg.width}, "
      f"seed {seed}, device {device}")

# %% [markdown]
# Train (or read back) every baseline of the preset.

# %%
baselines = pipeline.train_runs(cfg, "04_baselines", seed)

# %% [markdown]
# Learning curves (ensembles are not trained, so they have none).

# %%
fig = figures.learning_curves(pipeline.histories(cfg, "04_baselines", seed))
figures.save(fig, figures_dir, "04_learning_curves")

# %% [markdown]
# Every baseline next to the bilateral models of notebook 03.

# %%
acc = figures.accuracy_frame({**pipeline.read_runs(cfg, "03_bilateral", seed), **baselines})
acc = acc[[c for c in ("fine", "coarse") if c in acc]]
fig = figures.accuracy_bars(acc, title="bilateral models and baselines, test accuracy")
figures.save(fig, figures_dir, "04_baselines")
acc.round(4)
