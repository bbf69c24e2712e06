"""The committed notebooks: outputs stripped, one `parameters` cell of plain assignments, a Colab
badge and a Colab-only, non-editable install; and they match notebooks/make_notebooks.py."""
import ast
import copy
import importlib.util
from pathlib import Path

import nbformat
import pytest

from bilateral import pipeline

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def problems(nb, name) -> list[str]:
    """What is wrong with a notebook as committed (an empty list: nothing)."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
            out.append(f"cell {i} has outputs or an execution count: strip them")
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


def test_all_six_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == list(pipeline.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_stripped_and_has_its_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert problems(nb, path.stem) == []


def test_the_check_catches_outputs_and_a_missing_parameters_cell():
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


def test_notebooks_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "notebooks" / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, nb in gen.build().items():
        committed = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in nb.cells], \
            f"{name}.ipynb differs from make_notebooks.py: run .venv/bin/python notebooks/make_notebooks.py"
