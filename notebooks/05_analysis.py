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
# # Analysis: when does the bilateral model get it right?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/05_analysis.ipynb)
#
# For every test image, four things can be right or wrong: the left hemisphere's fine prediction
# (**L**), the right hemisphere's coarse prediction (**R**), and the bilateral model's fine (**F**)
# and coarse (**C**) heads. The outcome-scenario table counts the images for each combination of
# hemisphere outcomes (rows) and bilateral outcomes (columns). Then the parameter counts of every
# model, and the deeper analyses.
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

from bilateral import pipeline, train, outcomes, models, results, figures
cfg = pipeline.notebook_config(params_file, overrides, experiment, condition)
device = train.pick_device(cfg.device)
figures_dir = pipeline.figure_dir(cfg, seed)
print(f"experiment {cfg.experiment}: {cfg.dataset}, recipe {cfg.recipe}, width {cfg.width}, "
      f"seed {seed}, device {device}")

# %% [markdown]
# Outcome scenarios of the bilateral model of each condition on the test set (rows: hemispheres,
# columns: bilateral heads; ✓ right, ✗ wrong).

# %%
tables = outcomes.outcome_tables(cfg, seed)
for cond, table in tables.items():
    table.to_csv(figures_dir / f"05_outcomes_{cond}.csv")
    print(f"condition {cond}, seed {seed}")
    display(table)
figures.save(figures.outcome_heatmaps(tables), figures_dir, "05_outcomes")

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
# ## Deeper analyses
# Grad-CAM heatmaps, feature similarity, head attribution and probes (`bilateral.analysis`).

# %%
from bilateral import analysis
numbers = analysis.run_analyses(cfg, seed)
