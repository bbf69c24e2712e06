"""The benchmark at toy size: it runs and its JSON has every field. No timing is asserted."""
import json
import math
import types

import pytest
import torch

from bilateral import bench
from bilateral.bench import report


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a busy machine
    try:
        yield bench.run("cpu", quick=True, toy=True, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


SECTION_CONFIG = ("device", "threads", "cpu_count", "cpu_model", "torch", "torchvision", "loadavg_start",
                  "loadavg_end")


def test_top_level(result):
    for key in ("mode", "environment", "sizes", "started", "wall_s", *bench.SECTIONS):
        assert key in result, key
    assert result["mode"] == "toy"
    json.dumps(result)  # JSON-ready as is


@pytest.mark.parametrize("section", ["throughput", "bilateral", "time_to_accuracy", "memory", "packing", "cpu",
                                     "precision"])
def test_section_config(result, section):
    conf = result[section]["config"]
    for key in SECTION_CONFIG:
        assert key in conf, (section, key)
    assert conf["device"] == "cpu"
    assert _num(result[section]["section_s"])


def test_throughput(result):
    t = result["throughput"]
    for key in ("width", "batch", "warmup_steps", "timed_steps", "rounds", "dataset", "n_train",
                "project", "conventional"):
        assert key in t["config"], key
    assert t["config"]["conventional"]["num_workers"] == 1
    for group in ("train_img_per_s", "loader_img_per_s"):
        assert _num(t[group]["project"]) and _num(t[group]["conventional"])
    assert _num(t["train_ratio"]) and _num(t["loader_ratio"])
    assert all(len(v) == t["config"]["rounds"] for v in t["rounds_img_per_s"].values())


def test_bilateral(result):
    b = result["bilateral"]
    for key in ("epoch_cached_s", "epoch_recompute_s", "cache_once_s", "ratio", "ratio_incl_cache_1_epoch"):
        assert _num(b[key]), key
    assert set(b["ratio_incl_cache_per_recipe"]) == {"fast", "original"}
    assert all(_num(v) for v in b["ratio_incl_cache_per_recipe"].values())
    assert b["config"]["n_train"] > 0 and len(b["epoch_cached_all_s"]) == b["config"]["cached_epochs_timed"]
    t = b["threads_default"]
    assert set(b["epoch_cached_load_s"]) == {f"{m},threads={n}" for m in ("idle", "busy") for n in (t, 1)}
    assert all(_num(v) for v in b["epoch_cached_load_s"].values())


def test_time_to_accuracy(result):
    a = result["time_to_accuracy"]
    o, conf = a["original"], a["config"]
    assert o["recipe"] == "original" and o["hyper"]["optimizer"] == "adam" and o["hyper"]["lr"] == 1e-4
    assert o["hyper"]["weight_decay"] == 1e-3 and o["hyper"]["schedule"] == "constant"
    assert o["epoch_budget"] == conf["original_epochs"] and len(o["val_fine_acc"]) == o["epochs_run"]
    # the original stops at its budget, or once `patience` epochs brought no new best
    acc = o["val_fine_acc"]
    assert o["epochs_run"] == o["epoch_budget"] or o["epochs_run"] - o["best_epoch"] == conf["original_patience"]
    assert o["best_val_acc"] == max(acc) == acc[o["best_epoch"] - 1] and o["final_val_acc"] == acc[-1]
    assert set(a["fast_budgets"]) == {str(f) for f in conf["fast_budgets"]}
    for F, v in a["fast_budgets"].items():
        assert v["recipe"] == "fast" and v["hyper"]["optimizer"] == "sgd" and v["epochs_run"] == int(F)
        for name in ("final", "best"):
            target = o[f"{name}_val_acc"]
            r = v[f"reaches_original_{name}"]
            first = next((i + 1 for i, x in enumerate(v["val_fine_acc"]) if x >= target), None)
            assert r["epoch"] == first
            assert first is None or _num(r["seconds"]) and _num(r["seconds_ratio"])


def test_packing(result):
    p = result["packing"]
    assert [(r["width"], r["members"]) for r in p["rows"]] == [
        (w, n) for w, ns in result["sizes"]["pk_grid"] for n in ns]
    for r in p["rows"]:
        assert _num(r["separate_img_per_s"]) and _num(r["packed_img_per_s"]) and _num(r["ratio"])
    a = p["auto"]  # what pack: auto decides by at the start of a sweep, on the preset's group
    assert a["members"] == result["sizes"]["pka_members"] and a["group"].startswith("unilateral")
    assert a["pack"] is (a["packed_img_per_s"] >= a["margin"] * a["separate_img_per_s"])
    assert a["ratio"] == pytest.approx(a["packed_img_per_s"] / a["separate_img_per_s"])


def test_precision(result):
    from bilateral.bench import precision
    p = result["precision"]
    assert [r["model"] for r in p["rows"]] == [precision.MODELS[i][0] for i in result["sizes"]["pr_models"]]
    for r in p["rows"]:
        assert _num(r["fp32_img_per_s"]) and _num(r["bf16_img_per_s"])
        assert r["ratio"] == pytest.approx(r["bf16_img_per_s"] / r["fp32_img_per_s"])
        assert r["auto"] in ("fp32", "bf16")
    text = report.table(result)
    assert "8. float32 against bf16 autocast" in text and "pack: auto, as a sweep decides" in text


def test_cpu(result):
    c = result["cpu"]
    assert set(c["widths"]) == {str(w) for w in result["sizes"]["cpu_widths"]}
    for r in c["widths"].values():
        assert _num(r["eager"]["img_per_s"]) and _num(r["channels_last"]["ratio_vs_eager"])
        assert len(r["workers"]) == 2 and all(_num(v) for v in r["workers"].values())
        k = r["kwta"]
        assert all(_num(k[n]) for n in ("numpy_select", "kthvalue_select", "keep_freed_off",
                                       "select_ratio", "keep_freed_ratio"))
        assert k["select_ratio"] == pytest.approx(k["numpy_select"] / k["kthvalue_select"])


def test_cuda_skipped_on_cpu(result):
    assert result["cuda"]["skipped"].startswith("skipped: cuda only")


def test_memory(result):
    m = result["memory"]
    for p in ("project", "conventional"):
        for key in ("rss_before_training_mb", "peak_rss_training_mb", "training_delta_mb", "peak_rss_mb",
                    "seconds", "n_train"):
            assert _num(m[p][key]), (p, key)  # peak_rss_training_mb needs Linux's /proc (clear_refs)
        assert m[p]["peak_rss_mb"] >= m[p]["peak_rss_training_mb"] >= m[p]["rss_before_training_mb"]
    assert _num(m["conventional"]["peak_rss_largest_worker_mb"])


def test_table_and_main(result, tmp_path, monkeypatch):
    text = bench.table(result)
    for title in ("1. Hemisphere training", "2. Bilateral heads", "3. Time to accuracy", "4. AMP", "5. Memory",
                  "6. Packed against separate", "7. CPU switches"):
        assert title in text
    # main() writes the JSON atomically and returns 0; run() is reused rather than rerun
    asked = []
    monkeypatch.setattr(report, "run", lambda device, quick, toy=False, only=None: asked.append(only)
                        or dict(result))
    out = tmp_path / "b.json"
    assert bench.main(types.SimpleNamespace(device="cpu", quick=True, out=str(out))) == 0
    saved = json.loads(out.read_text())
    assert saved["table"] == text and set(bench.SECTIONS) <= set(saved)
    # --only names sections; an unknown one stops before any work, naming the allowed ones
    assert bench.main(types.SimpleNamespace(device="cpu", quick=True, out=str(out), only=["cpu"])) == 0
    assert asked == [None, ["cpu"]]
    assert bench.main(types.SimpleNamespace(device="cpu", quick=True, out=str(out), only=["gpu"])) == 2
    assert asked == [None, ["cpu"]]
