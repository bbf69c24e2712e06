"""Section 5: peak memory of hemisphere training, in a child process per pipeline."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import stages, train
from .common import Stepper, base_config, cycle, load_splits, loadavg, section_config, sync
from .conventional import conventional_loader, project_loader, to_device


def _proc_status_mb(key):
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so the peak that
    follows is the training's own, not the data loading's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """Runs in a fresh interpreter: load the train split, build the model, train a few steps;
    report the RSS before training, the peak RSS during training and overall (VmHWM of this
    process image: ru_maxrss would carry over the forking parent's peak), and peak CUDA memory."""
    import gc
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    sz = spec["sizes"]
    train_split = load_splits(sz, ("train",))[0]
    cuda = device.type == "cuda"
    cfg = base_config(sz, spec["width"])
    hp = dataclasses.replace(train.hyper(cfg, "hemisphere"), batch_size=sz["batch"])
    torch.manual_seed(0)
    model = stages.hemisphere_model(cfg, "left", train_split.hierarchy).to(device)
    conventional = spec["pipeline"] == "conventional"
    if conventional:
        dl = conventional_loader(train_split, sz["batch"], spec["num_workers"], device)
        batches = to_device(cycle(dl), device)
        step = Stepper(model, model, ("fine",), device, amp=False, hp=hp)
    else:
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        dl = project_loader(train_split, sz["batch"], device, cuda)
        batches = cycle(dl)
        step = Stepper(model, model, ("fine",), device, amp=cuda, hp=hp)
    maxrss = lambda who: resource.getrusage(who).ru_maxrss / 1024  # noqa: E731 - KiB on Linux
    gc.collect()
    before = _proc_status_mb("VmRSS")
    peak_loading = _proc_status_mb("VmHWM")  # this process image only (ru_maxrss counts the parent)
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step(next(batches))
    sync(device)
    peak_train = _proc_status_mb("VmHWM") if reset else None
    if peak_loading is None:  # no /proc: ru_maxrss, which on Linux would include the parent's peak
        peak_overall = maxrss(resource.RUSAGE_SELF)
    else:
        peak_overall = max(peak_loading, peak_train or 0)
    out = {"rss_before_training_mb": before, "peak_rss_training_mb": peak_train,
           "training_delta_mb": None if peak_train is None or before is None else peak_train - before,
           "peak_rss_mb": peak_overall, "peak_rss_loading_mb": peak_loading,
           "seconds": time.perf_counter() - t0, "n_train": len(train_split)}
    if cuda:
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if conventional:
        del batches, dl  # joins the workers, so RUSAGE_CHILDREN covers them
        gc.collect()
        out["peak_rss_largest_worker_mb"] = maxrss(resource.RUSAGE_CHILDREN)
    return out


def bench_memory(device, sz, log) -> dict:
    conf = section_config(device, width=sz["mem_width"], batch=sz["batch"], steps=sz["mem_steps"],
                          dataset=sz["dataset"],
                          how="a child process per pipeline; RSS before training = VmRSS after loading the "
                              "train split and building the model; peak during training = VmHWM after a "
                              "reset (clear_refs); peak overall = the larger of that and VmHWM before it (data loading); "
                              "the worker figure is ru_maxrss of the largest DataLoader worker, mostly pages "
                              "shared with the main process (fork)",
                          num_workers=sz["num_workers"])
    out = {"config": conf}
    pipelines = ["project"] + (["conventional"] if sz["mem_conventional"] else [])
    code = ("import json,sys; from bilateral.bench import memory; "
            "print('BENCH-MEMORY ' + json.dumps(memory.memory_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    procs = {}

    def collect(p):
        stdout, stderr = procs[p].communicate(timeout=1800)
        line = [x for x in stdout.splitlines() if x.startswith("BENCH-MEMORY ")]
        if procs[p].returncode != 0 or not line:
            raise RuntimeError(f"memory child ({p}) failed with code {procs[p].returncode}:\n{stderr[-2000:]}")
        out[p] = json.loads(line[-1].split(" ", 1)[1])
        log(f"  {p}: peak RSS {out[p]['peak_rss_mb']:.0f} MB")

    for p in pipelines:
        spec = {"device": str(device), "sizes": sz, "width": sz["mem_width"], "steps": sz["mem_steps"],
                "pipeline": p, "num_workers": sz["num_workers"], "threads": torch.get_num_threads()}
        procs[p] = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
        if device.type == "cuda":  # one at a time on a GPU; on a CPU side by side, as peak RSS
            collect(p)             # does not depend on how fast a child runs
    for p in pipelines:
        if p not in out:
            collect(p)
    conf["loadavg_end"] = loadavg()
    return out
