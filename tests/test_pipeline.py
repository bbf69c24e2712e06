"""`python -m bilateral run`: the notebook chain per seed, its failure handling and summary, the
results table and its statistics, and the whole smoke chain through papermill for 2 seeds."""
import dataclasses
import json
import math
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
from bilateral import outcomes, pipeline, results, runs, stages

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
    assert params["overrides"] == {"out_dir": str(tmp_path)}
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
    assert pipeline.seed_env(0, 1) == {}
    env = pipeline.seed_env(1, 2)
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "CUDA_VISIBLE_DEVICES" not in env
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [pipeline.seed_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [pipeline.seed_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4", "6", "4"]


def test_the_kernel_is_this_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", "")
    pipeline.pin_kernel(tmp_path)
    from jupyter_client.kernelspec import KernelSpecManager
    assert KernelSpecManager().get_kernel_spec(pipeline.KERNEL).argv[0] == sys.executable


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


# --------------------------------------------------------------------------------- results

def fake_run(exp, stage, name, seed, test, cfg=None, params=100):
    d = exp / stage / name / f"seed={seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"test": test, "val": test, "wall_s": 1.0,
                                                "epochs": 2, "best_epoch": 2}))
    (d / "config.json").write_text(json.dumps({"trainable_params": params, "resolved": {
        "condition": "A", "backbone": "resnet9", "dataset": "synthetic", **(cfg or {})}}))


def test_report_statistics(tmp_path):
    exp = tmp_path / "exp"
    bil = {0: (0.70, 0.80), 1: (0.72, 0.83), 2: (0.71, 0.81)}
    uni = {0: (0.60, 0.75), 1: (0.65, 0.74), 2: (0.61, 0.79)}
    for s in bil:
        fake_run(exp, "bilateral", "resnet9-A", s, {"fine_acc": bil[s][0], "coarse_acc": bil[s][1]})
        for m in (0, 1):  # two pool members: averaged per seed
            fake_run(exp, "unilateral", f"resnet9-m{m}", s,
                     {"fine_acc": uni[s][0] + 0.01 * m, "coarse_acc": uni[s][1]})
        fake_run(exp, "hemisphere", "resnet9-A-left", s, {"fine_acc": 0.66, "fine_as_coarse_acc": 0.76})
    fake_run(exp, "resnet18", "resnet18", 0, {"fine_acc": 0.5, "coarse_acc": 0.6})
    for s, v in ((0, 0.6), (5, 0.7)):  # Welch: other seeds than the bilateral model's
        fake_run(exp, "resnet34", "resnet34", s, {"fine_acc": v, "coarse_acc": v})
    a = exp / "analysis" / "B" / "seed=1"
    a.mkdir(parents=True)
    (a / "metrics.json").write_text(json.dumps({"probe.left": 0.5, "nested": {"x": 2}}))
    b = exp / "analysis" / "custom"
    b.mkdir(parents=True)
    (b / "metrics.json").write_text(json.dumps({"probe.left": 0.7}))
    (b / "meta.json").write_text(json.dumps({"condition": "C", "seed": 4}))

    rep = results.report(exp)
    df = pd.read_csv(exp / "results.csv")
    assert list(df.columns) == results.COLUMNS
    assert len(df[(df.stage == "unilateral") & (df.split == "test")]) == 3 * 2 * 2
    an = df[df.stage == "analysis"].sort_values("seed")
    assert an[["condition", "seed", "metric", "value"]].values.tolist() == [
        ["B", 1, "probe.left", 0.5], ["B", 1, "nested.x", 2.0], ["C", 4, "probe.left", 0.7]]
    assert set(df[df.stage == "unilateral"].condition.fillna("")) == {""}

    summ = rep["summary"].set_index("model")
    f = [bil[s][0] for s in bil]
    assert summ.loc["bilateral/resnet9-A", "fine_acc_mean"] == pytest.approx(sum(f) / 3)
    assert summ.loc["bilateral/resnet9-A", "fine_acc_sd"] == pytest.approx(pd.Series(f).std(ddof=1))
    assert summ.loc["unilateral/resnet9", "fine_acc_n"] == 3  # seeds, not pool members
    comp = rep["comparison"].set_index("model")
    d = pd.Series([bil[s][0] - (uni[s][0] + 0.005) for s in bil])  # pool mean per seed
    half = 4.302652729749464 * d.std(ddof=1) / math.sqrt(3)       # t(0.975, 2)
    row = comp.loc["unilateral/resnet9"]
    assert row.fine_acc_method == "paired"
    assert (row.fine_acc_diff, row.fine_acc_lo, row.fine_acc_hi) == pytest.approx(
        (d.mean(), d.mean() - half, d.mean() + half))
    assert comp.loc["resnet34", "fine_acc_method"] == "Welch"
    assert math.isnan(comp.loc["resnet18", "fine_acc_lo"])
    assert math.isnan(comp.loc["hemisphere/resnet9-A-left", "coarse_acc_diff"])

    md = (exp / "results.md").read_text()
    assert "sample standard deviation" in md and "95% confidence interval" in md
    assert f"{100 * sum(f) / 3:.1f} ± {100 * pd.Series(f).std(ddof=1):.1f} (3)" in md
    assert "[n/a (1 seed)]" in md and "(Welch)" in md and "(paired)" in md
    assert "Data: **synthetic**" in md


