"""One training loop for every stage: recipes, evaluation, checkpoints that resume exactly."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import packed, runs
from .registry import spec
from .seeds import derive_seed

# weight_decay is (recipe group "hemisphere", everything else; see registry.Stage.recipe): the
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
    warmup_epochs: float = 1.0   # wsd: linear warm-up over this many epochs (whatever the budget)
    decay_frac: float = 0.2      # wsd: the last ceil(decay_frac x epochs) epochs decay to zero


def hyper(cfg, stage: str) -> Hyper:
    r = dict(RECIPES[cfg.recipe])
    if cfg.schedule is not None:
        r["schedule"] = cfg.schedule
    r.update(warmup_epochs=cfg.warmup_epochs, decay_frac=cfg.decay_frac)
    # weight_decay_equal: the ablation that gives every stage the hemispheres' value
    group = 0 if spec(stage).recipe == "hemisphere" or cfg.weight_decay_equal else 1
    r["weight_decay"] = r["weight_decay"][group]
    r["epochs"] = cfg.stage_epochs.get(stage, cfg.epochs or r["epochs"])
    for key in ("lr", "batch_size", "weight_decay", "label_smoothing"):
        if getattr(cfg, key) is not None:
            r[key] = getattr(cfg, key)
    return Hyper(**r)


def decay_start(epochs: int, decay_frac: float) -> int:
    """wsd: the epoch its decay starts (the constant phase ends there). Whole epochs, so a
    shorter budget branches from a longer run's checkpoint at exactly that epoch."""
    return epochs - max(1, math.ceil(decay_frac * epochs))


def lr_factor(schedule: str, step: int, total: int, per_epoch: int = 1, warmup_epochs: float = 1.0,
              decay_frac: float = 0.2) -> float:
    """The lr multiplier at `step` of `total` (`per_epoch` steps an epoch).

    warmup_linear: linear warm-up over the first 15% of the steps, then linear decay to zero.
    wsd (warmup-stable-decay): linear warm-up over `warmup_epochs`, constant, then linear decay
    to zero over the last ceil(decay_frac x epochs) epochs. Until its decay starts, a wsd run's
    lr does not depend on its budget: a run of budget b is a longer run's state at epoch
    decay_start(b) plus a short decay branch (runner: branch_from)."""
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        warm = max(1, round(warmup_epochs * per_epoch))
        d0 = decay_start(total // per_epoch, decay_frac) * per_epoch
        if step < min(warm, d0):
            return (step + 1) / warm
        return 1.0 if step < d0 else max(0.0, (total - step) / max(1, total - d0))
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


# Narrower than this, NHWC convolutions cost more on a CPU than they save (benchmark section 7,
# one thread: width 1/32 0.76x, 1/16 1.07x, 1/8 1.39x).
CPU_CHANNELS_LAST_MIN_WIDTH = 1 / 16


def use_channels_last(cfg, device) -> bool:
    """channels_last where it pays: CUDA at every width, the CPU from width 1/16 up."""
    kind = torch.device(device).type
    if not cfg.channels_last:
        return False
    return kind == "cuda" or (kind == "cpu" and cfg.width >= CPU_CHANNELS_LAST_MIN_WIDTH)


_KEEPS_FREED_MEMORY = False


def keep_freed_memory():
    """Make glibc keep freed memory in the process rather than hand it back to the OS.

    A CPU training step allocates and frees activations of tens of MB; glibc serves each from
    fresh mmap'd pages, and faulting them in cost up to a quarter of a step (a pyramid k-WTA
    step 1.23 -> 0.93 s with this). The process then holds its high-water mark, as CUDA's caching
    allocator does. Process-wide and idempotent; a no-op where libc is not glibc."""
    global _KEEPS_FREED_MEMORY
    if _KEEPS_FREED_MEMORY or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # no allocation served by mmap: all come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap's free top is never trimmed
    _KEEPS_FREED_MEMORY = True


def autocast(device, precision=True):
    """(context, dtype) of a precision: "fp32" (or False) none; "bf16" bfloat16 autocast on the
    CPU or CUDA; "fp16" float16 autocast on CUDA (needs a grad scaler). True or "auto" is the
    AMP of old, without measuring: bf16 on CUDA where supported, else fp16, and float32 off
    CUDA (train and runner pass the run's resolved precision, see resolve_precision).
    Autocast computes convolutions and matmuls in the low precision; the weights, their
    gradients and optimiser state, BatchNorm's statistics, k-WTA's thresholds and the loss
    (loss_fn casts the logits) stay float32."""
    device = torch.device(device)
    if precision is True or precision == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext(), None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in (False, None, "fp32"):
        return contextlib.nullcontext(), None
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision: unknown value {precision!r}; allowed: fp32, bf16, fp16, auto")
    if device.type not in ("cuda", "cpu") or precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision {precision} is not available on {device.type}; use fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), dtype


