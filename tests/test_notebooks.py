"""The committed notebooks: each .ipynb paired with a percent-format .py that holds the same cells,
outputs stripped, one `parameters` cell of plain assignments, a Colab badge and a Colab-only,
non-editable install, the project's kernel; and an edit on either side of a pair reaches the other
through the real `jupytext --sync`, as JupyterLab's jupytext extension does on save.

A notebook is checked as git would commit it: through the clean filter git applies to it
(nbstripout, which `make lab` installs), so a notebook run and saved in JupyterLab, outputs and
all, passes; without the filter, the working copy is what would be committed."""
import ast
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file
from jupytext.formats import short_form_multiple_formats

from bilateral import pipeline

ROOT = Path(__file__).parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def as_committed(path: Path, content: Path | None = None) -> str:
    """The text `git add` would store for the notebook at `path` (its working copy, or the file
    `content` in its place): git's own clean filter for that path, if any, applied. Outside a git
    checkout, the file as it is."""
    try:
        git = dict(cwd=ROOT, check=True, capture_output=True, text=True)
        sha = subprocess.run(["git", "hash-object", "-w", f"--path={path.relative_to(ROOT)}",
                              str(content or path)], **git).stdout.strip()
        return subprocess.run(["git", "cat-file", "blob", sha], **git).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        return Path(content or path).read_text()


def strip_filter_installed() -> bool:
    """Is nbstripout this checkout's clean filter for the notebooks (`make lab`)?"""
    run = dict(cwd=ROOT, capture_output=True, text=True)
    try:
        attr = subprocess.run(["git", "check-attr", "filter", "--", "notebooks/01_data.ipynb"], **run)
        clean = subprocess.run(["git", "config", "filter.nbstripout.clean"], **run)
    except FileNotFoundError:
        return False
    return attr.stdout.strip().endswith(": nbstripout") and "nbstripout" in clean.stdout


def problems(nb, name) -> list[str]:
    """What is wrong with a notebook as committed (an empty list: nothing)."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
            out.append(f"cell {i} has outputs or an execution count: strip them (`make lab` "
                       f"installs nbstripout as the git filter that does it at commit)")
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(params) != 1:
        out.append(f"{len(params)} cells tagged `parameters`, expected exactly 1")
    else:
        tree = ast.parse(params[0].source)
        names = set()
        for stmt in tree.body:
            if not isinstance(stmt, ast.Assign):
                out.append(f"parameters cell: only assignments allowed, got {ast.dump(stmt)[:40]}")
                continue
            ast.literal_eval(stmt.value)  # plain values only, so papermill can override them
            names |= {t.id for t in stmt.targets}
        want = {"params_file", "experiment", "overrides"} | ({"seeds"} if name == pipeline.FINAL else {"seed"})
        if want - names:
            out.append(f"parameters cell lacks {sorted(want - names)}")
    badge = f"colab.research.google.com/github/bilateral-brain/bilateral-brain/blob/main/notebooks/{name}.ipynb"
    if not nb.cells or nb.cells[0].cell_type != "markdown" or badge not in nb.cells[0].source:
        out.append("first cell must be the markdown introduction with its Open in Colab badge")
    setup = [c for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source]
    if len(setup) != 1:
        out.append("no setup cell installing the repository on Colab")
    elif any(flag in setup[0].source for flag in ('"-e"', "'-e'", " -e ", "--editable")):
        out.append("the Colab install must not be editable")
    return out


def cells(path) -> list[tuple]:
    """(type, source, tags) of every cell, read by jupytext whatever the file's format."""
    nb = jupytext.read(path)
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def disagreement(ipynb: Path, py: Path | None = None) -> str:
    """'' when the .ipynb and its .py hold the same cells, else the first difference."""
    a, b = cells(ipynb), cells(py or ipynb.with_suffix(".py"))
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"cell {i} differs:\n.ipynb {x}\n.py    {y}"
    return "" if len(a) == len(b) else f"{len(a)} cells in the .ipynb, {len(b)} in the .py"


def sync(path: Path) -> None:
    """What JupyterLab's jupytext does on save: the newer file of the pair rewrites the other."""
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(path)], check=True,
                   capture_output=True, text=True)


def test_all_six_notebooks_are_there_each_with_its_py():
    assert [p.stem for p in NOTEBOOKS] == list(pipeline.NOTEBOOKS)
    assert sorted(p.stem for p in NB_DIR.glob("*.py")) == list(pipeline.NOTEBOOKS)