def test_report_cli_and_an_empty_folder(tmp_path):
    r = cli("report", str(tmp_path))
    assert r.returncode == 2 and "no finished runs" in r.stderr


@pytest.mark.parametrize("df, q", [(1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (30, 2.0422725),
                                   (7.5, 2.3330396)])
def test_t_quantile(df, q):
    assert results.t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)


def test_outcome_table_counts_every_image_once():
    t, f = True, False
    preds = {k: torch.tensor(v) for k, v in dict(
        left=[t, t, f, f, t], right=[t, f, t, f, t],
        bilateral_fine=[t, t, f, f, f], bilateral_coarse=[t, f, t, f, t]).items()}
    tab = outcomes.table(preds, margins=True)
    assert tab.loc["L✓R✓", "F✓C✓"] == 1 and tab.loc["L✓R✓", "F✗C✓"] == 1
    assert tab.loc["L✗R✗", "F✗C✗"] == 1 and tab.loc["total", "total"] == 5
    assert list(tab.index[:4]) == list(outcomes.HEMISPHERE_OUTCOMES)
    assert outcomes.scenario_labels(preds)[0][1] == "L✓R✗"


# ------------------------------------------------------------------- the whole smoke chain

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    r = cli("run", str(SMOKE), "--seeds", "0", "1", "--jobs", "2", "--set", f"out_dir={out}",
            timeout=900)
    print(f"smoke chain, 2 seeds, --jobs 2: {time.perf_counter() - t0:.0f}s")
    return out, r


def test_smoke_chain_runs_every_notebook_for_two_seeds(smoke):
    out, r = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "11 of 11 notebooks ran" in r.stdout
    exp = out / "smoke"
    for seed in (0, 1):
        for nb in pipeline.PER_SEED:
            executed = nbformat.read(exp / "notebooks" / f"seed={seed}" / f"{nb}.ipynb", as_version=4)
            assert not [o for c in executed.cells for o in c.get("outputs", [])
                        if o.get("output_type") == "error"]
        figs = {p.name for p in (exp / "figures" / f"seed={seed}").iterdir()}
        assert {"01_samples.png", "01_hierarchy.png", "02_learning_curves.png",
                "03_bilateral_vs_hemispheres.png", "04_baselines.png", "05_outcomes.png", "05_outcomes_A.csv", "05_outcomes_D.csv"} <= figs
    assert (exp / "notebooks" / "06_results.ipynb").exists() and (exp / "results.png").exists()


def test_smoke_results_hold_every_model_condition_and_seed(smoke):
    out, _ = smoke
    exp = out / "smoke"
    df = pd.read_csv(exp / "results.csv", keep_default_na=False)
    cfg = C.load(SMOKE, {"out_dir": str(out)})
    have = set(zip(df.stage, df.model, df.condition, df.seed.astype(str), df.split))
    want = []
    for nb in ("02_hemispheres", "03_bilateral", "04_baselines"):
        for _, stage, c in pipeline.runs_of(cfg, nb):
            c = stages.stage_config(c, stage)
            cond = c.condition if stage in results.CONDITION_STAGES else ""
            want += [(stage, stages.run_name(stage, c), cond, str(s), "test") for s in (0, 1)]
    assert len(want) == 2 * (8 + 4 + 1 + 5 + 2 + 2)
    assert set(want) <= have, sorted(set(want) - have)
    assert {s for s, *_ in want} == set(C.STAGES)            # every stage of the study
    assert {c for *_, c, _, _ in want} >= {"A", "B", "C", "D"}
    # the report command rebuilds the same table from the records
    before = (exp / "results.csv").read_bytes()
    r = cli("report", str(exp))
    assert r.returncode == 0, r.stderr
    assert (exp / "results.csv").read_bytes() == before
    assert "n/a (1 seed)" not in (exp / "results.md").read_text()


def test_outcomes_agree_with_the_recorded_accuracies(smoke):
    out, _ = smoke
    cfg = dataclasses.replace(C.load(SMOKE, {"out_dir": str(out), "device": "cpu"}), condition="B")
    p = outcomes.predictions(cfg, 1)
    assert set(p) == set(outcomes.KEYS) and all(v.dtype == torch.bool for v in p.values())
    rec = lambda stage, c: runs.read_json(runs.run_dir(  # noqa: E731
        stages.stage_config(c, stage), stage, stages.run_name(stage, stages.stage_config(c, stage)), 1)
        / "metrics.json")["test"]
    left = rec("hemisphere", dataclasses.replace(cfg, side="left"))
    right = rec("hemisphere", dataclasses.replace(cfg, side="right"))
    bil = rec("bilateral", cfg)
    assert p["left"].float().mean().item() == pytest.approx(left["fine_acc"], abs=1e-6)
    assert p["right"].float().mean().item() == pytest.approx(right["coarse_acc"], abs=1e-6)
    assert p["bilateral_fine"].float().mean().item() == pytest.approx(bil["fine_acc"], abs=1e-6)
    assert p["bilateral_coarse"].float().mean().item() == pytest.approx(bil["coarse_acc"], abs=1e-6)
    assert outcomes.table(p).values.sum() == len(p["left"])
