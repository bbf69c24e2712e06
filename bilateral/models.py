"""Backbones, heads and the unilateral / bilateral / ensemble models of the study.

Every backbone maps (B, 3, 32, 32) images to (B, out_features) features. The backbones are
nn.Sequential subclasses with named stages, so Grad-CAM target layers are plain attributes
(ResNet-9: `res1`, `res2`; ResNet-18/34: `layer4`; VGG-11: `features[-2]`, the last conv ReLU).
"""
import math
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_NAMES = ("fine", "coarse")


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _ceil(x: float) -> int:
    # ceil(0.7 * 10) would be 8 in floating point; the tolerance keeps exact products exact
    return math.ceil(x - 1e-9)


class FreezeAware(nn.Module):
    """Makes .train() leave modules marked by `freeze` in eval mode (BN stats stay fixed)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if getattr(m, "_frozen", False):
                nn.Module.train(m, False)  # not m.eval(): that would re-enter this method
        return self


# ---------------------------------------------------------------------------------- k-WTA
class KWTA(nn.Module):
    """Two-stage k-winners-take-all on conv maps (B, C, H, W); gradients reach winners only.

    Stage 1: per sample and channel keep the top ceil(k*H*W) positions.
    Stage 2: per channel, across the batch, keep the top ceil(k_batch*ceil(k*H*W)*B) stage-1
    winners. Unlike the original code, stage-1 losers (zeros) cannot outrank negative winners in
    stage 2, so that many winners survive (about k*k_batch of all activations; more only on
    exact ties).

    Stage 2 couples the samples of a batch, so evaluation follows `eval_rule`:
    - "threshold": stage 1, then each channel's running stage-2 threshold, tracked in training
      like BatchNorm's running mean (momentum); keeps the training sparsity, so the next
      BatchNorm sees at test the distribution it was trained on, and no sample depends on
      another. The threshold starts at -inf (an untrained module acts as "map_only").
    - "map_only": stage 1 only (more activations survive than in training: about k, not
      k*k_batch).
    - "batch": both stages on the test batch (the original's; predictions depend on the batch).
    """

    EVAL_RULES = ("threshold", "map_only", "batch")

    def __init__(self, k: float, k_batch: float | None = None, eval_rule: str = "threshold", *,
                 channels: int, momentum: float = 0.1):
        super().__init__()
        k_batch = k if k_batch is None else k_batch
        for name, v in (("k", k), ("k_batch", k_batch), ("momentum", momentum)):
            if not 0 < v <= 1:
                raise ValueError(f"k-WTA {name} must be in (0, 1], got {v}")
        if eval_rule not in self.EVAL_RULES:
            raise ValueError(f"k-WTA eval_rule: unknown value {eval_rule!r}; "
                             f"allowed: {', '.join(self.EVAL_RULES)}")
        self.k, self.k_batch, self.eval_rule, self.momentum = k, k_batch, eval_rule, momentum
        self.register_buffer("running_threshold", torch.full((channels,), float("-inf")))

    def extra_repr(self):
        return (f"channels={len(self.running_threshold)}, k={self.k}, k_batch={self.k_batch}, "
                f"eval_rule={self.eval_rule}")

    def forward(self, x):
        B, C, H, W = x.shape
        if C != len(self.running_threshold):
            raise ValueError(f"k-WTA built for {len(self.running_threshold)} channels got {C}")
        with torch.no_grad():
            # One channel-major copy, whatever x's memory format: stage 1 selects along its rows
            # (a sample's map), stage 2 along a channel's whole slab, both in place.
            v = torch.empty((C, B, H * W), dtype=x.dtype, device=x.device)
            v.view(C, B, H, W).copy_(x.detach().transpose(0, 1))
            n1 = _ceil(self.k * H * W)
            thr = _kth_largest_(v, n1)  # (C, B, 1): stage 1
            if self.training or self.eval_rule == "batch":
                n2 = _ceil(self.k_batch * n1 * B)
                v.masked_fill_(v < thr, float("-inf"))  # stage-1 losers cannot win stage 2
                t = _kth_largest_(v.view(C, -1), n2)  # (C, 1): finite, as n2 <= the n1*B winners
                thr = torch.maximum(thr, t.view(C, 1, 1))  # a stage-2 winner passed both
                if self.training:
                    self._track(t.reshape(C).to(self.running_threshold.dtype))  # float32 under AMP
            elif self.eval_rule == "threshold":
                thr = torch.maximum(thr, self.running_threshold.view(C, 1, 1))
            keep = x >= thr.transpose(0, 1).reshape(B, C, 1, 1)
        return torch.where(keep, x, 0.0)  # one pass, in x's memory format; no float mask

    def _track(self, t):
        rt = self.running_threshold
        rt.copy_(torch.where(torch.isfinite(rt), torch.lerp(rt, t, self.momentum), t))


SELECT_WITH_NUMPY = True  # the benchmark (section 7) turns it off to measure what it saves


def _kth_largest_(v, k):
    """Threshold for the top k along the last dim, which it may reorder in place: a selection,
    not a sort. Values tied with the threshold all survive (the caller keeps v >= it), so a tie
    never depends on memory order.

    On the CPU, numpy's in-place partition (a SIMD introselect, x86-simd-sort) is 4-8x faster
    than torch's kthvalue, which alone took half of a k-WTA training step; both give the same
    value, as the k-th largest is unique."""
    n = v.shape[-1]
    if (SELECT_WITH_NUMPY and v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64)
            and v.is_contiguous()):
        v.numpy().partition(n - k, axis=-1)
        return v[..., n - k:n - k + 1].clone()
    return v.kthvalue(n - k + 1, dim=-1, keepdim=True).values


# ------------------------------------------------------------------------------- ResNet-9
def _bn(c, momentum):
    return nn.BatchNorm2d(c) if momentum is None else nn.BatchNorm2d(c, momentum=momentum)


def conv_block(cin, cout, *, kwta=None, bn_momentum=None, pool=False):
    # Identity in the k-WTA slot keeps the other modules' indices the same with and without
    # sparsity; k-WTA adds only its running thresholds (`<block>.1.running_threshold`)
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), kwta(cout) if kwta else nn.Identity(),
              _bn(cout, bn_momentum), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class ResNet9(FreezeAware, nn.Sequential):
    def __init__(self, widths=(64, 128, 256, 512), *, kwta=None, bn_momentum=None):
        a, b, c, d = widths
        blk = lambda i, o, pool=False: conv_block(i, o, kwta=kwta, bn_momentum=bn_momentum, pool=pool)
        super().__init__(OrderedDict(
            conv1=blk(3, a), conv2=blk(a, b, pool=True), res1=Residual(blk(b, b), blk(b, b)),
            conv3=blk(b, c, pool=True), conv4=blk(c, d, pool=True), res2=Residual(blk(d, d), blk(d, d)),
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))  # pool after res2 for Grad-CAM
        self.out_features = d


# -------------------------------------------------------------------------- ResNet-18/34
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, bn_momentum=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout, bn_momentum)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout, bn_momentum))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(FreezeAware, nn.Sequential):
    """ResNet for 32x32 input: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, blocks, width=1.0, *, bn_momentum=None):
        c = [_w(v, width) for v in (64, 128, 256, 512)]
        stages, cin = OrderedDict(), c[0]
        for i, (cout, n, stride) in enumerate(zip(c, blocks, (1, 2, 2, 2))):
            stages[f"layer{i + 1}"] = nn.Sequential(*[
                BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, bn_momentum)
                for j in range(n)])
            cin = cout
        stem = nn.Sequential(nn.Conv2d(3, c[0], 3, 1, 1, bias=False), _bn(c[0], bn_momentum),
                             nn.ReLU(inplace=True))
        super().__init__(OrderedDict(stem=stem, **stages,
                                     pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
        self.out_features = c[-1]


# -------------------------------------------------------------------------------- VGG-11
class VGG11(FreezeAware, nn.Sequential):
    """torchvision's vgg11 (config A, no BN) without its last Linear; same keys and init."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, width=1.0):
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, _w(v, width), 3, padding=1), nn.ReLU(inplace=True)]
                cin = _w(v, width)
        h = _w(4096, width)
        super().__init__(OrderedDict(
            features=nn.Sequential(*layers),
            avgpool=nn.AdaptiveAvgPool2d((7, 7)),  # 1x1 -> 7x7 at 32 px: copies, as torchvision
            flatten=nn.Flatten(),
            classifier=nn.Sequential(nn.Linear(cin * 49, h), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(h, h), nn.ReLU(True), nn.Dropout())))
        self.out_features = h
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ registry
BACKBONES: dict[str, Callable] = {}
KWTA_BACKBONES = ("resnet9", "resnet9_pyramid")


def register(fn):
    BACKBONES[fn.__name__] = fn
    return fn


@register
def resnet9(width=1.0, *, kwta=None, bn_momentum=None):
    return ResNet9([_w(c, width) for c in (64, 128, 256, 512)], kwta=kwta, bn_momentum=bn_momentum)


@register
def resnet9_pyramid(width=1.0, *, kwta=None, bn_momentum=None, floor=0):
    """Widths shrink with depth; `floor`: the fewest channels a stage keeps (narrow widths)."""
    return ResNet9([max(_w(c, width), floor) for c in (512, 256, 128, 64)], kwta=kwta,
                   bn_momentum=bn_momentum)


@register
def vgg11(width=1.0, *, kwta=None, bn_momentum=None):
    return VGG11(width)  # no BatchNorm, so bn_momentum has nothing to act on


@register
def resnet18(width=1.0, *, kwta=None, bn_momentum=None):
    return CifarResNet([2, 2, 2, 2], width, bn_momentum=bn_momentum)


@register
def resnet34(width=1.0, *, kwta=None, bn_momentum=None):
    return CifarResNet([3, 4, 6, 3], width, bn_momentum=bn_momentum)


def build_backbone(name, width=1.0, *, k=None, k_batch=None, kwta_eval="threshold",
                   bn_momentum=None, pyramid_floor=0) -> nn.Module:
    """k-WTA is on when k is given (k_batch defaults to k); kwta_eval (KWTA.EVAL_RULES) alone
    is a no-op. pyramid_floor: the pyramid's fewest channels per stage (other backbones: none)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    if (k is not None or k_batch is not None) and name not in KWTA_BACKBONES:
        raise ValueError(f"k-WTA is only implemented for {', '.join(KWTA_BACKBONES)}, not {name!r}")
    if k is None and k_batch is not None:
        raise ValueError("k_batch given without k")
    if kwta_eval not in KWTA.EVAL_RULES:
        raise ValueError(f"kwta_eval: unknown value {kwta_eval!r}; allowed: {', '.join(KWTA.EVAL_RULES)}")
    kwta = None if k is None else lambda c: KWTA(k, k_batch, kwta_eval, channels=c)
    floor = dict(floor=pyramid_floor) if name == "resnet9_pyramid" else {}
    return BACKBONES[name](width, kwta=kwta, bn_momentum=bn_momentum, **floor)


def set_kwta_eval(module: nn.Module, rule: str) -> str | None:
    """Set the evaluation rule of every k-WTA in module; return the previous one (None: none).
    The rule acts in eval mode only, so one trained model can be evaluated every way."""
    kws = [m for m in module.modules() if isinstance(m, KWTA)]
    if rule not in KWTA.EVAL_RULES:
        raise ValueError(f"kwta_eval: unknown value {rule!r}; allowed: {', '.join(KWTA.EVAL_RULES)}")
    before = kws[0].eval_rule if kws else None
    for m in kws:
        m.eval_rule = rule
    return before


# -------------------------------------------------------------------------------- models
class Head(nn.Sequential):
    """Dropout then a linear classifier; hidden > 0 puts a ReLU layer of that many units
    between (the capacity-matched control of the callosal models)."""

    def __init__(self, in_features: int, n_classes: int, dropout: float = 0.6, hidden: int = 0):
        if not hidden:
            super().__init__(nn.Dropout(dropout), nn.Linear(in_features, n_classes))
        else:
            super().__init__(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_classes))


def _out_features(m):
    if not isinstance(getattr(m, "out_features", None), int):
        raise ValueError(f"{type(m).__name__} has no int `out_features`: pass a backbone")
    return m.out_features


class Unilateral(FreezeAware):
    def __init__(self, backbone, n_fine, n_coarse, heads=HEAD_NAMES, dropout=0.6):
        super().__init__()
        if not heads or set(heads) - set(HEAD_NAMES):
            raise ValueError(f"heads must be a non-empty subset of {HEAD_NAMES}, got {heads}")
        n = {"fine": n_fine, "coarse": n_coarse}
        self.backbone = backbone
        d = _out_features(backbone)
        self.heads = nn.ModuleDict({h: Head(d, n[h], dropout) for h in HEAD_NAMES if h in heads})

    def features(self, x):
        return self.backbone(x)

    def classify(self, feats):
        return {h: head(feats) for h, head in self.heads.items()}

    def forward(self, x, return_features=False):
        f = self.backbone(x)
        out = self.classify(f)
        if return_features:
            out["features"] = f
        return out


class Bilateral(FreezeAware):
    """Two hemispheres whose features are concatenated [left | right] and fed to both heads."""

    def __init__(self, left, right, n_fine, n_coarse, dropout=0.6, hidden=0):
        super().__init__()
        self.left, self.right = left, right
        d = _out_features(left) + _out_features(right)
        self.heads = nn.ModuleDict(dict(fine=Head(d, n_fine, dropout, hidden),
                                        coarse=Head(d, n_coarse, dropout, hidden)))

    def sides(self, x):
        """The left and the right features (a callosal model exchanges maps on the way)."""
        return self.left(x), self.right(x)

    def features(self, x):
        return torch.cat(self.sides(x), 1)

    def classify(self, feats):
        return {h: head(feats) for h, head in self.heads.items()}

    def forward(self, x, return_features=False):
        left, right = self.sides(x)
        feats = torch.cat([left, right], 1)
        out = self.classify(feats)
        if return_features:
            out.update(features=feats, left=left, right=right)
        return out


class Ensemble(FreezeAware):
    """Mean of the members' logits, per head that every member has."""

    def __init__(self, members):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x):
        outs = [m(x) for m in self.members]
        keys = [k for k in outs[0] if all(k in o for o in outs[1:])]
        return {k: torch.stack([o[k] for o in outs]).mean(0) for k in keys}


