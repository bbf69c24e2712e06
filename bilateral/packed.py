"""Many runs of one architecture trained as one model, each member in its own channels.

At the study's small widths a step is mostly overhead: tens of tiny convolutions, each too small
to fill the machine. Packing N runs turns N small steps into one larger one (packed ensembles,
Laurent et al. 2023): convolutions get groups=N over N times the channels, BatchNorm and k-WTA
act per channel (so per member), the heads become N independent linear maps. Member i's
channels of the input hold its own batch, from its own loader, so every member keeps its own
initialisation, data order and augmentation; the losses are summed, so each member's gradient
is its own, and SGD/Adam/weight decay act per element, so nothing couples the members. Dropout
draws from one generator per member that continues the member's own RNG stream, so on CPU a
packed member computes what its separate run computes, up to float rounding.

Tensors are batch-first: a packed batch is (B, N, 3, H, W), packed logits are (B, N, classes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import models

# Layers that act per element or per channel, so they are correct on packed channels as is.
PASSTHROUGH = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
PACKABLE_BACKBONES = ("resnet9", "resnet9_pyramid", "resnet18", "resnet34", "vgg11")


class PackedLinear(nn.Module):
    """N independent linear maps on (B, N, in). Parameter names match nn.Linear's."""

    def __init__(self, linears):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))  # (N, out, in)
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]))      # (N, out)

    def forward(self, x):
        x = x.view(x.shape[0], len(self.weight), -1)
        return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1),
                             self.weight.transpose(1, 2)).transpose(0, 1)


class PackedDropout(nn.Module):
    """Dropout with member i's mask drawn from member i's generator, exactly as F.dropout draws
    it on CPU (bernoulli_ on a tensor shaped like the member's input, then scaled)."""

    def __init__(self, p, generators):
        super().__init__()
        self.p, self.generators = p, generators  # a list shared by every dropout of the model

    def forward(self, x):
        n = len(self.generators)
        x = x.view(x.shape[0], n, -1)
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        noise = torch.stack([torch.empty_like(x[:, i]).bernoulli_(1 - self.p, generator=g)
                             for i, g in enumerate(self.generators)], 1)
        return x * noise.div_(1 - self.p)


class PackedModel(nn.Module):
    """N members of one model. forward((B, N, 3, H, W)) -> {head: (B, N, classes)}."""

    def __init__(self, net, n, generators):
        super().__init__()
        self.net, self.n_members, self.generators = net, n, generators
        self.channels_last = False

    def forward(self, x, return_features=False):
        x = x.flatten(1, 2)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x, return_features)
        if return_features:
            out["features"] = out["features"].view(x.shape[0], self.n_members, -1)
        return out

    def get_extra_state(self):  # the members' RNG streams travel with the state dict
        return {"rng": [g.get_state() for g in self.generators]}

    def set_extra_state(self, state):
        for g, s in zip(self.generators, state["rng"]):
            g.set_state(s.cpu())


# ------------------------------------------------------------------------------ pack/unpack

def pack(members, generators=None) -> PackedModel:
    """One packed model from N models of one architecture (weights copied, members untouched).
    generators: each member's dropout RNG; by default fresh CPU generators seeded 0..N-1."""
    n = len(members)
    ref = members[0].state_dict()
    for i, m in enumerate(members[1:], 1):
        other = m.state_dict()
        if list(other) != list(ref) or any(other[k].shape != ref[k].shape for k in ref):
            raise ValueError(f"member {i} differs in architecture from member 0: cannot pack")
    if generators is None:
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
    net = copy.deepcopy(members[0])
    named = [dict(m.named_modules()) for m in members]
    for name, module in list(net.named_modules()):
        group = [d[name] for d in named]
        new = _packed_layer(module, group, generators)
        if new is not None:
            _set_module(net, name, new)
        elif not isinstance(module, PASSTHROUGH) and _own_tensors(module):
            raise ValueError(f"{name}: {type(module).__name__} has no packed form")
        elif not _own_tensors(module) and not list(module.children()) \
                and not isinstance(module, PASSTHROUGH):
            raise ValueError(f"{name}: {type(module).__name__} is not known to act per channel")
    return PackedModel(net, n, generators)


def _own_tensors(module):
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