# ---------------------------------------------------------------------------- precision: auto

# bf16 must beat float32 by this much in the measurement at start for `auto` to choose it on a
# CPU: below it the difference is within a short measurement's noise on a shared machine, and
# float32 keeps the records comparable with those already written.
BF16_MARGIN = 1.10
PRECISION_STEPS = 2      # timed steps per precision (after one untimed warm-up step)
PRECISION_BATCH = 64     # at most; images/s of a step at a smaller batch than the run's
PRECISION_DECISIONS: dict = {}  # {architecture key: (precision, fp32 img/s, bf16 img/s)}
_SAID_NO_BF16_UNITS = []


def cpu_bf16_units() -> bool:
    """Whether this CPU has bfloat16 instructions (x86 avx512_bf16 or amx_bf16, Arm bf16).
    Without them PyTorch emulates bf16 by conversions: a ResNet-9 step at width 1/8 ran 11x
    slower in bf16 than in float32 on the 2-core AMD EPYC VM without them (926 -> 82 img/s),
    so `auto` does not measure there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device, key=None, make=None, log=print,
                      timer=time.perf_counter) -> str:
    """The precision a run trains in: "fp32", "bf16" or (auto on a CUDA GPU without bf16) "fp16".

    fp32 and bf16 are themselves. auto: CUDA keeps the AMP path (bf16 where supported, else
    fp16 with a grad scaler); another device than the CPU float32; on a CPU float32 where it
    has no bf16 instructions (cpu_bf16_units), else what measure_precision finds for the
    run's architecture (`key`, `make`: see there), once per process and key. Without a key
    (a run that trains no backbone of its own: heads on cached features, ensembles) float32."""
    kind = torch.device(device).type
    if precision in ("fp32", "bf16"):
        if precision == "bf16" and kind not in ("cpu", "cuda"):
            raise ValueError(f"precision bf16 is not available on {kind}; use fp32 or auto")
        return precision
    if precision != "auto":
        raise ValueError(f"precision: unknown value {precision!r}; allowed: auto, fp32, bf16")
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind != "cpu" or key is None:
        return "fp32"
    if key in PRECISION_DECISIONS:
        return PRECISION_DECISIONS[key][0]
    if not cpu_bf16_units():
        if not _SAID_NO_BF16_UNITS:
            log("precision auto: this CPU has no bf16 instructions (avx512_bf16, amx_bf16): "
                "float32, not measured")
            _SAID_NO_BF16_UNITS.append(True)
        return "fp32"
    return measure_precision(key, make, log=log, timer=timer)


def race(ways: dict, rounds: int, timer=time.perf_counter, sync=None) -> dict:
    """{name: the best seconds of one call of ways[name]}: every way called once untimed, then
    `rounds` rounds of one timed call each, interleaved, so a change of load (or a process's
    first slow steps) favours none. sync: called before each reading (CUDA's queue)."""
    sync = sync or (lambda: None)
    for step in ways.values():
        step()
    best = {name: math.inf for name in ways}
    for _ in range(rounds):
        for name, step in ways.items():
            sync()
            t0 = timer()
            step()
            sync()
            best[name] = min(best[name], max(timer() - t0, 1e-9))
    return best


def measure_precision(key, make, steps: int | None = None, log=print, timer=time.perf_counter) -> str:
    """bf16 or fp32, whichever trains `make()`'s model faster on the CPU, bf16 only by
    BF16_MARGIN; both figures printed, the decision cached under `key` for this process.

    make() -> (model, batch, heads): a fresh model of the run's architecture (in the memory
    format its training uses) and one batch. A copy each way; race(): one untimed training
    step (train_step: forward, backward, SGD) each, then `steps` (PRECISION_STEPS) timed
    ones each, interleaved, the best of each counted."""
    ways, n = {}, None
    for precision in ("fp32", "bf16"):
        model, batch, heads = make()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ctx, _ = autocast("cpu", precision)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        ways[precision] = functools.partial(train_step, model, batch, opt, scaler, ctx, heads=heads,
                                            label_smoothing=0.0, lr=0.01)
        n = len(batch["x"])
    best = race(ways, PRECISION_STEPS if steps is None else steps, timer)
    rates = {p: n / s for p, s in best.items()}
    choice = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"
    PRECISION_DECISIONS[key] = (choice, rates["fp32"], rates["bf16"])
    log(f"precision auto, {key}: float32 {rates['fp32']:,.0f} img/s, bf16 {rates['bf16']:,.0f} "
        f"img/s ({rates['bf16'] / rates['fp32']:.2f}x; bf16 needs {BF16_MARGIN:.2f}x): {choice}")
    return choice


class FeatureLoader:
    """Batches of cached feature vectors, shuffled reproducibly per (seed, epoch).

    fit trains on it with one CPU thread: its steps are tiny matmuls, which two threads spun
    for at 50x the cost when other processes shared the cores (see the benchmark's section 2)."""

    threads = 1

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


def member_losses(out: dict, batch: dict, heads, label_smoothing=0.0):
    """One loss per member: (1,) for a model, (N,) for a packed one (labels (B, N)); each
    member's loss is exactly its own run's."""
    if batch[heads[0]].dim() == 1:
        return loss_fn(out, batch, heads, label_smoothing).reshape(1)
    return torch.stack([loss_fn({h: out[h][:, i] for h in heads}, {h: batch[h][:, i] for h in heads},
                                heads, label_smoothing) for i in range(batch[heads[0]].shape[1])])


def train_step(forward, batch, opt, scaler, ctx, *, heads, label_smoothing, lr):
    """The one training step of every run, packed or not, and of the benchmark. Returns the
    members' losses, detached (no device sync here)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    with ctx:
        losses = member_losses(forward(batch["x"]), batch, heads, label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses.sum()).backward()  # summed: each member's gradient is its own
    scaler.step(opt)
    scaler.update()
    return losses.detach()


def grad_scaler(device, precision):
    _, dtype = autocast(device, precision)
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


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


def evaluate_members(forward, loader, device, fine_to_coarse, amp=True) -> list[dict]:
    """Metrics per member: one for a model, N for a packed one (logits (B, N, classes))."""
    logits, labels = predict(forward, loader, device, amp)
    if labels["fine"].dim() == 1:
        return [accuracy_metrics(logits, labels, fine_to_coarse)]
    return [accuracy_metrics({h: v[:, i] for h, v in logits.items()},
                             {h: v[:, i] for h, v in labels.items()}, fine_to_coarse)
            for i in range(labels["fine"].shape[1])]


def score(metrics: dict, heads) -> float:
    """What 'best on validation' means: the mean accuracy of the heads a model was trained on."""
    return sum(metrics[f"{h}_acc"] for h in heads) / len(heads)


def fit(model, forward, train_loader, val_loader, *, heads, hp: Hyper, device, fine_to_coarse,
        ckpt_path, amp=True, progress=True, log=print, on_epoch=None, keep_at=()):
    """Train `model` through `forward` (the model itself, or its heads on cached features).

    Checkpoints after every epoch (model, optimiser, RNG, history, best state), so a run
    killed at any moment resumes from its last finished epoch and, on CPU, ends bit-identical
    to an uninterrupted one: the loaders derive their order from (seed, epoch).

    A packed model (packed.PackedModel) trains its N members at once: ckpt_path is then a list
    of N paths, each holding member i's checkpoint in the ordinary form (so either way of
    training resumes the other's), and the history and best state come back as lists.
    keep_at: epochs whose checkpoints are also kept, as checkpoint-e<k>.pt beside ckpt_path
    (where shorter wsd budgets branch from). amp: the run's precision (autocast), validation
    included.
    """
    members = getattr(model, "n_members", None)
    paths = list(ckpt_path) if members else [ckpt_path]
    opt = make_optimizer(getattr(model, "param_groups", model.parameters)(), hp)
    ctx, _ = autocast(device, amp)
    scaler = grad_scaler(device, amp)
    start, histories, bests = _resume(model, opt, scaler, paths, device, log)
    if start in keep_at:  # killed between the checkpoint of `start` and its kept copy
        for p in paths:
            if not kept_checkpoint(p, start).is_file():
                keep_copy(p, start)
    with cpu_threads(getattr(train_loader, "threads", None)):
        for epoch in range(start, hp.epochs):
            t0 = time.perf_counter()
            model.train()
            loss_sum, n = _train_epoch(forward, train_loader, opt, scaler, ctx, epoch, len(paths),
                                       heads=heads, hp=hp, device=device, progress=progress)
            model.eval()
            vals = evaluate_members(forward, val_loader, device, fine_to_coarse, amp)
            seconds = (time.perf_counter() - t0) / len(vals)  # a packed member's share of the epoch
            for i, val in enumerate(vals):
                row = {"epoch": epoch + 1, "train_loss": loss_sum[i].item() / max(n, 1),
                       **{f"val_{k}": v for k, v in val.items()}, "seconds": seconds}
                histories[i].append(row)
                if bests[i] is None or score(val, heads) > bests[i]["score"]:
                    bests[i] = {"epoch": epoch + 1, "score": score(val, heads),
                                "state": _member_state(model, i)}
                log(f"{f'member {i} ' if members else ''}epoch {epoch + 1}/{hp.epochs} loss "
                    f"{row['train_loss']:.4f} " + " ".join(f"val {k} {v:.2%}" for k, v in val.items())
                    + f" ({seconds:.1f}s)")
            _save(model, opt, scaler, paths, epoch + 1, histories, bests)
            if epoch + 1 in keep_at:
                for p in paths:
                    keep_copy(p, epoch + 1)
            if on_epoch:
                on_epoch(histories if members else histories[0])
    return (histories, bests) if members else (histories[0], bests[0])


def _train_epoch(forward, loader, opt, scaler, ctx, epoch, n_members, *, heads, hp, device, progress):
    """One epoch of train_step; returns the members' summed losses (times batch size) and the
    number of images, without a device sync per step."""
    loader.set_epoch(epoch)
    step, total = epoch * len(loader), hp.epochs * len(loader)
    loss_sum, n = torch.zeros(n_members, dtype=torch.float64, device=device), 0
    for batch in _bar(loader, progress, f"epoch {epoch + 1}/{hp.epochs}"):
        losses = train_step(forward, batch, opt, scaler, ctx, heads=heads,
                            label_smoothing=hp.label_smoothing,
                            lr=hp.lr * lr_factor(hp.schedule, step, total, len(loader),
                                                 hp.warmup_epochs, hp.decay_frac))
        step += 1
        loss_sum += losses.double() * len(batch["fine"])
        n += len(batch["fine"])
    return loss_sum, n


@contextlib.contextmanager
def cpu_threads(n):
    """torch's CPU threads set to n inside the block (None: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def kept_checkpoint(ckpt_path, epoch: int) -> Path:
    """Where fit keeps the checkpoint of `epoch` (keep_at)."""
    return Path(ckpt_path).with_name(f"checkpoint-e{epoch}.pt")


def keep_copy(ckpt_path, epoch: int):
    """Keep the checkpoint just saved (that of `epoch`) as kept_checkpoint(ckpt_path, epoch)."""
    runs.atomic_write_bytes(kept_checkpoint(ckpt_path, epoch), Path(ckpt_path).read_bytes())


def _member_state(model, i):
    if getattr(model, "n_members", None):
        return packed.unpack(model, i)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save(model, opt, scaler, paths, epoch, histories, bests):
    cuda = torch.cuda.is_available()
    for i, path in enumerate(paths):
        ck = {"scaler": scaler.state_dict(), "epoch": epoch, "history": histories[i], "best": bests[i]}
        if getattr(model, "n_members", None):
            g = model.generators[i]  # the member's own stream stands where the global RNG would
            ck.update(model=packed.unpack(model, i), opt=packed.split_optimizer(model, opt.state_dict(), i),
                      rng=g.get_state() if g.device.type == "cpu" else torch.get_rng_state())
            if g.device.type == "cuda":
                ck["cuda_rng"] = [g.get_state()]
        else:
            ck.update(model=model.state_dict(), opt=opt.state_dict(), rng=torch.get_rng_state())
            if cuda:
                ck["cuda_rng"] = torch.cuda.get_rng_state_all()
        runs.save_torch(path, ck)


def _resume(model, opt, scaler, paths, device, log):
    """(start epoch, histories, bests) from the members' checkpoints, or a fresh start."""
    found = [p.exists() for p in paths]
    if not any(found):
        return 0, [[] for _ in paths], [None for _ in paths]
    cks = [runs.load_torch(p, map_location=device) if f else None for p, f in zip(paths, found)]
    epochs = {ck["epoch"] if ck else 0 for ck in cks}
    if len(epochs) > 1:
        raise ValueError(f"packed members' checkpoints are at different epochs {sorted(epochs)}: "
                         f"train them separately, or in groups of equal epochs")
    packed_model = getattr(model, "n_members", None)
    if packed_model:
        model.net.load_state_dict(packed.join_states(model, [ck["model"] for ck in cks]), strict=True)
        opt.load_state_dict(packed.join_optimizer(model, [ck["opt"] for ck in cks]))
        for g, ck in zip(model.generators, cks):
            g.set_state((ck["rng"] if g.device.type == "cpu" else ck["cuda_rng"][0]).cpu())
    else:
        (ck,) = cks
        model.load_state_dict(ck["model"], strict=True)
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"].cpu())
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
    scaler.load_state_dict(cks[0]["scaler"])
    log(f"resuming from epoch {cks[0]['epoch']} ({', '.join(map(str, paths))})")
    return cks[0]["epoch"], [ck["history"] for ck in cks], [ck["best"] for ck in cks]


def _bar(it, enabled, desc):
    """An epoch's batches with a progress bar where someone watches: in a Jupyter kernel tqdm's
    widget, which closes at the epoch's end and leaves nothing on stderr (no bar without
    ipywidgets, rather than tqdm's warning and a text bar); in a terminal a text bar on stderr;
    none in a log (a worker's log file, a captured stream) or with progress off (pipeline turns
    it off for papermill's runs unless asked)."""
    if not enabled:
        return it
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and hasattr(shell, "kernel"):
        from tqdm import notebook
        return it if notebook.IProgress is None else notebook.tqdm(it, desc=desc, leave=False)
    if not getattr(sys.stderr, "isatty", lambda: False)():
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False)
