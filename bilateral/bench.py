"""`python -m bilateral bench`: the project's fast path against the conventional pipeline.

Every comparison runs in one process, on the same model, batch size and device, back to back
(in alternating rounds where it is cheap), so the ratios stay fair on a machine whose load
changes while it runs. Sections:

1. throughput  hemisphere training images/s: DeviceLoader (whole split on the device, batch
               augmentation, channels_last + AMP on CUDA) against a torchvision Dataset of PIL
               images with RandomCrop/RandomHorizontalFlip/ToTensor/Normalize in a DataLoader
               with worker processes (float32, no channels_last); also each loader alone.
2. bilateral   one epoch of head training on cached frozen features against recomputing the
               frozen hemispheres for every batch, and the one-off cost of the cache.
3. time_to_accuracy  the `fast` recipe against the `original` one (Adam 1e-4, constant).
4. cuda        AMP and channels_last on/off, torch.compile on/off (CUDA only).
5. memory      peak resident memory of hemisphere training at batch 256, in a child process
               (and peak CUDA memory on CUDA).

No timing is asserted anywhere; the figures are written to outputs/bench/bench-<device>.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import config as C
from . import data, models, runs, stages, train

BATCH = 256
CUDA_ONLY = "skipped: cuda only (no CUDA device in this run)"


# ------------------------------------------------------------------------------- sizes
def sizes(device: torch.device, quick: bool, toy: bool) -> dict:
    """Every size the benchmark uses, by mode. CPU sizes keep `--quick` to a few minutes and
    the full run to roughly half an hour on 2 cores; CUDA runs the study's width."""
    cuda = device.type == "cuda"
    if toy:  # the test: seconds, synthetic data, no timing meaning at all
        return dict(dataset="synthetic", synthetic_size=300, batch=32, num_workers=1,
                    tp_width=0.0625, tp_warmup=1, tp_steps=2, tp_rounds=1, tp_train=None,
                    bi_width=0.0625, bi_train=None, bi_eval=None, bi_cached_epochs=2,
                    tta_width=0.0625, tta_train=None, tta_val=None, tta_epochs=1, tta_fast=[1],
                    cuda_steps=2, mem_width=0.0625, mem_steps=1, mem_conventional=True)
    # None: the whole split
    return dict(dataset="fashion_mnist", synthetic_size=None, batch=BATCH,
                num_workers=min(8, os.cpu_count() or 2) if cuda else 2,
                tp_width=1.0 if cuda else 0.25,
                tp_warmup=5 if not quick else 3, tp_steps=(50 if cuda else 30) if not quick else 10,
                tp_rounds=3 if not quick else 2, tp_train=None,
                bi_width=1.0 if cuda else 0.25,
                bi_train=None if cuda or not quick else 500, bi_eval=None if cuda or not quick else 100,
                bi_cached_epochs=3,
                tta_width=(0.5 if cuda else 0.125),
                tta_train=None if cuda else 500 if quick else 2000, tta_val=None if not quick else 200,
                tta_epochs=16, tta_fast=[2, 4],
                cuda_steps=50 if not quick else 20,
                mem_width=1.0, mem_steps=2, mem_conventional=not quick)


