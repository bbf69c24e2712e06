"""`python -m bilateral run`: the notebook chain per seed, its failure handling and summary, and
the whole smoke chain through papermill for 2 seeds (the results table: tests/test_results.py)."""
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from papermill.exceptions import PapermillExecutionError

from bilateral import config as C
from bilateral import pipeline, plan, results
from bilateral.execute.jobs import worker_env

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bilateral", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------- chain and summary

class FakeExecutor:
    """Records (notebook, seed, parameters) and fails where told, as papermill would."""

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def __call__(self, source, output, parameters, cwd):
        nb, seed = Path(source).stem, parameters.get("seed")
        self.calls.append((nb, seed, parameters))
        if (nb, seed) in self.fail:
            raise PapermillExecutionError(cell_index=4, exec_count=3, source="train()",
                                          ename="RuntimeError", evalue="out of memory",
                                          traceback=[])


def test_a_failing_notebook_stops_only_its_seed(tmp_path, capsys):
    fake = FakeExecutor(fail={("03_bilateral", 1)})
    code, res = pipeline.run(SMOKE, seeds=[0, 1, 2], overrides=[f"out_dir={tmp_path}"], execute=fake)
    assert code == 1
    status = {(r.notebook, r.seed): r.status for r in res}
    for seed in (0, 2):
        assert all(status[(nb, seed)] == "ok" for nb in pipeline.PER_SEED)
    assert [status[(nb, 1)] for nb in pipeline.PER_SEED] == ["ok", "ok", "failed", "skipped", "skipped", "skipped"]
    assert status[("06_results", None)] == "ok"
    assert ("04_baselines", 1) not in [(n, s) for n, s, _ in fake.calls]
    # parameters: the params file, overrides and seed; 06 gets every seed
    nb, seed, params = fake.calls[0]
    assert (nb, seed) == ("01_data", 0) and Path(params["params_file"]) == SMOKE.resolve()
    # progress bars off in the executed notebooks unless asked
    assert params["overrides"] == {"progress": False, "out_dir": str(tmp_path)}
    assert fake.calls[-1][2]["seeds"] == [0, 1, 2] and "seed" not in fake.calls[-1][2]
    out = capsys.readouterr().out
    summary = (tmp_path / "smoke" / "notebooks" / "summary.txt").read_text()
    for text in (out, summary):
        assert "cell [3] raised RuntimeError: out of memory" in text
        assert str(tmp_path / "smoke" / "notebooks" / "seed=1" / "03_bilateral.ipynb") in text
        assert "15 of 19 notebooks ran; 1 failed, 3 skipped" in text


def test_only_restricts_the_notebooks(tmp_path):
    fake = FakeExecutor()
    code, res = pipeline.run(SMOKE, seeds=[3], only=["02", "03_bilateral.ipynb"],
                             overrides=[f"out_dir={tmp_path}"], execute=fake)
    assert code == 0 and [(r.notebook, r.seed) for r in res] == [("02_hemispheres", 3), ("03_bilateral", 3)]


@pytest.mark.parametrize("only, ok", [
    (["02"], ["02_hemispheres"]), (["06_results.ipynb", "01"], ["01_data", "06_results"]),
    (["notebooks/04_baselines.ipynb"], ["04_baselines"]), (None, list(pipeline.NOTEBOOKS))])
def test_select(only, ok):
    assert pipeline.select(only) == ok


def test_unknown_notebook_lists_the_notebooks():
    with pytest.raises(C.ConfigError, match="unknown notebook '08'.*01_data, 02_hemispheres"):
        pipeline.select(["08"])