def _packed_layer(module, group, generators):
    n = len(group)
    if isinstance(module, nn.Conv2d):
        m = module
        new = nn.Conv2d(n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding,
                        m.dilation, n * m.groups, m.bias is not None, m.padding_mode,
                        device=m.weight.device, dtype=m.weight.dtype)
        return _fill(new, group, dim0=True)
    if isinstance(module, nn.BatchNorm2d):
        m = module
        like = next(iter(_own_tensors(m)))
        new = nn.BatchNorm2d(n * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                             device=like.device, dtype=like.dtype)
        _fill(new, group, dim0=True)
        if m.track_running_stats:
            counts = {int(g.num_batches_tracked) for g in group}
            if len(counts) > 1:
                raise ValueError(f"members' BatchNorm counts differ ({sorted(counts)}): cannot pack")
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        return new
    if isinstance(module, models.KWTA):  # stage 1 per (sample, channel), stage 2 per channel
        m = module                         # across the batch: per member as is, given its thresholds
        new = models.KWTA(m.k, m.k_batch, m.eval_rule, channels=n * len(m.running_threshold),
                          momentum=m.momentum).to(m.running_threshold)  # its device and dtype
        with torch.no_grad():
            new.running_threshold.copy_(torch.cat([g.running_threshold for g in group]))
        return new
    if isinstance(module, nn.Linear):
        return PackedLinear(group)
    if isinstance(module, nn.Dropout):
        return PackedDropout(module.p, generators)
    return None


@torch.no_grad()
def _fill(new, group, dim0):
    for key, t in new.named_parameters(recurse=False):
        t.copy_(torch.cat([getattr(g, key).detach() for g in group]))
    for key in ("running_mean", "running_var"):
        if getattr(new, key, None) is not None:
            getattr(new, key).copy_(torch.cat([getattr(g, key) for g in group]))
    return new