# ------------------------------------------------------------------------------ helpers
def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def loadavg():
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def environment(device) -> dict:
    env = {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "cpu_model": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
           "host": platform.node()}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def section_config(device, **kw) -> dict:
    """What every section records about how it was measured."""
    return {**environment(device), **kw, "loadavg_start": loadavg()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subset(split: data.Split, per_class: int | None) -> data.Split:
    """The first `per_class` images of every fine class (all of them when None)."""
    if per_class is None:
        return split
    keep = torch.zeros(len(split), dtype=torch.bool)
    for c in range(split.hierarchy.n_fine):
        keep[(split.fine == c).nonzero().flatten()[:per_class]] = True
    return data.Split(split.images[keep], split.fine[keep], split.coarse[keep], split.hierarchy, split.name)


def load_splits(sz, which=("train", "val", "test")) -> tuple:
    kw = {}
    if sz["dataset"] == "synthetic":
        kw = dict(size=sz["synthetic_size"])
    return tuple(data.load_dataset(sz["dataset"], s, **kw) for s in which)


def base_config(sz, width, **kw) -> C.Config:
    return C.Config(dataset=sz["dataset"], width=width, progress=False, **kw)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def cycle(loader):
    """Batches forever: a DeviceLoader or DataLoader restarted at every epoch end."""
    while True:
        yield from loader


class Stepper:
    """One training step exactly as train.fit takes it (lr set, autocast, zero_grad, scaled
    backward, step, loss.item()), so a throughput figure is the project's real step."""

    def __init__(self, model, forward, heads, device, amp, hp):
        self.model, self.forward, self.heads, self.device, self.hp = model, forward, heads, device, hp
        self.opt = train.make_optimizer(model.parameters(), hp)
        self.ctx, dtype = train.autocast(device, amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        model.train()

    def __call__(self, batch):
        with self.ctx:
            loss = train.loss_fn(self.forward(batch["x"]), batch, self.heads, self.hp.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.item()


def timed(batches, step, warmup, steps, device):
    """Seconds for `steps` steps after `warmup` untimed ones (which also drain any batches a
    DataLoader prefetched while another pipeline ran)."""
    for _ in range(warmup):
        step(next(batches))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------- the conventional pipeline
try:
    from torchvision.datasets import VisionDataset as _VisionDataset
except ImportError:  # pragma: no cover - torchvision is a dependency
    _VisionDataset = torch.utils.data.Dataset


class PILImages(_VisionDataset):
    """The original's input pipeline: like torchvision's CIFAR100, an HWC uint8 array that is
    turned into a PIL image per item and passed through the transforms. Built from the split in
    memory, so nothing is downloaded."""

    def __init__(self, split: data.Split, transform=None):
        super().__init__(root=None, transform=transform)
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.fine, self.coarse = split.fine.tolist(), split.coarse.tolist()

    def __len__(self):
        return len(self.fine)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.fine[i], self.coarse[i]


def conventional_transform(name):
    from torchvision import transforms as T
    mean, std = data.STATS[name]
    return T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(mean, std)])


def conventional_loader(split, batch, num_workers, device):
    ds = PILImages(split, conventional_transform(split.name))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       pin_memory=device.type == "cuda")


def to_device(batches, device):
    for x, fine, coarse in batches:
        nb = device.type == "cuda"
        yield {"x": x.to(device, non_blocking=nb), "fine": fine.to(device, non_blocking=nb),
               "coarse": coarse.to(device, non_blocking=nb)}


