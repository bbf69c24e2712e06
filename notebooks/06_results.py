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
# # Results over all seeds
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/06_results.ipynb)
#
# The table of the study: every model's fine and coarse test accuracy as mean ± sample standard
# deviation over seeds, and the bilateral (specialised) model against every other model with a 95%
# confidence interval. It is rebuilt from the run records, so `python -m bilateral report
# outputs/<experiment>` gives the same files (`results.csv`, `results.md`).
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
seeds = [0]                        # the seeds to gather

# %%
import sys, os, subprocess
if "google.colab" in sys.modules:  # on Colab: fetch the repository and install it (not editable)
    if not os.path.isdir("/content/bilateral-brain"):
        subprocess.run(["git", "clone", "-q", "https://github.com/bilateral-brain/bilateral-brain", "/content/bilateral-brain"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/bilateral-brain"], check=True)
    os.chdir("/content/bilateral-brain")

from bilateral import pipeline, train, results, figures
cfg = pipeline.notebook_config(params_file, overrides, experiment)
device = train.pick_device(cfg.device)
experiment_dir = pipeline.experiment_dir(cfg)
print(f"experiment {cfg.experiment}: {cfg.dataset}, recipe {cfg.recipe}, width {cfg.width}, "
      f"seeds {seeds}, device {device}")

# %%
rep = results.report(experiment_dir)
found = sorted(int(s) for s in rep['rows'].seed.dropna().unique())
if set(seeds) - set(found):
    print(f"warning: no runs of seeds {sorted(set(seeds) - set(found))}")
from IPython.display import Markdown
Markdown(rep['md'].read_text())

# %% [markdown]
# Mean test accuracy per model over seeds, each head on its own axis zoomed to its values; the
# lines are 95% intervals of the mean (none with one seed), the dashed line the reference
# bilateral model.

# %%
figures.save(figures.results_plot(rep["summary"]), experiment_dir, "results")