def freeze(module: nn.Module) -> nn.Module:
    """No trainable params, eval mode kept under any FreezeAware parent's .train().

    Autograd still runs through it (no no_grad), so input gradients / Grad-CAM work.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    module._frozen = True
    nn.Module.train(module, False)
    return module


def load_state_strict(module, state_dict, what="model", show=4) -> None:
    """load_state_dict(strict=True), but first one ValueError that lists every kind of mismatch."""
    own = module.state_dict()
    shape = lambda v: tuple(getattr(v, "shape", ()))
    kinds = {
        "missing keys": [k for k in own if k not in state_dict],
        "unexpected keys": [k for k in state_dict if k not in own],
        "shape mismatches": [f"{k}: saved {shape(v)} vs model {shape(own[k])}"
                             for k, v in state_dict.items() if k in own and shape(v) != shape(own[k])],
    }
    problems = [f"{len(v)} {kind} ({', '.join(v[:show])}{', ...' if len(v) > show else ''})"
                for kind, v in kinds.items() if v]
    if problems:
        raise ValueError(f"{what}: " + ", ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def count_trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def count_total(module) -> int:
    """Every parameter, frozen ones included: the capacity a model brings to its task."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- the study's hemispheres

def hemisphere_arch(cfg, side: str) -> tuple[str, bool]:
    """(backbone name, k-WTA on?) of a hemisphere: conditions B and D give the left the
    pyramid, C and D put k-WTA into both."""
    name = "resnet9_pyramid" if side == "left" and cfg.condition in ("B", "D") else cfg.backbone
    return name, cfg.condition in ("C", "D")


