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


def part(t, rule, i, n):
    if rule == "index":
        return t[i]
    if rule == "shared":
        return t
    return t.chunk(n)[i]


def unpack(packed: PackedModel, i: int) -> dict:
    """Member i's state dict, loadable strictly into the model it was packed from."""
    rules, n = _splitter(packed), packed.n_members
    return {k: part(v, rules[k], i, n).detach().clone() for k, v in packed.net.state_dict().items()}


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
        state[idx] = {k: part(v, rules[idx], i, n).clone() if shape(v) else v for k, v in s.items()}
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
