"""Writes the numbered notebooks (outputs stripped). Edit the cells here, then run:
    .venv/bin/python notebooks/make_notebooks.py
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
REPO = "https://github.com/bilateral-brain/bilateral-brain"
COLAB = "https://colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks"


def params_cell(seed=True, condition=False):
    lines = [
        "# Parameters: the only cell to edit. `python -m bilateral run` sets them through papermill.",
        'params_file = "params/smoke.yaml"  # a preset in params/ (path from the repository root)',
        "experiment = None                  # outputs go to outputs/<experiment>/; None: the preset's",
        'overrides = {}                     # any other parameter, e.g. {"epochs": 3, "device": "cpu"}',
        "seed = 0" if seed else "seeds = [0]                        # the seeds to gather",
    ]
    if condition:
        lines.append('condition = None                   # "A".."D" for one condition; None: all of '
                     "the preset")
    cell = new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["parameters"]
    return cell


def setup_cell(imports, per_seed=True, condition=False):
    return new_code_cell(f"""\
import sys, os, subprocess
if "google.colab" in sys.modules:  # on Colab: fetch the repository and install it (not editable)
    if not os.path.isdir("/content/bilateral-brain"):
        subprocess.run(["git", "clone", "-q", "{REPO}", "/content/bilateral-brain"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/bilateral-brain"], check=True)
    os.chdir("/content/bilateral-brain")

from bilateral import {imports}
cfg = pipeline.notebook_config(params_file, overrides, experiment{", condition" if condition else ""})
device = train.pick_device(cfg.device)
fig_dir = pipeline.{"figure_dir(cfg, seed)" if per_seed else "experiment_dir(cfg)"}
print(f"experiment {{cfg.experiment}}: {{cfg.dataset}}, recipe {{cfg.recipe}}, width {{cfg.width}}, "
      f"{"seed {seed}" if per_seed else "seeds {seeds}"}, device {{device}}")""")


def intro(name, title, text):
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB}/{name}.ipynb)"
    return new_markdown_cell(f"# {title}\n\n{badge}\n\n{text}")


def md(text):
    return new_markdown_cell(text)


def code(text):
    return new_code_cell(text)


RUN_NOTE = ("Run the cells from top to bottom. Only the **parameters** cell is meant to be edited; "
            "`params/smoke.yaml` runs in minutes on a CPU, `params/quick.yaml` is CIFAR-100 sized for "
            "about an hour on a Colab GPU. Runs that already finished with the same parameters are "
            "read back instead of trained again.")

NOTEBOOKS = {
    "01_data": ("The data: two labels per image", [
        md("Every image in the study carries **two labels**: a *fine* (specific) class, such as "
           "*dolphin*, and a *coarse* (general) superclass, such as *aquatic mammals*. In CIFAR-100 "
           "each of the 20 superclasses holds exactly 5 of the 100 fine classes. The left hemisphere "
           "will learn the fine labels, the right hemisphere the coarse ones.\n\n"
           "A validation split is held out from the training set for every choice made during "
           "training; the test set is used only for the reported numbers.\n\n" + RUN_NOTE),
        params_cell(),
        setup_cell("pipeline, train, stages, figures"),
        md("Load the three splits (CIFAR-100 is downloaded here when it is missing)."),
        code("pipeline.check_data(cfg, download=True)\n"
             "train_split, val_split, test_split = stages.load_splits(cfg)\n"
             "hier = train_split.hierarchy\n"
             'print(f"{len(train_split)} train, {len(val_split)} validation, {len(test_split)} test images; "\n'
             '      f"{hier.n_fine} fine and {hier.n_coarse} coarse classes")'),
        md("Some training images with their fine label and, in brackets, their coarse label."),
        code('figures.save(figures.sample_grid(train_split, n=16, seed=seed), fig_dir, "01_samples")'),
        md("The hierarchy: which fine classes make up each coarse class."),
        code('figures.save(figures.hierarchy_figure(hier), fig_dir, "01_hierarchy")'),
    ]),
    "02_hemispheres": ("Phase 1: two specialised hemispheres", [
        md("A **hemisphere** is a backbone network (ResNet-9 here) that turns an image into a feature "
           "vector, with one classification head. The **left** hemisphere is trained on the fine "
           "labels (specifics), the **right** on the coarse labels (generalities). Four conditions "
           "differ in what else sets the two apart:\n\n"
           "- **A** only the objective; **B** the left is a *pyramid* (widths shrink with depth);\n"
           "- **C** k-winners-take-all sparsity in both; **D** B and C together.\n\n" + RUN_NOTE),
        params_cell(condition=True),
        setup_cell("pipeline, train, figures", condition=True),
        md("Train (or read back) the left and right hemisphere of every condition."),
        code('hemispheres = pipeline.train_runs(cfg, "02_hemispheres", seed)'),
        md("Learning curves: training loss and validation accuracy per epoch."),
        code('fig = figures.learning_curves(pipeline.histories(cfg, "02_hemispheres", seed))\n'
             'figures.save(fig, fig_dir, "02_learning_curves")'),
        md("Test accuracy on both label levels. The left hemisphere has only a fine head; mapping its "
           "fine prediction to that class's superclass (*fine→coarse*) gives it a coarse accuracy too."),
        code("acc = figures.accuracy_frame(hemispheres)\n"
             'figures.save(figures.accuracy_bars(acc, title="hemispheres, test accuracy"), fig_dir,\n'
             '             "02_hemisphere_accuracy")\n'
             "acc.round(4)"),
    ]),
    "03_bilateral": ("Phase 2: the bilateral model", [
        md("The **bilateral** model loads the two trained hemispheres of a condition, **freezes** "
           "them, concatenates their features (left | right) and trains two new linear heads on "
           "the concatenation: a fine head and a coarse head. Does combining the specialists beat "
           "each of them alone?\n\n" + RUN_NOTE),
        params_cell(condition=True),
        setup_cell("pipeline, train, figures", condition=True),
        md("Train (or read back) the heads of the bilateral model of every condition. The "
           "hemispheres come from notebook 02."),
        code('bilateral = pipeline.train_runs(cfg, "03_bilateral", seed)\n'
             'hemispheres = pipeline.read_runs(cfg, "02_hemispheres", seed)'),
        md("Learning curves of the heads."),
        code('fig = figures.learning_curves(pipeline.histories(cfg, "03_bilateral", seed))\n'
             'figures.save(fig, fig_dir, "03_learning_curves")'),
        md("The bilateral model against its own hemispheres, condition by condition."),
        code("fig = figures.bilateral_vs_hemispheres(hemispheres, bilateral)\n"
             'figures.save(fig, fig_dir, "03_bilateral_vs_hemispheres")\n'
             "figures.accuracy_frame({**hemispheres, **bilateral}).round(4)"),
    ]),
    "04_baselines": ("Baselines: networks without specialisation", [
        md("Is the bilateral model better because of specialisation, or just because it is bigger? "
           "The baselines answer that:\n\n"
           "- the same two-hemisphere model trained **end to end** without specialisation;\n"
           "- a **unilateral** dual-head ResNet-9 (one backbone, both heads), trained several times "
           "to form a pool;\n"
           "- **ResNet-18** (about the bilateral model's size) and **ResNet-34** (about twice);\n"
           "- **ensembles** of the k best unilateral networks of the pool (chosen on validation "
           "accuracy), their logits averaged.\n\n" + RUN_NOTE),
        params_cell(),
        setup_cell("pipeline, train, figures"),
        md("Train (or read back) every baseline of the preset."),
        code('baselines = pipeline.train_runs(cfg, "04_baselines", seed)'),
        md("Learning curves (ensembles are not trained, so they have none)."),
        code('fig = figures.learning_curves(pipeline.histories(cfg, "04_baselines", seed))\n'
             'figures.save(fig, fig_dir, "04_learning_curves")'),
        md("Every baseline next to the bilateral models of notebook 03."),
        code('acc = figures.accuracy_frame({**pipeline.read_runs(cfg, "03_bilateral", seed), **baselines})\n'
             'acc = acc[[c for c in ("fine", "coarse") if c in acc]]\n'
             'fig = figures.accuracy_bars(acc, title="bilateral models and baselines, test accuracy")\n'
             'figures.save(fig, fig_dir, "04_baselines")\n'
             "acc.round(4)"),
    ]),
    "05_analysis": ("Analysis: when does the bilateral model get it right?", [
        md("For every test image, four things can be right or wrong: the left hemisphere's fine "
           "prediction (**L**), the right hemisphere's coarse prediction (**R**), and the bilateral "
           "model's fine (**F**) and coarse (**C**) heads. The outcome-scenario table counts the "
           "images for each combination of hemisphere outcomes (rows) and bilateral outcomes "
           "(columns). Then the parameter counts of every model, and the deeper analyses.\n\n"
           + RUN_NOTE),
        params_cell(condition=True),
        setup_cell("pipeline, train, outcomes, models, results, figures", condition=True),
        md("Outcome scenarios of the bilateral model of each condition on the test set "
           "(rows: hemispheres, columns: bilateral heads; ✓ right, ✗ wrong)."),
        code("tables = outcomes.outcome_tables(cfg, seed)\n"
             "for cond, table in tables.items():\n"
             '    table.to_csv(fig_dir / f"05_outcomes_{cond}.csv")\n'
             '    print(f"condition {cond}, seed {seed}")\n'
             "    display(table)\n"
             'figures.save(figures.outcome_heatmaps(tables), fig_dir, "05_outcomes")'),
        md("Trainable parameters of every model of the study at full width (CIFAR-100 heads)..."),
        code("from IPython.display import Markdown\n"
             "Markdown(models.params_table())"),
        md("...and of the runs of this experiment, at its width, as each run recorded them."),
        code("results.trainable_params(pipeline.experiment_dir(cfg), seed)"),
        md("## Deeper analyses\n"
           "Grad-CAM heatmaps, feature similarity, head attribution and probes "
           "(`bilateral.analysis`)."),
        code("from bilateral import analysis\n"
             "numbers = analysis.run_analyses(cfg, seed)"),
    ]),
    "06_results": ("Results over all seeds", [
        md("The table of the study: every model's fine and coarse test accuracy as mean ± sample "
           "standard deviation over seeds, and the bilateral (specialised) model against every "
           "other model with a 95% confidence interval. It is rebuilt from the run records, so "
           "`python -m bilateral report outputs/<experiment>` gives the same files "
           "(`results.csv`, `results.md`).\n\n" + RUN_NOTE),
        params_cell(seed=False),
        setup_cell("pipeline, train, results, figures", per_seed=False),
        code("rep = results.report(fig_dir)\n"
             "found = sorted(int(s) for s in rep['rows'].seed.dropna().unique())\n"
             "if set(seeds) - set(found):\n"
             '    print(f"warning: no runs of seeds {sorted(set(seeds) - set(found))}")\n'
             "from IPython.display import Markdown\n"
             "Markdown(rep['md'].read_text())"),
        md("Mean test accuracy per model, error bars one sample standard deviation over seeds."),
        code('figures.save(figures.results_bars(rep["summary"]), fig_dir, "results")'),
    ]),
}


def build() -> dict:
    """{name: notebook} of every numbered notebook."""
    out = {}
    for name, (title, cells) in NOTEBOOKS.items():
        nb = new_notebook(cells=[intro(name, title, cells[0].source), *cells[1:]])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nb.metadata["colab"] = {"provenance": []}
        for i, cell in enumerate(nb.cells):  # stable ids keep diffs small
            cell["id"] = f"{name[:2]}-{i:02d}"
        nbformat.validate(nb)
        out[name] = nb
    return out


def main(folder=HERE):
    for name, nb in build().items():
        nbformat.write(nb, Path(folder) / f"{name}.ipynb")
        print(f"wrote {Path(folder) / name}.ipynb")


if __name__ == "__main__":
    main()
