"""The benchmark at toy size: it runs and its JSON has every field. No timing is asserted."""
import json
import math
import types

import pytest
import torch

from bilateral import bench


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


@pytest.mark.parametrize("section", ["throughput", "bilateral", "time_to_accuracy", "memory"])
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


def test_time_to_accuracy(result):
    a = result["time_to_accuracy"]
    o = a["original"]
    assert o["recipe"] == "original" and o["hyper"]["optimizer"] == "adam" and o["hyper"]["lr"] == 1e-4
    assert o["hyper"]["weight_decay"] == 1e-3 and o["hyper"]["schedule"] == "constant"
    assert o["epochs_run"] == o["epoch_budget"] == len(o["val_fine_acc"]) == a["config"]["original_epochs"]
    assert a["target_val_acc"] == o["final_val_acc"]
    assert set(a["fast_budgets"]) == {str(f) for f in a["config"]["fast_budgets"]}
    for F, v in a["fast_budgets"].items():
        assert v["recipe"] == "fast" and v["hyper"]["optimizer"] == "sgd" and v["epochs_run"] == int(F)
        assert isinstance(v["reached"], bool) and v["reached"] == (v["final_val_acc"] >= a["target_val_acc"])
        assert v["reaches_original_best"] == (v["final_val_acc"] >= o["best_val_acc"])
        for key in ("final_val_acc", "best_val_acc", "seconds", "seconds_ratio", "epochs_fraction"):
            assert _num(v[key]), key
    full = a["fast_full_budget"]
    assert full["epoch_budget"] == o["epoch_budget"] and 1 <= full["epochs_run"] <= full["epoch_budget"]
    if full["first_epoch_reaching"] is not None:  # training stops at the first epoch reaching the target
        assert full["first_epoch_reaching"] == full["epochs_run"] and _num(full["seconds_to_reach"])
    for key in ("min_fast_budget_reaching", "quarter_target_met", "seconds_ratio_best"):
        assert key in a


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
    for title in ("1. Hemisphere training", "2. Bilateral heads", "3. Time to accuracy", "4. AMP", "5. Memory"):
        assert title in text
    # main() writes the JSON atomically and returns 0; run() is reused rather than rerun
    monkeypatch.setattr(bench, "run", lambda device, quick, toy=False: dict(result))
    out = tmp_path / "b.json"
    assert bench.main(types.SimpleNamespace(device="cpu", quick=True, out=str(out))) == 0
    saved = json.loads(out.read_text())
    assert saved["table"] == text and set(bench.SECTIONS) <= set(saved)
