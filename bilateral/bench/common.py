"""What every benchmark section shares: sizes, the environment, timing, the training step."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import config as C
from .. import data, train
from ..runs import cpu_model

BATCH = 256
CUDA_ONLY = "skipped: cuda only (no CUDA device in this run)"


def sizes(device: torch.device, quick: bool, toy: bool) -> dict:
    """Every size the benchmark uses, by mode. CPU sizes keep `--quick` to several minutes; the
    full run takes a few hours on 2 cores (the converged original recipe and width 1 packing
    dominate); CUDA runs the study's width."""
    cuda = device.type == "cuda"
    if toy:  # the test: seconds, synthetic data, no timing meaning at all
        return dict(dataset="synthetic", synthetic_size=300, batch=32, num_workers=1,
                    tp_width=0.0625, tp_warmup=1, tp_steps=2, tp_rounds=1, tp_train=None,
                    bi_width=0.0625, bi_train=None, bi_eval=None, bi_cached_epochs=2,
                    tta_width=0.0625, tta_train=None, tta_val=None, tta_original_epochs=2,
                    tta_patience=1, tta_fast=[1],
                    cuda_steps=2, mem_width=0.0625, mem_steps=1, mem_conventional=True,
                    pk_grid=[(0.0625, [2])], pk_warmup=1, pk_steps=1, pk_train=None,
                    cpu_widths=[0.0625], cpu_warmup=1, cpu_steps=1, cpu_train=None, cpu_compile=False,
                    cpu_members=2, side_by_side=True, pr_models=[0, 3], pr_batch=8, pr_steps=1,
                    pka_width=0.03125, pka_batch=8, pka_members=2)
    # None: the whole split
    return dict(dataset="fashion_mnist", synthetic_size=None, batch=BATCH,
                num_workers=min(8, os.cpu_count() or 2) if cuda else 2,
                tp_width=1.0 if cuda else 0.25,
                tp_warmup=5 if not quick else 3, tp_steps=(50 if cuda else 30) if not quick else 10,
                tp_rounds=3 if not quick else 2, tp_train=None,
                bi_width=1.0 if cuda else 0.25,
                bi_train=None if cuda or not quick else 500, bi_eval=None if cuda or not quick else 100,
                bi_cached_epochs=3,
                # time to accuracy at width 1/8 on 5,000 images (500 per class), the original run
                # to convergence: its full 180 epochs, or until 30 epochs bring no new best
                tta_width=0.125, tta_train=200 if quick else 500, tta_val=100 if quick else None,
                tta_original_epochs=40 if quick else 180, tta_patience=10 if quick else 30,
                tta_fast=[4, 8] if quick else [8, 16, 30],
                cuda_steps=50 if not quick else 20,
                mem_width=1.0, mem_steps=2, mem_conventional=not quick,
                # packed against separate: (width, member counts)
                pk_grid=[(0.125, [2, 5]), (0.25, [2])] if quick else
                [(0.125, [2, 5, 10]), (0.25, [2, 5, 10]), (1.0, [2, 5, 10])],
                pk_warmup=1 if quick or not cuda else 3, pk_steps=2 if quick else 10 if cuda else 3,
                pk_train=None,
                # CPU switches at the presets' widths (smoke 1/32, Fashion-MNIST 1/8)
                cpu_widths=[0.125] if quick else [0.03125, 0.0625, 0.125], cpu_warmup=1,
                cpu_steps=3 if quick else 8, cpu_train=300, cpu_compile=not quick, cpu_members=5,
                # fp32 against bf16 (bench.precision.MODELS by index): on a CPU at batch 64 (bf16
                # without bf16 instructions is emulated, up to 10x slower), on CUDA at 256
                pr_models=list(range(7)), pr_batch=256 if cuda else 64, pr_steps=2 if quick else 4,
                # pack: auto's measurement on the preset's group: 10 unilateral ResNet-9, width 1/8
                pka_width=0.125, pka_batch=BATCH, pka_members=10)


# ------------------------------------------------------------------------------ helpers
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
    """train.train_step, the step every run takes, with its optimiser and scaler held."""

    def __init__(self, model, forward, heads, device, amp, hp):
        self.forward, self.heads, self.hp = forward, heads, hp
        self.opt = train.make_optimizer(model.parameters(), hp)
        self.ctx, _ = train.autocast(device, amp)
        self.scaler = train.grad_scaler(device, amp)
        model.train()

    def __call__(self, batch):
        return train.train_step(self.forward, batch, self.opt, self.scaler, self.ctx, heads=self.heads,
                                label_smoothing=self.hp.label_smoothing, lr=self.hp.lr)


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




@contextlib.contextmanager
def busy_machine(processes=None):
    """One busy-loop process per core while the block runs: a machine shared with other jobs."""
    n = processes or os.cpu_count() or 1
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let them reach the scheduler
        yield n
    finally:
        for p in procs:
            p.kill()
            p.wait()


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