def _set_module(root, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _splitter(packed: PackedModel):
    """For each key of the member state dict: how to take member i's part of a packed tensor."""
    rules = {}
    for name, module in packed.net.named_modules():
        prefix = f"{name}." if name else ""
        for key, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if isinstance(module, PackedLinear):
                rules[prefix + key] = "index"
            elif key == "num_batches_tracked":
                rules[prefix + key] = "shared"
            else:
                rules[prefix + key] = "chunk"
    return rules


def _part(t, rule, i, n):
    if rule == "index":
        return t[i]
    if rule == "shared":
        return t
    return t.chunk(n)[i]


def unpack(packed: PackedModel, i: int) -> dict:
    """Member i's state dict, loadable strictly into the model it was packed from."""
    rules, n = _splitter(packed), packed.n_members
    return {k: _part(v, rules[k], i, n).detach().clone() for k, v in packed.net.state_dict().items()}


def param_rules(packed: PackedModel) -> list[str]:
    rules = _splitter(packed)
    return [rules[k] for k, _ in packed.net.named_parameters()]


# ------------------------------------------------------------------------------ checkpoints

def split_optimizer(packed: PackedModel, opt_state: dict, i: int) -> dict:
    """Member i's part of a packed optimiser state: it loads into the member's own optimiser
    (same parameter order), so a packed run can be resumed unpacked, and the other way round."""
    rules, n = param_rules(packed), packed.n_members
    state = {}
    for idx, s in opt_state["state"].items():
        shape = lambda t: torch.is_tensor(t) and t.dim() > 0  # noqa: E731 (step counters are shared)
        state[idx] = {k: _part(v, rules[idx], i, n).clone() if shape(v) else v for k, v in s.items()}
    return {"state": state, "param_groups": copy.deepcopy(opt_state["param_groups"])}


def join_optimizer(packed: PackedModel, states: list[dict]) -> dict:
    rules = param_rules(packed)
    joined = {}
    for idx in states[0]["state"]:
        s0 = states[0]["state"][idx]
        joined[idx] = {k: (torch.stack if rules[idx] == "index" else torch.cat)(
            [s["state"][idx][k] for s in states]) if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in s0.items()}
    return {"state": joined, "param_groups": copy.deepcopy(states[0]["param_groups"])}


def join_states(packed: PackedModel, states: list[dict]) -> dict:
    """A packed state dict from N member state dicts (the inverse of unpack)."""
    rules = _splitter(packed)
    out = {}
    for k, r in rules.items():
        parts = [s[k] for s in states]
        out[k] = parts[0] if r == "shared" else (torch.stack if r == "index" else torch.cat)(parts)
    return out


class PackedLoader:
    """Member i's batch from loaders[i], stacked batch-first: x (B, N, 3, H, W), labels (B, N).
    One loader given N times (the shared validation split) is read once and broadcast."""

    def __init__(self, loaders):
        self.loaders = list(loaders)
        if len({len(dl) for dl in self.loaders}) > 1 or len({dl.n for dl in self.loaders}) > 1:
            raise ValueError("packed members need loaders of equal size")

    @property
    def n(self):
        return self.loaders[0].n

    def __len__(self):
        return len(self.loaders[0])

    def set_epoch(self, epoch):
        for dl in self.loaders:
            dl.set_epoch(epoch)

    def __iter__(self):
        n = len(self.loaders)
        if all(dl is self.loaders[0] for dl in self.loaders):
            for b in self.loaders[0]:
                yield {k: v.unsqueeze(1).expand(v.shape[0], n, *v.shape[1:]) for k, v in b.items()}
            return
        for bs in zip(*self.loaders):
            yield {k: torch.stack([b[k] for b in bs], 1) for k in bs[0]}


# ----------------------------------------------------------------------------- run records
# A plan's runs (plan.Run: stage, cfg reduced to the stage's fields, seed, name, path).

PACKABLE_STAGES = ("hemisphere", "unilateral", "resnet18", "resnet34")
MAX_MEMBERS = 10  # a larger group is split (memory grows with N; see the benchmark)


def _architecture(run) -> str:
    from . import stages
    if run.stage == "hemisphere":
        return stages.hemisphere_arch(run.cfg, run.cfg.side)[0]
    return run.cfg.backbone if run.stage == "unilateral" else run.stage


def packs(cfg) -> bool:
    """pack: on, off, or auto: on where the runs train on CUDA. On a CPU, PyTorch's grouped
    convolutions ran slower than the N plain ones (bench section 6: 0.3-0.8x at widths 1/8 and
    1/4 on 2 cores), so auto leaves CPU runs apart."""
    from . import train
    return cfg.pack == "on" or cfg.pack == "auto" and train.pick_device(cfg.device).type == "cuda"


def pack_key(run):
    """Runs with equal keys can share one packed model: one stage and config (so one
    architecture, data and recipe), differing only in seed or pool member. None: never packed."""
    from . import config as C
    if not packs(run.cfg) or run.stage not in PACKABLE_STAGES \
            or _architecture(run) not in PACKABLE_BACKBONES:
        return None
    ident = C.identity(run.cfg)
    ident.pop("member")
    return run.stage, repr(sorted(ident.items()))


def packable_groups(runs_, max_members=MAX_MEMBERS) -> list[list]:
    """The runs split into groups to train together, in the runs' order (a group stands where
    its first run stood): the same run across seeds and the pool members of a seed share a
    group; runs that cannot be packed stay alone. Give it the runs still to train."""
    groups, by_key = [], {}
    for r in runs_:
        key = pack_key(r)
        if key is None:
            groups.append([r])
            continue
        g = by_key.get(key)
        if g is None or len(g) >= max_members:
            g = by_key[key] = []
            groups.append(g)
        g.append(r)
    return groups


def train_runs(group, force=False, log=print) -> list[dict]:
    """Train the runs of one packable group as one packed model, each run claimed (runs.claim)
    for the whole training, and write each run's record through the very functions that
    stages.run_stage uses; returns each run's metrics, in order. `force`: one bool, or one per
    run. Finished runs are read; a single run left, or runs whose checkpoints stand at
    different epochs, are trained (or resumed) one by one."""
    import contextlib

    from . import config as C
    from . import data, runs, stages
    keys = {pack_key(r) for r in group}
    if len(keys) != 1 or None in keys:
        raise ValueError("train_runs needs runs of one packable group (see packed.packable_groups)")
    forces = list(force) if isinstance(force, (list, tuple)) else [force] * len(group)
    data.check_splits(stages.load_splits(group[0].cfg))  # as run_stage: before any folder is claimed
    C.check_device(group[0].cfg.device)
    with contextlib.ExitStack() as held:
        for r in group:
            held.enter_context(runs.claim(r.path))
        results = {j: stages.check_claimed(r, f, log) for j, (r, f) in enumerate(zip(group, forces))}
        todo = [j for j, m in results.items() if m is None]
        if len(todo) == 1 or len({_ckpt_epoch(group[j].path / "checkpoint.pt") for j in todo}) > 1:
            for j in todo:
                results[j] = stages._run_claimed(group[j], False, log)
        elif todo:
            results.update(zip(todo, _train_packed([group[j] for j in todo], log)))
    return [results[j] for j in range(len(group))]


def _ckpt_epoch(path):
    from . import runs
    return runs.load_torch(path)["epoch"] if path.exists() else 0


def _train_packed(group, log):
    """stages._train for N claimed runs at once: the same seeds, loaders, models and records
    (stages.record_training, finish_model, seal), with one packed model in between."""
    import time

    from . import runs, stages, train
    cfg0, stage = group[0].cfg, group[0].stage
    if cfg0.threads:
        torch.set_num_threads(cfg0.threads)
    device = train.pick_device(cfg0.device)
    if device.type == "cpu":
        train.keep_freed_memory()
    t0 = time.perf_counter()
    hp = train.hyper(cfg0, stage)
    members, gens, train_dls = [], [], []
    for r in group:
        rseed = stages.run_seed(stage, r.name, r.seed)
        torch.manual_seed(rseed)  # as stages._train: the member's init, then its dropout stream
        train_dl, val_dl, test_dl, hier = stages.loaders(r.cfg, device, hp.batch_size, rseed, r.cfg.augment)
        model = r.spec.build(r.cfg, hier, r.seed)
        gens.append(_member_generator(device, rseed))
        members.append(model)
        train_dls.append(train_dl)
        stages.record_training(r, device, rseed, hp, model, False, train_dl, val_dl)
    net = pack(members, gens).to(device)
    if train.use_channels_last(cfg0, device):
        net.net.to(memory_format=torch.channels_last)
        net.channels_last = True
    forward = torch.compile(net) if cfg0.compile else net
    log(f"[packed x{len(group)}] " + ", ".join(r.key for r in group))

    def on_epoch(histories):
        for r, h in zip(group, histories):
            runs.write_csv(r.path / "history.csv", h)
    _, bests = train.fit(
        net, forward, PackedLoader(train_dls), PackedLoader([val_dl] * len(group)),
        heads=group[0].heads, hp=hp, device=device, fine_to_coarse=hier.fine_to_coarse,
        ckpt_path=[r.path / "checkpoint.pt" for r in group], amp=cfg0.amp, progress=cfg0.progress,
        log=lambda m: log(f"[packed {stage} x{len(group)}] {m}"), on_epoch=on_epoch)
    results = []
    for i, r in enumerate(group):
        model = members[i].to(device)
        model.load_state_dict(unpack(net, i), strict=True)
        model.eval()
        metrics = stages.finish_model(r, model, model, bests[i], hp, hier, device, val_dl, test_dl)
        share = (time.perf_counter() - t0) / len(group)  # the run's share of the packed training
        results.append(stages.seal(r, metrics, share, log))
    return results


def _member_generator(device, rseed):
    if torch.device(device).type == "cpu":
        g = torch.Generator()
        g.set_state(torch.get_rng_state())  # continues the stream its separate run would use
        return g
    return torch.Generator(device).manual_seed(rseed)  # as torch.manual_seed seeds CUDA


@dataclass(frozen=True, eq=False)
class Group:
    """The runs of one packable group as one job of a sweep (bilateral/sweep.py): it trains
    them packed and writes one record per run. Quacks like the plan.Run a job otherwise holds."""
    runs: tuple
    retrain: frozenset = frozenset()  # the members a forced job retrains (the stale ones)

    @property
    def cfg(self):
        return self.runs[0].cfg

    @property
    def stage(self):
        return self.runs[0].stage

    @property
    def key(self) -> str:
        return f"{self.runs[0].key}+{len(self.runs) - 1}"

    def upstream(self) -> list:
        return [u for r in self.runs for u in r.upstream()]

    def status(self) -> str:
        return "finished" if all(r.status() == "finished" for r in self.runs) else "in_progress"

    def metrics(self):
        return None

    def train(self, force: bool = False, log=print) -> list[dict]:
        return train_runs(list(self.runs), [force and r in self.retrain for r in self.runs], log)
