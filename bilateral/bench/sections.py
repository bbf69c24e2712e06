"""Sections 1, 2 and 4: training throughput against the conventional pipeline, the bilateral
heads on cached features, and the CUDA switches."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch

from .. import data, models, runner, stages, train
from .common import (CUDA_ONLY, Stepper, base_config, busy_machine, cycle, loadavg, ratio,
                     section_config, subset, sync, threads, timed)
from .conventional import conventional_loader, project_loader, to_device


# ------------------------------------------------------------------- 1. training throughput
def bench_throughput(device, sz, splits, log) -> dict:
    train_split = subset(splits[0], sz["tp_train"])
    hier, cuda = train_split.hierarchy, device.type == "cuda"
    cfg = base_config(sz, sz["tp_width"])
    hp = dataclasses.replace(train.hyper(cfg, "hemisphere"), batch_size=sz["batch"])
    warm, steps, bs = sz["tp_warmup"], sz["tp_steps"], sz["batch"]
    conf = section_config(device, width=sz["tp_width"], batch=bs, warmup_steps=warm, timed_steps=steps,
                          rounds=sz["tp_rounds"], dataset=train_split.name, n_train=len(train_split),
                          model="resnet9 hemisphere (left, fine head)", recipe=cfg.recipe,
                          project=dict(loader="DeviceLoader", amp=cuda, channels_last=cuda),
                          conventional=dict(loader="DataLoader(PIL Dataset)", num_workers=sz["num_workers"],
                                            amp=False, channels_last=False, pin_memory=cuda,
                                            transforms="RandomCrop(32, 4, reflect), RandomHorizontalFlip, "
                                                       "ToTensor, Normalize"))

    def model():
        torch.manual_seed(0)
        m = stages.hemisphere_model(cfg, "left", hier).to(device)
        return m.to(memory_format=torch.channels_last) if cuda else m

    proj_model, conv_model = model(), model()
    proj_step = Stepper(proj_model, proj_model, ("fine",), device, amp=cuda, hp=hp)
    conv_step = Stepper(conv_model, conv_model, ("fine",), device, amp=False, hp=hp)
    proj_batches = cycle(project_loader(train_split, bs, device, cuda))
    conv_dl = conventional_loader(train_split, bs, sz["num_workers"], device)
    conv_batches = to_device(cycle(conv_dl), device)
    noop = lambda b: b["x"].sum() if cuda else None  # noqa: E731 - touch the batch on the GPU

    rounds = {k: [] for k in ("train_project", "train_conventional", "loader_project", "loader_conventional")}
    for r in range(sz["tp_rounds"]):
        # alternate which pipeline goes first, so a load change penalises neither
        order = [("project", proj_batches, proj_step), ("conventional", conv_batches, conv_step)]
        for name, batches, step in (order if r % 2 == 0 else order[::-1]):
            rounds[f"train_{name}"].append(bs * steps / timed(batches, step, warm, steps, device))
            rounds[f"loader_{name}"].append(bs * steps / timed(batches, noop, warm, steps, device))
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rounds.items()))
    del conv_batches, conv_dl  # stops the workers
    med = {k: statistics.median(v) for k, v in rounds.items()}
    conf["loadavg_end"] = loadavg()
    return {"config": conf, "rounds_img_per_s": rounds,
            "train_img_per_s": {"project": med["train_project"], "conventional": med["train_conventional"]},
            "loader_img_per_s": {"project": med["loader_project"], "conventional": med["loader_conventional"]},
            "train_ratio": ratio(med["train_project"], med["train_conventional"]),
            "loader_ratio": ratio(med["loader_project"], med["loader_conventional"])}


# ------------------------------------------------------------------- 2. bilateral stage
def bench_bilateral(device, sz, splits, log) -> dict:
    tr, va, te = subset(splits[0], sz["bi_train"]), subset(splits[1], sz["bi_eval"]), subset(splits[2], sz["bi_eval"])
    hier, cuda = tr.hierarchy, device.type == "cuda"
    cfg = base_config(sz, sz["bi_width"])
    hp = dataclasses.replace(train.hyper(cfg, "bilateral"), batch_size=sz["batch"])
    torch.manual_seed(0)  # untrained hemispheres: the cost of a forward does not depend on the weights
    model = models.Bilateral(models.freeze(models.hemisphere_backbone(cfg, "left")),
                             models.freeze(models.hemisphere_backbone(cfg, "right")),
                             hier.n_fine, hier.n_coarse, dropout=cfg.dropout).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    mk = lambda s, shuffle, bsz: data.DeviceLoader(s, bsz, device=device, shuffle=shuffle,  # noqa: E731
                                                   augment=False, channels_last=cuda)
    train_dl, val_dl, test_dl = mk(tr, True, hp.batch_size), mk(va, False, 512), mk(te, False, 512)
    heads = ("fine", "coarse")
    conf = section_config(device, width=sz["bi_width"], batch=hp.batch_size, dataset=tr.name,
                          n_train=len(tr), n_val=len(va), n_test=len(te), amp=cuda, channels_last=cuda,
                          cached_epochs_timed=sz["bi_cached_epochs"], recompute_epochs_timed=1,
                          hemispheres="two frozen resnet9 (eval mode)", heads="fine + coarse, dropout 0.6")

    def epoch(forward, loader, epochs=1):
        step = Stepper(model, forward, heads, device, amp=True, hp=hp)
        times = []
        for _ in range(epochs):
            sync(device)
            t0 = time.perf_counter()
            for batch in loader:
                step(batch)
            sync(device)
            times.append(time.perf_counter() - t0)
        return times

    # the project: features of all three splits once, then heads on the cache
    sync(device)
    t0 = time.perf_counter()
    fwd_c, ftrain, _, _ = runner.bilateral_forward(model, train_dl, val_dl, test_dl, True, hp, 0, device, True)
    sync(device)
    cache_s = time.perf_counter() - t0
    epoch(fwd_c, ftrain)  # warm-up
    cached = epoch(fwd_c, ftrain, sz["bi_cached_epochs"])
    log(f"  cache {cache_s:.1f}s, cached epoch {statistics.median(cached):.3f}s")
    robust = {}  # the cached epoch's tiny matmuls with all threads or one, idle or beside a busy loop
    for busy in (False, True):
        with busy_machine() if busy else contextlib.nullcontext():
            for t in (torch.get_num_threads(), 1):
                with threads(t):
                    robust[f"{'busy' if busy else 'idle'},threads={t}"] = statistics.median(
                        epoch(fwd_c, ftrain, sz["bi_cached_epochs"]))
    log("  cached epoch: " + ", ".join(f"{k} {v:.3f}s" for k, v in robust.items()))
    # the original: the frozen hemispheres run again for every batch
    fwd_r, *_ = runner.bilateral_forward(model, train_dl, val_dl, test_dl, False, hp, 0, device, True)
    recompute = epoch(fwd_r, train_dl, 1)[0]
    log(f"  recompute epoch {recompute:.1f}s")
    cached_s = statistics.median(cached)
    conf["loadavg_end"] = loadavg()
    runs_e = {"fast": train.RECIPES["fast"]["epochs"], "original": train.RECIPES["original"]["epochs"]}
    return {"config": conf, "epoch_cached_s": cached_s, "epoch_cached_all_s": cached,
            "epoch_cached_load_s": robust, "threads_default": torch.get_num_threads(),
            "epoch_recompute_s": recompute, "cache_once_s": cache_s,
            "ratio": ratio(recompute, cached_s),
            "ratio_incl_cache_1_epoch": ratio(recompute, cache_s + cached_s),
            "ratio_incl_cache_per_recipe": {k: ratio(e * recompute, cache_s + e * cached_s)
                                            for k, e in runs_e.items()},
            "recipe_head_epochs": runs_e}


# ------------------------------------------------------------------- 4. CUDA switches
def bench_cuda(device, sz, splits, log) -> dict:
    if device.type != "cuda":
        return {"skipped": CUDA_ONLY}
    train_split = subset(splits[0], sz["tp_train"])
    hier = train_split.hierarchy
    cfg = base_config(sz, sz["tp_width"])
    hp = dataclasses.replace(train.hyper(cfg, "hemisphere"), batch_size=sz["batch"])
    steps, warm = sz["cuda_steps"], sz["tp_warmup"]
    conf = section_config(device, width=sz["tp_width"], batch=sz["batch"], warmup_steps=warm,
                          timed_steps=steps, loader="DeviceLoader", dataset=train_split.name,
                          amp_dtype=str(train.autocast(device, True)[1]))

    def run(amp, cl, compile_=False):
        torch.manual_seed(0)
        m = stages.hemisphere_model(cfg, "left", hier).to(device)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        fwd = torch.compile(m) if compile_ else m
        step = Stepper(m, fwd, ("fine",), device, amp=amp, hp=hp)
        batches = cycle(project_loader(train_split, sz["batch"], device, cl))
        first = timed(batches, step, 0, 1, device)  # the first step: compiles when compile_
        dt = timed(batches, step, warm, steps, device)
        return {"img_per_s": sz["batch"] * steps / dt, "first_step_s": first}

    grid = {}
    for amp in (False, True):
        for cl in (False, True):
            grid[f"amp={int(amp)},channels_last={int(cl)}"] = run(amp, cl)
            log(f"  amp {amp} channels_last {cl}: {grid[f'amp={int(amp)},channels_last={int(cl)}']['img_per_s']:.0f} img/s")
    base = grid["amp=0,channels_last=0"]["img_per_s"]
    for v in grid.values():
        v["ratio_vs_fp32"] = ratio(v["img_per_s"], base)
    try:
        comp = run(True, True, compile_=True)
        eager = grid["amp=1,channels_last=1"]
        compiled = {"img_per_s": comp["img_per_s"], "eager_img_per_s": eager["img_per_s"],
                    "ratio": ratio(comp["img_per_s"], eager["img_per_s"]),
                    "compile_s": comp["first_step_s"] - eager["first_step_s"],
                    "first_step_s": comp["first_step_s"]}
    except Exception as e:  # noqa: BLE001 - a missing compiler must not lose the other figures
        compiled = {"error": f"{type(e).__name__}: {e}"}
    conf["loadavg_end"] = loadavg()
    return {"config": conf, "amp_channels_last": grid, "compile": compiled}