def project_loader(split, batch, device, channels_last, seed=0):
    return data.DeviceLoader(split, batch, device=device, shuffle=True, augment=True, drop_last=True,
                             seed=seed, channels_last=channels_last)


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
    model = models.Bilateral(models.freeze(stages.hemisphere_backbone(cfg, "left")),
                             models.freeze(stages.hemisphere_backbone(cfg, "right")),
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
    fwd_c, ftrain, _, _ = stages.bilateral_forward(model, train_dl, val_dl, test_dl, True, hp, 0, device, True)
    sync(device)
    cache_s = time.perf_counter() - t0
    epoch(fwd_c, ftrain)  # warm-up
    cached = epoch(fwd_c, ftrain, sz["bi_cached_epochs"])
    log(f"  cache {cache_s:.1f}s, cached epoch {statistics.median(cached):.3f}s")
    # the original: the frozen hemispheres run again for every batch
    fwd_r, *_ = stages.bilateral_forward(model, train_dl, val_dl, test_dl, False, hp, 0, device, True)
    recompute = epoch(fwd_r, train_dl, 1)[0]
    log(f"  recompute epoch {recompute:.1f}s")
    cached_s = statistics.median(cached)
    conf["loadavg_end"] = loadavg()
    runs_e = {"fast": train.RECIPES["fast"]["epochs"], "original": train.RECIPES["original"]["epochs"]}
    return {"config": conf, "epoch_cached_s": cached_s, "epoch_cached_all_s": cached,
            "epoch_recompute_s": recompute, "cache_once_s": cache_s,
            "ratio": ratio(recompute, cached_s),
            "ratio_incl_cache_1_epoch": ratio(recompute, cache_s + cached_s),
            "ratio_incl_cache_per_recipe": {k: ratio(e * recompute, cache_s + e * cached_s)
                                            for k, e in runs_e.items()},
            "recipe_head_epochs": runs_e}


# ------------------------------------------------------------------- 3. time to accuracy
class _Reached(Exception):
    pass


def _fit_hemisphere(device, sz, splits, recipe, epochs, stop_at=None, log=print) -> dict:
    """Train a left hemisphere (fine labels) with train.fit; stop early once val fine accuracy
    reaches `stop_at` (the fit is interrupted after that epoch's record)."""
    tr, va = subset(splits[0], sz["tta_train"]), subset(splits[1], sz["tta_val"])
    hier, cuda = tr.hierarchy, device.type == "cuda"
    cfg = base_config(sz, sz["tta_width"], recipe=recipe, epochs=epochs)
    hp = dataclasses.replace(train.hyper(cfg, "hemisphere"), batch_size=sz["batch"])
    torch.manual_seed(0)
    model = stages.hemisphere_model(cfg, "left", hier).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    train_dl = data.DeviceLoader(tr, hp.batch_size, device=device, shuffle=True, augment=True, seed=0,
                                 channels_last=cuda)
    val_dl = data.DeviceLoader(va, 512, device=device, shuffle=False, augment=False, channels_last=cuda)
    seen = []

    def on_epoch(history):
        seen[:] = history
        if stop_at is not None and history[-1]["val_fine_acc"] >= stop_at:
            raise _Reached

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train.fit(model, model, train_dl, val_dl, heads=("fine",), hp=hp, device=device,
                      fine_to_coarse=hier.fine_to_coarse, ckpt_path=Path(tmp) / "checkpoint.pt",
                      amp=True, progress=False, log=lambda m: log(f"  [{recipe} {epochs} ep] {m}"),
                      on_epoch=on_epoch)
        except _Reached:
            pass
    acc = [h["val_fine_acc"] for h in seen]
    return {"recipe": recipe, "epoch_budget": epochs, "epochs_run": len(seen), "hyper": dataclasses.asdict(hp),
            "val_fine_acc": acc, "final_val_acc": acc[-1], "best_val_acc": max(acc),
            "epoch_seconds": [h["seconds"] for h in seen], "seconds": sum(h["seconds"] for h in seen),
            "wall_s": time.perf_counter() - t0, "n_train": len(tr), "n_val": len(va)}


def _first_reaching(run, target):
    for i, a in enumerate(run["val_fine_acc"]):
        if a >= target:
            return i + 1, sum(run["epoch_seconds"][:i + 1])
    return None, None


def bench_time_to_accuracy(device, sz, splits, log) -> dict:
    E = sz["tta_epochs"]
    conf = section_config(device, width=sz["tta_width"], batch=sz["batch"], dataset=splits[0].name,
                          train_per_class=sz["tta_train"], val_per_class=sz["tta_val"], original_epochs=E,
                          fast_budgets=sz["tta_fast"], amp=device.type == "cuda",
                          channels_last=device.type == "cuda", model="resnet9 hemisphere (left, fine head)",
                          metric="val fine accuracy after each epoch; seconds = train + val eval per epoch")
    orig = _fit_hemisphere(device, sz, splits, "original", E, log=log)
    target = orig["final_val_acc"]
    log(f"  original after {E} epochs: val fine {target:.2%} in {orig['seconds']:.0f}s")
    budgets = {}
    for F in sz["tta_fast"]:
        r = _fit_hemisphere(device, sz, splits, "fast", F, log=log)
        r["reached"] = r["final_val_acc"] >= target
        r["reaches_original_best"] = r["final_val_acc"] >= orig["best_val_acc"]  # the stricter check
        r["epochs_fraction"] = F / E
        r["seconds_ratio"] = ratio(orig["seconds"], r["seconds"])
        budgets[str(F)] = r
        log(f"  fast with {F} epochs: val fine {r['final_val_acc']:.2%} in {r['seconds']:.0f}s "
            f"({'reaches' if r['reached'] else 'misses'} the original's final)")
    full = _fit_hemisphere(device, sz, splits, "fast", E, stop_at=target, log=log)
    first, secs = _first_reaching(full, target)
    quarter = [b for b in budgets.values() if b["epoch_budget"] <= E / 4]
    reached = [b for b in budgets.values() if b["reached"]]
    conf["loadavg_end"] = loadavg()
    return {"config": conf, "target_val_acc": target, "original": orig, "fast_budgets": budgets,
            "fast_full_budget": {**full, "first_epoch_reaching": first, "seconds_to_reach": secs},
            "min_fast_budget_reaching": min((b["epoch_budget"] for b in reached), default=None),
            "quarter_target_met": any(b["reached"] for b in quarter) if quarter else None,
            "seconds_ratio_best": max((b["seconds_ratio"] for b in reached), default=None)}


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


# ------------------------------------------------------------------- 5. memory
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


def _memory_child(spec: dict) -> dict:
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
    code = ("import json,sys; from bilateral import bench; "
            "print('BENCH-MEMORY ' + json.dumps(bench._memory_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
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


# ------------------------------------------------------------------------------ the run
SECTIONS = ("throughput", "bilateral", "time_to_accuracy", "cuda", "memory")


def run(device="cpu", quick=True, toy=False, log=print) -> dict:
    """Every section; returns the JSON-ready dict (no file written)."""
    device = train.pick_device(device) if isinstance(device, str) else device
    sz = sizes(device, quick, toy)
    if sz["dataset"] == "fashion_mnist":
        try:
            splits = load_splits(sz)
        except FileNotFoundError as e:
            log(f"Fashion-MNIST not available ({e}); falling back to synthetic data")
            sz.update(dataset="synthetic", synthetic_size=4000)
            splits = load_splits(sz)
    else:
        splits = load_splits(sz)
    mode = "toy" if toy else "quick" if quick else "full"
    t0 = time.perf_counter()
    result = {"mode": mode, "environment": environment(device), "sizes": sz,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": runs.git_revision()}
    for name, fn in (("throughput", bench_throughput), ("bilateral", bench_bilateral),
                     ("time_to_accuracy", bench_time_to_accuracy), ("cuda", bench_cuda)):
        log(f"[{name}]")
        s0 = time.perf_counter()
        result[name] = fn(device, sz, splits, log)
        result[name]["section_s"] = time.perf_counter() - s0
    log("[memory]")
    s0 = time.perf_counter()
    result["memory"] = bench_memory(device, sz, log)
    result["memory"]["section_s"] = time.perf_counter() - s0
    result["wall_s"] = time.perf_counter() - t0
    return result


def _f(v, fmt="{:,.0f}"):
    return "n/a" if v is None else fmt.format(v)


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def table(r: dict) -> str:
    """Markdown tables of the figures and ratios."""
    env = r["environment"]
    lines = [f"bench ({r['mode']}) on {env['device']}"
             + (f" ({env.get('gpu')})" if env.get("gpu") else "")
             + f", {env['cpu_model']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
               f"{env['threads']} threads, {r['wall_s']:.0f}s"]
    la = [r[k]["config"].get(w) for k, w in (("throughput", "loadavg_start"), ("memory", "loadavg_end"))]
    if all(la):  # 1-minute load average: how busy the machine was besides this run
        lines[0] += f", load average {la[0][0]:.1f} at the start, {la[1][0]:.1f} at the end"
    lines.append("")
    t = r["throughput"]
    c = t["config"]
    lines += [f"1. Hemisphere training, ResNet-9 width {c['width']}, batch {c['batch']}, "
              f"{c['timed_steps']} steps x {c['rounds']} rounds (median), {c['dataset']}, "
              f"conventional with {c['conventional']['num_workers']} workers",
              "", "| images/s | project (DeviceLoader) | conventional (DataLoader + PIL) | ratio |",
              "|---|---:|---:|---:|",
              f"| training | {_f(t['train_img_per_s']['project'])} | {_f(t['train_img_per_s']['conventional'])} "
              f"| {_x(t['train_ratio'])} |",
              f"| loader alone | {_f(t['loader_img_per_s']['project'])} | "
              f"{_f(t['loader_img_per_s']['conventional'])} | {_x(t['loader_ratio'])} |", ""]
    b = r["bilateral"]
    c = b["config"]
    pr = b["ratio_incl_cache_per_recipe"]
    e = b["recipe_head_epochs"]
    lines += [f"2. Bilateral heads, two frozen ResNet-9 width {c['width']}, batch {c['batch']}, "
              f"{c['n_train']} train images", "",
              "| | seconds | ratio |", "|---|---:|---:|",
              f"| epoch on cached features | {_f(b['epoch_cached_s'], '{:.3f}')} | |",
              f"| epoch recomputing the hemispheres | {_f(b['epoch_recompute_s'], '{:.2f}')} | "
              f"{_x(b['ratio'])} |",
              f"| one-off caching (train {c['n_train']} + val {c['n_val']} + test {c['n_test']}) | "
              f"{_f(b['cache_once_s'], '{:.2f}')} | |",
              f"| 1 epoch incl. caching | | {_x(b['ratio_incl_cache_1_epoch'])} |",
              f"| {e['fast']} epochs (fast recipe) incl. caching | | {_x(pr['fast'])} |",
              f"| {e['original']} epochs (original recipe) incl. caching | | {_x(pr['original'])} |", ""]
    a = r["time_to_accuracy"]
    c = a["config"]
    o = a["original"]
    lines += [f"3. Time to accuracy, left hemisphere (fine), ResNet-9 width {c['width']}, {c['dataset']} "
              f"({o['n_train']} train / {o['n_val']} val), target = original's final val accuracy "
              f"{a['target_val_acc']:.2%}", "",
              "| run | epochs | final val fine | seconds | >= original's final | >= original's best "
              "| time ratio |", "|---|---:|---:|---:|---|---|---:|",
              f"| original (Adam 1e-4 constant) | {o['epochs_run']} | {o['final_val_acc']:.2%} "
              f"(best {o['best_val_acc']:.2%}) | {o['seconds']:.0f} | - | - | 1.00x |"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for F, v in a["fast_budgets"].items():
        lines.append(f"| fast, budget {F} epochs | {v['epochs_run']} | {v['final_val_acc']:.2%} | "
                     f"{v['seconds']:.0f} | {yes(v['reached'])} | {yes(v['final_val_acc'] >= o['best_val_acc'])} "
                     f"| {_x(v['seconds_ratio'])} |")
    full = a["fast_full_budget"]
    first = full["first_epoch_reaching"]
    lines += [f"| fast, budget {full['epoch_budget']} epochs, stopped at target | {full['epochs_run']} | "
              f"{full['final_val_acc']:.2%} | {full['seconds']:.0f} | "
              + (f"epoch {first} ({full['seconds_to_reach']:.0f}s)" if first else "no") + " | | "
              f"{_x(ratio(o['seconds'], full['seconds_to_reach']))} |",
              "", "Seconds are wall time (training + validation) under the load the machine had at the "
              "time; when the load changed (loadavg in the JSON) compare epochs, which cost the same in "
              "both recipes.", ""]
    cu = r["cuda"]
    if "skipped" in cu:
        lines += [f"4. AMP / channels_last / torch.compile: {cu['skipped']}", ""]
    else:
        lines += ["4. CUDA switches (DeviceLoader)", "", "| setting | images/s | vs fp32 |", "|---|---:|---:|"]
        lines += [f"| {k} | {_f(v['img_per_s'])} | {_x(v['ratio_vs_fp32'])} |"
                  for k, v in cu["amp_channels_last"].items()]
        comp = cu["compile"]
        if "error" in comp:
            lines.append(f"| torch.compile | failed: {comp['error']} | |")
        else:
            lines.append(f"| torch.compile (amp + channels_last), compile {comp['compile_s']:.0f}s | "
                         f"{_f(comp['img_per_s'])} | {_x(comp['ratio'])} vs eager |")
        lines.append("")
    m = r["memory"]
    c = m["config"]
    lines += [f"5. Memory, hemisphere training, ResNet-9 width {c['width']}, batch {c['batch']}, "
              f"{c['steps']} steps, {c['dataset']}", "",
              "| pipeline | RSS before training (MB) | peak RSS in training (MB) | training's own (MB) "
              "| peak RSS overall (MB) | peak CUDA allocated (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for p in ("project", "conventional"):
        if p in m:
            v = m[p]
            extra = (f" (a worker: {v['peak_rss_largest_worker_mb']:,.0f}, mostly shared)"
                     if "peak_rss_largest_worker_mb" in v else "")
            lines.append(f"| {p} | {_f(v['rss_before_training_mb'])} | {_f(v['peak_rss_training_mb'])} | "
                         f"{_f(v['training_delta_mb'])} | {_f(v['peak_rss_mb'])}{extra} | "
                         f"{_f(v.get('cuda_max_allocated_mb'))} |")
    return "\n".join(lines)


def main(args) -> int:
    device = train.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    threads = getattr(args, "threads", None)  # a --threads flag, where the CLI offers one
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out) if args.out else Path("outputs") / "bench" / f"bench-{device.type}.json"
    r = run(device, quick=args.quick, toy=False)
    text = table(r)
    r["table"] = text
    runs.write_json(out, r)
    print()
    print(text)
    print(f"\nwritten: {out}")
    return 0
