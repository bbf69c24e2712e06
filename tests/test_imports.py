"""The package's imports run one way (the README's rules for contributors), read from the source
with `ast`, imports inside functions included:

- no import cycle among the package's modules;
- every module sits on a layer (LAYERS) and imports only from its own layer or lower ones;
- an import inside a function may defer a heavy third-party library, never a package module;
- no private name (leading underscore) is taken from another module of the package;
- the executors import nothing of the package outside execute/.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "bilateral"

# Lowest first. A module may import from its own layer or a lower one, never a higher one.
LAYERS = [
    ["seeds", "config", "stats", "execute.jobs", "execute.worker", "analysis.measures", "cam"],
    ["execute.local", "execute.slurm", "execute", "registry", "runs", "forest",
     "results_md"],
    ["models", "data"],
    ["packed"],
    ["train"],
    ["stages", "callosum", "runner"],          # the stage modules and the runner
    ["plan"],                                  # the one module that names the stage modules
    ["figures", "notebook", "results", "publish", "analysis.plots", "analysis.condition",
     "analysis.sections", "analysis", "callosum_study",
     "bench.common", "bench.conventional", "bench.accuracy", "bench.memory", "bench.precision", "bench.packing",
     "bench.sections", "bench.report", "bench"],
    ["sweep"],
    ["pipeline", "budget"],
    ["__main__", ""],
]


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODS = modules()


def imports(name: str) -> list[tuple[str, list[str], bool]]:
    """(imported package module, names taken from it, inside a function?) of one module."""
    path = MODS[name]
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(n) for n in ast.walk(fn) if n is not fn}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = name.split(".") if name else []
            base = base if is_pkg else base[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            inner = id(node) in nested
            subs = [a.name for a in node.names if f"{target}.{a.name}".strip(".") in MODS]
            rest = [a.name for a in node.names if a.name not in subs]
            for s in subs:
                out.append((f"{target}.{s}".strip("."), [], inner))
            if rest:
                out.append((target, rest, inner))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            mod = getattr(node, "module", None)
            for a in node.names:
                full = mod or a.name
                if full == "bilateral" or full.startswith("bilateral."):
                    out.append((full.removeprefix("bilateral").lstrip("."), [], id(node) in nested))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t in MODS and t != m} for m in MODS}


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    placed = [m for layer in LAYERS for m in layer]
    assert sorted(set(MODS) - set(placed)) == [], "put each new module on a layer of LAYERS"
    assert sorted(set(placed) - set(MODS)) == [], "LAYERS names modules that do not exist"


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_run_down_the_layers():
    layer = {m: i for i, ms in enumerate(LAYERS) for m in ms}
    upward = [f"{m} -> {t}" for m, ts in graph().items() for t in ts if layer[t] > layer[m]]
    assert upward == []


def test_no_package_import_inside_a_function():
    late = [f"{m} imports {t or 'bilateral'}" for m in MODS for t, _, inner in imports(m) if inner]
    assert late == []


def test_no_private_name_taken_across_modules():
    taken = [f"{m}: from {t} import {n}" for m in MODS for t, names, _ in imports(m)
             for n in names if n.startswith("_")]
    for m, path in MODS.items():  # module._name, where module is a package module imported here
        aliases = {(a.asname or a.name) for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.level for a in node.names}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases:
                taken.append(f"{m}: {node.value.id}.{node.attr}")
    assert taken == []


def test_executors_import_nothing_of_their_callers():
    for m in ("execute", "execute.local", "execute.slurm", "execute.jobs", "execute.worker"):
        assert {t for t in graph()[m]} <= {"execute.jobs", "execute.local", "execute.slurm"}, m


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above would fail on today's kind of tangle (mutation check of the checker)."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