@pytest.mark.parametrize("args, words", [
    (["--set", "epochz=1"], ["epochz", "allowed"]),
    (["--set", "conditions=[A, E]"], ["conditions", "'E'"]),
    (["--only", "07_extra"], ["07_extra", "01_data", "06_results"]),
    (["--set", "dataset=cifar100", "--set", "data_dir=/nonexistent/bilateral"],
     ["CIFAR-100 not found", "python -m bilateral download cifar100", "offline"]),
])
def test_bad_params_or_missing_data_stop_before_any_notebook(tmp_path, args, words):
    t0 = time.perf_counter()
    r = cli("run", str(SMOKE), "--set", f"out_dir={tmp_path}", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    for w in words:
        assert w in r.stderr
    assert not (tmp_path / "smoke").exists()  # nothing ran, nothing written
    assert time.perf_counter() - t0 < 60


def test_describe_error_names_the_cell():
    e = PapermillExecutionError(7, 5, "x", "ValueError", "bad value\nsecond line", [])
    assert pipeline.describe_error(e) == "cell [5] raised ValueError: bad value ..."
    assert pipeline.describe_error(FileNotFoundError("no such file")) == "FileNotFoundError: no such file"


def test_each_job_gets_its_share_of_threads_or_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert worker_env(0, 1) == {}
    env = worker_env(1, 2)
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "CUDA_VISIBLE_DEVICES" not in env
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [worker_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [worker_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4", "6", "4"]


def test_the_kernel_is_this_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", "")
    pipeline.pin_kernel(tmp_path)
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec(pipeline.KERNEL)
    assert spec.argv[0] == sys.executable
    # the kernel `make lab` registers, which the notebooks' metadata names, and which they
    # recognise (no "not the project's kernel" line)
    assert (pipeline.KERNEL, spec.display_name) == ("bilateral", "Python (bilateral)")
    assert spec.env == {pipeline.KERNEL_ENV: pipeline.KERNEL}
    monkeypatch.setenv(pipeline.KERNEL_ENV, spec.env[pipeline.KERNEL_ENV])
    assert pipeline.kernel_note() == ""
    monkeypatch.delenv(pipeline.KERNEL_ENV)
    assert "make lab" in pipeline.kernel_note() and sys.executable in pipeline.kernel_note()


def test_a_real_notebook_failure_through_papermill(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("seed = 0\nparams_file = ''\noverrides = {}"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("if seed == 1:\n    raise ValueError(f'boom for seed {seed}')")])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "01_data.ipynb")
    code, res = pipeline.run(SMOKE, seeds=[0, 1], only=["01"], nb_dir=tmp_path,
                             overrides=[f"out_dir={tmp_path / 'out'}"])
    assert code == 1
    assert [(r.seed, r.status) for r in res] == [(0, "ok"), (1, "failed")]
    assert "raised ValueError: boom for seed 1" in res[1].error
    assert Path(res[1].output).exists()  # the executed copy shows the traceback


# ----------------------------------------------------------------- results: tests/test_results.py

# ------------------------------------------------------------------- the whole smoke chain

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    # conditions A and D (D: the pyramid and k-WTA together; tests/test_stages.py trains B and
    # C too), notebook 07 with one callosal kind: every stage, in half the runs of ABCD
    r = cli("run", str(SMOKE), "--seeds", "0", "1", "--jobs", "2", "--set", f"out_dir={out}",
            "--set", "callosum_kinds=[add]", "--set", "conditions=[A,D]", timeout=900)
    print(f"smoke chain, 2 seeds, --jobs 2: {time.perf_counter() - t0:.0f}s")
    return out, r


def test_smoke_chain_runs_every_notebook_for_two_seeds(smoke):
    out, r = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "13 of 13 notebooks ran" in r.stdout
    exp = out / "smoke"
    for seed in (0, 1):
        for nb in pipeline.PER_SEED:
            executed = nbformat.read(exp / "notebooks" / f"seed={seed}" / f"{nb}.ipynb", as_version=4)
            assert not [o for c in executed.cells for o in c.get("outputs", [])
                        if o.get("output_type") == "error"]
        figs = {p.name for p in (exp / "figures" / f"seed={seed}").iterdir()}
        assert {"01_samples.png", "01_hierarchy.png", "02_learning_curves.png",
                "03_bilateral_vs_hemispheres.png", "04_baselines.png", "05_outcomes.png", "05_outcomes_A.csv", "05_outcomes_D.csv",
                "07_callosal_vs_bilateral.png"} <= figs
        assert (exp / "analysis" / "callosal" / "resnet9-D-add-layer1+layer3" / f"seed={seed}"
                / "traffic.png").exists()
    assert (exp / "notebooks" / "06_results.ipynb").exists() and (exp / "results.png").exists()


def test_smoke_results_hold_every_model_condition_and_seed(smoke):
    out, _ = smoke
    exp = out / "smoke"
    df = pd.read_csv(exp / "results.csv", keep_default_na=False)
    cfg = C.load(SMOKE, {"out_dir": str(out), "callosum_kinds": ["add"], "conditions": ["A", "D"]})
    have = set(zip(df.stage, df.model, df.condition, df.seed.astype(str), df.split))
    want = [(r.stage, r.name, r.cfg.condition if "condition" in r.spec.uses else "", str(r.seed), "test")
            for r in plan.plan(cfg, [0, 1])]
    # hemispheres, bilateral, one_hemisphere, unspecialised, pool, ResNet-18/34, ensembles,
    # callosal (2 conditions, 1 from scratch), bilateral_matched
    assert len(want) == 2 * (4 + 2 + 4 + 1 + 5 + 2 + 2 + 2 + 1 + 2)
    assert set(want) <= have, sorted(set(want) - have)
    assert {s for s, *_ in want} == set(tuple(plan.STAGES))            # every stage of the study
    assert {c for *_, c, _, _ in want} >= {"A", "D"}
    # the report command rebuilds the same table from the records
    before = (exp / "results.csv").read_bytes()
    r = cli("report", str(exp))
    assert r.returncode == 0, r.stderr
    assert (exp / "results.csv").read_bytes() == before
    assert "n/a (1 seed)" not in (exp / "results.md").read_text()
    assert "## Callosal models against the bilateral model" in (exp / "results.md").read_text()


def test_publish_copies_the_report_with_its_provenance(smoke, tmp_path):
    out, _ = smoke
    exp, pub = out / "smoke", tmp_path / "results" / "smoke"
    r = cli("report", str(exp), "--publish", str(pub), "--command", "make run PARAMS=params/smoke.yaml")
    assert r.returncode == 0, r.stderr
    for name in ("results.csv", "results.md", "study.json"):  # study.json: the declared family
        assert (pub / name).read_bytes() == (exp / name).read_bytes()
    prov = (pub / "PROVENANCE.md").read_text()
    assert "`make run PARAMS=params/smoke.yaml`" in prov
    assert "seeds 0, 1" in prov and "seed 0: " in prov and "seed 1: " in prov
    assert "torch" in prov and "null" not in prov.split("CPU:")[1].splitlines()[0]
