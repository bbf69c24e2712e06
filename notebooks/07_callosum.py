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
# # Beyond the paper: a corpus callosum between the hemispheres
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/07_callosum.ipynb)
#
# In the brain the two hemispheres are not only joined at the end: the **corpus callosum**, a
# band of some 200 million nerve fibres, links them all along the way, mostly between matching
# areas of the two sides. The paper's bilateral model joins its hemispheres only at the heads
# (they read the concatenated final features) and names connections between intermediate layers
# as the next step. This notebook takes that step and asks: **does letting the specialised
# hemispheres talk help, where, and how much of the signal crosses?**
#
# **The model.** The two trained hemispheres of a condition (ResNet-9s: the left learnt the fine
# labels, the right the coarse ones) are joined by *callosal links* at chosen depths
# (`callosum_at`, e.g. after `layer1` = conv2 + its residual block, and after `layer3` =
# conv4 + its residual block). At a link each side sends its feature map to the other, both at
# once, each direction with its own weights (`callosum`):
#
# - **add**: the receiver adds a 1x1-convolution projection of the sender's map;
# - **gate**: the same projection, scaled per channel by a sigmoid gate computed from both maps
#   (squeeze-and-excitation style), so the receiver can open or close each channel;
# - **concat**: a 1x1 convolution over both maps side by side, back to the receiver's width.
#
# The projections start at **zero**: before training, the callosal model computes exactly the
# bilateral model's outputs, so whatever it learns starts from the bilateral model. With
# `callosum_train: connections` the hemispheres stay frozen and only the links and the heads
# learn (gradients pass *through* the frozen layers to the links below them, never into their
# weights); with `all` the hemispheres are fine-tuned too, at `backbone_lr_scale` times the
# learning rate. The **callosal_unspecialised** baseline is the same connected model trained
# from scratch on both labels: it separates the effect of the links from that of specialisation.
#
# Run the cells from top to bottom. Only the **parameters** cell is meant to be edited;
# `params/fashion_mnist_callosal.yaml` runs this study on a CPU in under a quarter of an hour per seed;
# in another preset, set `callosum_kinds` (e.g. `[add, gate, concat]`) to switch the callosal
# runs on. Runs that already finished with the same parameters are read back instead of trained
# again.

# %% tags=["parameters"]
# Parameters: the only cell to edit. `python -m bilateral run` sets them through papermill.
params_file = "params/fashion_mnist_callosal.yaml"  # a preset in params/ (from the repository root)
experiment = None                  # outputs go to outputs/<experiment>/; None: the preset's
overrides = {}                     # any other parameter, e.g. {"callosum_kinds": ["add"]}
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
from bilateral import pipeline, plan, data, callosum, callosum_study, results, figures
cfg, device, figures_dir = pipeline.notebook_setup(params_file, overrides, experiment, condition, seed=seed)
if cfg.callosum_kinds:
    print(f"callosal kinds {', '.join(cfg.callosum_kinds)} at {' + '.join(cfg.callosum_at)}, "
          f"training {cfg.callosum_train}")
else:
    print(f"{params_file} has no callosal kind, so the cells below do nothing: set overrides = "
          f'{{"callosum_kinds": ["add"]}} above, or --set callosum_kinds=[add] on python -m bilateral run')

# %% [markdown]
# ## The model
# Parameters of each kind at full width (CIFAR-100 heads). The links cost little next to the
# hemispheres: with frozen hemispheres they and the heads are all that trains.

# %%
pd.DataFrame(callosum.params_rows(), columns=["model", "total parameters", "trainable parameters"])

# %% [markdown]
# The runs of this phase: every kind of `callosum_kinds` on every condition, built on the two
# hemispheres of that condition (notebook 02), and the unspecialised model of each kind.
# `status`: *finished* (trained with these parameters: it is read back, not trained again),
# *missing* (not trained yet), *in_progress* (started, interrupted) or *stale* (its folder holds
# another config, or a run it is built on was retrained: training it needs `force=True`).

# %%
callosal_runs = plan.phase_runs(cfg, "callosum", seed)
bilateral_runs = plan.phase_runs(cfg, "bilateral", seed)
pipeline.runs_table(callosal_runs) if callosal_runs else None

# %% [markdown]
# Train each callosal run, and for the comparison the bilateral model of each condition; the
# hemispheres they are built on (notebook 02) are trained first where missing, and every
# finished run is read back.

# %%
for r in plan.order(callosal_runs + bilateral_runs if callosal_runs else []):
    r.train()
callosal = {r.label: r.metrics() for r in callosal_runs}
bilateral = {r.label: r.metrics() for r in bilateral_runs} if callosal else {}

# %% [markdown]
# **Identity at initialisation**, checked on test images: an untrained callosal model, given the
# bilateral model's heads, gives exactly its outputs (the tests check every kind and depth).

# %%
import torch
specialised = [r for r in callosal_runs if r.stage == "callosal"]
if specialised:
    c = specialised[0].cfg
    _, _, test_split = data.load_splits(cfg)
    hier = test_split.hierarchy
    bil = plan.Run("bilateral", c, seed).load_model(hier, device)
    fresh = plan.build_model("callosal", c, hier, seed).to(device).eval()
    fresh.heads.load_state_dict(bil.heads.state_dict())
    x = next(iter(data.DeviceLoader(test_split, 256, device=device, shuffle=False,
                                    augment=False)))["x"]
    with torch.no_grad():
        same = all(torch.equal(fresh(x)[h], bil(x)[h]) for h in ("fine", "coarse"))
    print(f"untrained {c.callosum} callosal model == bilateral model on 256 test images: {same}")

# %% [markdown]
# ## Results
# Test accuracy of every callosal model beside the bilateral model of its condition (this seed).

# %%
frame = figures.accuracy_frame({**bilateral, **callosal})
if callosal:
    fig = figures.accuracy_plot(frame, title=f"callosal vs bilateral, seed {seed}")
    figures.save(fig, figures_dir, "07_callosal_vs_bilateral")
frame.round(4) if callosal else None

# %% [markdown]
# Over every seed finished so far: callosal minus bilateral of the same condition, in
# percentage points, with a 95% interval over seeds (one seed gives none).

# %%
from IPython.display import Markdown
df = results.collect(pipeline.experiment_dir(cfg))
Markdown("\n".join(callosum.markdown_section(results.per_seed(df))) or "no callosal runs yet")

# %% [markdown]
# ## Traffic: how much crosses?
# For every test image, link and direction: the norm of what crosses divided by the norm of the
# map that receives it. 0 means the link stayed silent; 0.1 means the other hemisphere changes
# the receiving map by a tenth of its size. Bars: all test images; dots: one per coarse class
# (does one kind of image draw more on the other side?). For `gate`, the histogram of the gate
# values shows whether channels are open (near 1), closed (near 0) or undecided.

# %%
traffic = {r.label: callosum_study.analyse(r.cfg, seed, show=True) for r in specialised}

# %% [markdown]
# **Reading it.** The links start silent, so a ratio well above zero means the training found
# the other hemisphere's signal worth taking in; a link that stays near zero was not needed
# for the heads' losses. The head attribution (share of each head's logit drawn from the left
# half of the features, as in notebook 05) says whether the heads still lean on the hemisphere
# that matches their label once the hemispheres can talk. On a small, easy data set such as
# Fashion-MNIST the bilateral model is already close to its hemispheres' ceiling; the question
# is better asked on CIFAR-100 (`callosum_kinds` in `params/quick.yaml`).

# %%
pd.DataFrame(traffic).T.filter(regex=r"ratio\.mean|left_share|gate\.mean").round(4) if traffic else None