def hemisphere_backbone(cfg, side: str) -> nn.Module:
    name, kwta = hemisphere_arch(cfg, side)
    kw = dict(k=cfg.kwta_k, k_batch=cfg.kwta_k_batch, kwta_eval=cfg.kwta_eval) if kwta else {}
    return build_backbone(name, cfg.width, bn_momentum=cfg.bn_momentum,
                          pyramid_floor=cfg.pyramid_floor, **kw)


# Relative training cost per epoch, measured on CPU at width 1 (ResNet-9 = 1), see README.
# VGG-11: 0.83 per step at batch 64 (one measurement on a shared CPU; its FLOPs ratio is 0.72).
BACKBONE_COST = {"resnet9": 1.0, "resnet9_pyramid": 4.2, "resnet18": 1.5, "resnet34": 2.9,
                 "vgg11": 0.8}
KWTA_COST = {"resnet9": 1.6, "resnet9_pyramid": 6.2}


def hemisphere_cost(cfg, side: str) -> float:
    name, kwta = hemisphere_arch(cfg, side)
    return (KWTA_COST if kwta else BACKBONE_COST)[name]


def params_table(n_fine=100, n_coarse=20, extra_rows=()) -> str:
    """Markdown table of the total and trainable parameters of every model of the study
    (width 1). The specialised bilateral model trains only its heads but holds its frozen
    hemispheres too; the study's argument is about total capacity.

    k-WTA adds no parameters (only running thresholds), so conditions C and D count as A and B.
    `python -m bilateral params-table` adds the callosal models (callosum.params_rows).
    """
    uni = lambda name, heads=HEAD_NAMES: Unilateral(build_backbone(name), n_fine, n_coarse, heads)
    frz = lambda m, on: freeze(m) if on else m
    bi = lambda l, r, frozen: Bilateral(frz(build_backbone(l), frozen), frz(build_backbone(r), frozen),
                                        n_fine, n_coarse)
    rows = [
        ("ResNet-9 backbone", lambda: build_backbone("resnet9")),
        ("ResNet-9 pyramid backbone", lambda: build_backbone("resnet9_pyramid")),
        ("VGG-11 backbone", lambda: build_backbone("vgg11")),
    ]
    for label, name in (("ResNet-9", "resnet9"), ("ResNet-9 pyramid", "resnet9_pyramid"),
                        ("VGG-11", "vgg11")):
        rows += [(f"{label} hemisphere, {h} head only", lambda n=name, h=h: uni(n, (h,)))
                 for h in HEAD_NAMES]
    rows += [
        ("Unilateral dual-head ResNet-9", lambda: uni("resnet9")),
        ("Unilateral dual-head VGG-11", lambda: uni("vgg11")),
        ("ResNet-18 dual-head", lambda: uni("resnet18")),
        ("ResNet-34 dual-head", lambda: uni("resnet34")),
    ]
    for label, l, r in (("ResNet-9 (A, C)", "resnet9", "resnet9"),
                        ("pyramid left + ResNet-9 right (B, D)", "resnet9_pyramid", "resnet9"),
                        ("VGG-11", "vgg11", "vgg11")):
        rows += [(f"Bilateral {label}, end to end", lambda l=l, r=r: bi(l, r, False)),
                 (f"Bilateral {label}, specialised (frozen hemispheres)",
                  lambda l=l, r=r: bi(l, r, True))]
    for label, name in (("ResNet-9", "resnet9"), ("VGG-11", "vgg11")):
        rows += [(f"Ensemble of {k} unilateral dual-head {label}",
                  lambda n=name, k=k: Ensemble([uni(n) for _ in range(k)])) for k in (2, 5)]
    with torch.device("meta"):  # no memory, no init cost: counting only
        models = [(label, make()) for label, make in rows]
        lines = [f"| {label} | {count_total(m):,} | {count_trainable(m):,} |" for label, m in models]
    # extra_rows: (label, total, trainable) of models defined elsewhere (the callosal ones)
    lines += [f"| {label} | {t:,} | {tr:,} |" for label, t, tr in extra_rows]
    return "\n".join(["| model | total parameters | trainable parameters |", "|---|---:|---:|",
                      *lines])
