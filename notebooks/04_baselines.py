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

from bilateral import pipeline, plan, figures
cfg, device, figures_dir = pipeline.notebook_setup(params_file, overrides, experiment, seed=seed)

# %% [markdown]
# The runs of this phase: every baseline of the preset. An ensemble is not trained: it is built
# on the best members of the unilateral pool.
# `status`: *finished* (trained with these parameters: it is read back, not trained again),
# *missing* (not trained yet), *in_progress* (started, interrupted) or *stale* (its folder holds
# another config, or a run it is built on was retrained: training it needs `force=True`).

# %%
baseline_runs = plan.phase_runs(cfg, "baselines", seed)
pipeline.runs_table(baseline_runs)

# %% [markdown]
# Train them one after the other (a finished run is read back; an ensemble is evaluated).

# %%
baselines = {r.label: r.train() for r in baseline_runs}

# %% [markdown]
# Learning curves (ensembles are not trained, so they have none).

# %%
fig = figures.learning_curves({r.label: r.history() for r in baseline_runs})
figures.save(fig, figures_dir, "04_learning_curves")

# %% [markdown]
# Every baseline next to the bilateral models of notebook 03.

# %%
bilateral = {r.label: r.metrics() for r in plan.phase_runs(cfg, "bilateral", seed)
             if r.status() == "finished"}
acc = figures.accuracy_frame({**bilateral, **baselines})
acc = acc[[c for c in ("fine", "coarse") if c in acc]]
fig = figures.accuracy_plot(acc, title="bilateral models and baselines, test accuracy")
figures.save(fig, figures_dir, "04_baselines")
acc.round(4)