def test_the_notebooks_are_paired_ipynb_with_percent_py():
    config = load_jupytext_configuration_file(find_jupytext_configuration_file(str(NB_DIR)))
    assert set(short_form_multiple_formats(config.formats).split(",")) == {"ipynb", "py:percent"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_pair_agrees_is_stripped_and_has_its_parameters_cell(path, tmp_path):
    committed = tmp_path / path.name
    committed.write_text(as_committed(path))
    nb = nbformat.read(committed, as_version=4)
    nbformat.validate(nb)
    assert problems(nb, path.stem) == []
    assert disagreement(committed, path.with_suffix(".py")) == ""
    # the project's kernel, as JupyterLab writes it back on save (no diff); nothing else a save
    # rewrites (language_info) is committed
    assert nb.metadata.kernelspec == {"name": pipeline.KERNEL, "display_name": pipeline.KERNEL_DISPLAY,
                                      "language": "python"}
    assert "language_info" not in nb.metadata
    assert jupytext.read(path.with_suffix(".py")).metadata["kernelspec"] == nb.metadata.kernelspec
    text = path.with_suffix(".py").read_text()
    assert text.count('# %% tags=["parameters"]') == 1  # the .py carries the tag itself
    assert problems(jupytext.read(path.with_suffix(".py")), path.stem) == []


def test_the_checks_catch_outputs_a_missing_parameters_cell_and_a_stale_py(tmp_path):
    nb = nbformat.read(NOTEBOOKS[1], as_version=4)
    with_output = copy.deepcopy(nb)
    cell = next(c for c in with_output.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", text="hello")]
    assert any("outputs" in p for p in problems(with_output, NOTEBOOKS[1].stem))
    untagged = copy.deepcopy(nb)
    for c in untagged.cells:
        c.metadata.pop("tags", None)
    assert any("parameters" in p for p in problems(untagged, NOTEBOOKS[1].stem))
    logic = copy.deepcopy(nb)
    next(c for c in logic.cells if "parameters" in c.metadata.get("tags", [])).source += "\nprint(1)"
    assert any("only assignments" in p for p in problems(logic, NOTEBOOKS[1].stem))
    ipynb = copy_pair(NOTEBOOKS[1], tmp_path)
    logic.cells = logic.cells[:-1]
    nbformat.write(logic, ipynb)  # edited without syncing: the .py is stale
    assert "cell" in disagreement(ipynb)


def copy_pair(ipynb: Path, folder: Path) -> Path:
    for src in (ipynb, ipynb.with_suffix(".py"), NB_DIR / "jupytext.toml"):
        shutil.copy(src, folder / src.name)
    return folder / ipynb.name


def make_newer(path: Path, than: Path) -> None:
    t = than.stat().st_mtime
    os.utime(path, (t + 10, t + 10))


def test_an_edit_in_the_ipynb_reaches_the_py(tmp_path):
    ipynb = copy_pair(NOTEBOOKS[2], tmp_path)
    py = ipynb.with_suffix(".py")
    nb = nbformat.read(ipynb, as_version=4)  # as JupyterLab would: add a cell, change a line
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell('print("a student\'s cell")'))
    last = next(c for c in reversed(nb.cells) if c.cell_type == "code")
    line = last.source.splitlines()[0]
    last.source = last.source.replace(line, line + "  # changed in JupyterLab", 1)
    nbformat.write(nb, ipynb)
    make_newer(ipynb, than=py)
    sync(ipynb)
    text = py.read_text()
    assert "# %%\nprint(\"a student's cell\")\n" in text
    assert f"\n{line}  # changed in JupyterLab\n" in text
    assert disagreement(ipynb) == ""


def test_an_edit_in_the_py_reaches_the_ipynb_and_keeps_it_stripped(tmp_path):
    ipynb = copy_pair(NOTEBOOKS[3], tmp_path)
    py = ipynb.with_suffix(".py")
    text = py.read_text()
    assert text.count("\n# %% [markdown]\n") >= 2
    head, tail = text.rsplit("\n# %% [markdown]\n", 1)  # a new cell before the last markdown one
    text = head + '\n# %%\nn_runs = 3\n\n# %% [markdown]\n' + tail
    line = text.rstrip().splitlines()[-1]  # the last line of the last cell
    text = text.rstrip()[: -len(line)] + line + "  # changed in an editor\n"
    py.write_text(text)
    make_newer(py, than=ipynb)
    sync(py)
    nb = nbformat.read(ipynb, as_version=4)
    nbformat.validate(nb)
    sources = [c.source for c in nb.cells]
    assert "n_runs = 3" in sources
    assert sources[-1].endswith(line + "  # changed in an editor")
    assert problems(nb, ipynb.stem) == []
    assert disagreement(ipynb) == ""


def test_make_lab_registers_the_kernel_the_notebooks_name():
    makefile = (ROOT / "Makefile").read_text()
    assert (f'--name {pipeline.KERNEL} --display-name "{pipeline.KERNEL_DISPLAY}"' in makefile
            and f"--env {pipeline.KERNEL_ENV} {pipeline.KERNEL}" in makefile)


def executed(nb):
    """nb as JupyterLab saves it after Run All: outputs, execution counts, the kernel's
    language_info, widget state, timing metadata."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="experiment smoke\n"),
                        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}),
                        nbformat.v4.new_output("execute_result", data={"text/plain": "0.5"},
                                               execution_count=i + 1)]
        cell.metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00.000Z"}
    nb.metadata["language_info"] = {"name": "python", "version": sys.version.split()[0],
                                    "codemirror_mode": {"name": "ipython", "version": 3},
                                    "file_extension": ".py", "mimetype": "text/x-python",
                                    "nbconvert_exporter": "python", "pygments_lexer": "ipython3"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def test_a_notebook_run_and_saved_in_jupyterlab_commits_unchanged(tmp_path):
    """Outputs never reach a commit and never fail the tests: the .ipynb goes through the
    nbstripout filter at `git add` (byte for byte what is committed now), and the .py of the
    pair, rewritten by jupytext on save, keeps only the kernel and the pairing."""
    if not strip_filter_installed():
        pytest.skip("nbstripout is not this checkout's git filter for notebooks: `make lab` installs it")
    path = NOTEBOOKS[2]
    ipynb = copy_pair(path, tmp_path)
    py = ipynb.with_suffix(".py")
    before = py.read_text()
    nb = executed(nbformat.read(ipynb, as_version=4))
    assert any("outputs" in p for p in problems(nb, path.stem))  # the working copy has outputs
    nbformat.write(nb, ipynb)
    assert as_committed(path, content=ipynb) == as_committed(path)  # git sees no change
    make_newer(ipynb, than=py)
    sync(ipynb)
    assert py.read_text() == before
