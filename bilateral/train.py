"""One training loop for every stage: recipes, evaluation, checkpoints that resume exactly."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import runs
from .seeds import derive_seed

# weight_decay is (recipe group "hemisphere", everything else; see plan.Stage.recipe): the
# original regularised hemispheres harder.
RECIPES = {
    "original": dict(optimizer="adam", lr=1e-4, batch_size=256, epochs=180,
                     weight_decay=(1e-3, 1e-5), label_smoothing=0.0, schedule="constant"),
    # SGD + Nesterov with a short warm-up and linear decay to zero, plus label smoothing:
    # the usual fast CIFAR recipe (see the README's comparison for the measurement).
    "fast": dict(optimizer="sgd", lr=0.1, batch_size=256, epochs=30,
                 weight_decay=(5e-4, 5e-4), label_smoothing=0.1, schedule="warmup_linear"),
}


@dataclass
class Hyper:
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    weight_decay: float
    label_smoothing: float
    schedule: str


def hyper(cfg, stage: str) -> Hyper:
    r = dict(RECIPES[cfg.recipe])
    from .plan import spec  # the stage's recipe group; a late import: plan builds on this module
    # weight_decay_equal: the ablation that gives every stage the hemispheres' value
    group = 0 if spec(stage).recipe == "hemisphere" or cfg.weight_decay_equal else 1
    r["weight_decay"] = r["weight_decay"][group]
    r["epochs"] = cfg.stage_epochs.get(stage, cfg.epochs or r["epochs"])
    for key in ("lr", "batch_size", "weight_decay", "label_smoothing"):
        if getattr(cfg, key) is not None:
            r[key] = getattr(cfg, key)
    return Hyper(**r)


def lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant":
        return 1.0
    warm = max(1, int(0.15 * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def make_optimizer(params, hp: Hyper):
    """params: parameters, or param groups (dicts) whose `lr_scale` multiplies the lr."""
    groups = list(params)
    if not groups or not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad],
               "lr_scale": g.get("lr_scale", 1.0)} for g in groups]
    groups = [dict(g, lr=hp.lr * g["lr_scale"]) for g in groups if g["params"]]
    if hp.optimizer == "adam":
        return torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True,
                           weight_decay=hp.weight_decay)


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, enabled: bool):
    """Mixed precision on CUDA only: bf16 where supported, else fp16 (needs a grad scaler).
    On CPU bf16 autocast ran about 10x slower than float32 here, so CPU stays float32."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


class FeatureLoader:
    """Batches of cached feature vectors, shuffled reproducibly per (seed, epoch)."""

    def __init__(self, x, fine, coarse, batch_size, shuffle=True, seed=0):
        self.x, self.fine, self.coarse = x, fine, coarse
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def n(self):
        return len(self.x)

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "feature loader", self.epoch))
            order = torch.randperm(n, generator=g).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield {"x": self.x[idx], "fine": self.fine[idx], "coarse": self.coarse[idx]}


def loss_fn(out: dict, batch: dict, heads, label_smoothing=0.0):
    return sum(F.cross_entropy(out[h].float(), batch[h], label_smoothing=label_smoothing)
               for h in heads)


@torch.no_grad()
def predict(forward, loader, device, amp=True):
    """Every output of `forward` over a loader (no augmentation expected) and the labels, on
    the CPU: the heads' logits, and features too where `forward` returns them."""
    ctx, _ = autocast(device, amp)
    outs, labels = {}, {"fine": [], "coarse": []}
    for batch in loader:
        with ctx:
            out = forward(batch["x"])
        for k, v in out.items():
            outs.setdefault(k, []).append(v.float().cpu())
        for h in labels:
            labels[h].append(batch[h].cpu())
    return {k: torch.cat(v) for k, v in outs.items()}, {h: torch.cat(v) for h, v in labels.items()}


def accuracy_metrics(logits: dict, labels: dict, fine_to_coarse) -> dict:
    logits = {h: v for h, v in logits.items() if h in ("fine", "coarse")}
    m = {f"{h}_acc": (v.argmax(1) == labels[h]).float().mean().item() for h, v in logits.items()}
    if "fine" in logits:  # a fine prediction implies its superclass
        f2c = torch.as_tensor(fine_to_coarse)
        m["fine_as_coarse_acc"] = (f2c[logits["fine"].argmax(1)] == labels["coarse"]).float().mean().item()
    return m


def evaluate(forward, loader, device, fine_to_coarse, amp=True):
    logits, labels = predict(forward, loader, device, amp)
    return accuracy_metrics(logits, labels, fine_to_coarse)


def score(metrics: dict, heads) -> float:
    """What 'best on validation' means: the mean accuracy of the heads a model was trained on."""
    return sum(metrics[f"{h}_acc"] for h in heads) / len(heads)


def fit(model, forward, train_loader, val_loader, *, heads, hp: Hyper, device, fine_to_coarse,
        ckpt_path, amp=True, progress=True, log=print, on_epoch=None):
    """Train `model` through `forward` (the model itself, or its heads on cached features).

    Checkpoints after every epoch (model, optimiser, RNG, history, best state), so a run
    killed at any moment resumes from its last finished epoch and, on CPU, ends bit-identical
    to an uninterrupted one: the loaders derive their order from (seed, epoch).
    """
    opt = make_optimizer(getattr(model, "param_groups", model.parameters)(), hp)
    ctx, dtype = autocast(device, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start, history, best = 0, [], None
    if ckpt_path.exists():
        ck = runs.load_torch(ckpt_path, map_location=device)
        model.load_state_dict(ck["model"], strict=True)
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"].cpu())
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
        start, history, best = ck["epoch"], ck["history"], ck["best"]
        log(f"resuming from epoch {start} ({ckpt_path})")
    total = hp.epochs * len(train_loader)
    for epoch in range(start, hp.epochs):
        t0 = time.perf_counter()
        model.train()
        train_loader.set_epoch(epoch)
        step, loss_sum, n = epoch * len(train_loader), 0.0, 0
        bar = _bar(train_loader, progress, f"epoch {epoch + 1}/{hp.epochs}")
        for batch in bar:
            for g in opt.param_groups:
                g["lr"] = hp.lr * g["lr_scale"] * lr_factor(hp.schedule, step, total)
            with ctx:
                loss = loss_fn(forward(batch["x"]), batch, heads, hp.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum += loss.item() * len(batch["x"])
            n += len(batch["x"])
        model.eval()
        val = evaluate(forward, val_loader, device, fine_to_coarse, amp)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1),
               **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - t0}
        history.append(row)
        if best is None or score(val, heads) > best["score"]:
            best = {"epoch": epoch + 1, "score": score(val, heads),
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        log(f"epoch {epoch + 1}/{hp.epochs} loss {row['train_loss']:.4f} "
            + " ".join(f"val {k} {v:.2%}" for k, v in val.items()) + f" ({row['seconds']:.1f}s)")
        ck = {"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
              "rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history, "best": best}
        if torch.cuda.is_available():
            ck["cuda_rng"] = torch.cuda.get_rng_state_all()
        runs.save_torch(ckpt_path, ck)
        if on_epoch:
            on_epoch(history)
    return history, best


def _bar(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)
