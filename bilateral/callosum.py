"""Beyond the paper: a corpus callosum between the two hemispheres.

The paper joins its hemispheres only at the end (the heads read [left | right] features); in
the brain they also exchange signals all along the way through the corpus callosum. A
`Callosal` model is the bilateral model plus connections between the hemispheres' intermediate
feature maps at chosen depths of ResNet-9 (the SPEC table's blocks):

    prep   = conv1                      64 x 32 x 32 at width 1 (pyramid: 512)
    layer1 = conv2 + res1 (residual)   128 x 16 x 16            (256)
    layer2 = conv3                     256 x  8 x  8            (128)
    layer3 = conv4 + res2 (residual)   512 x  4 x  4            (64)

At each chosen depth both hemispheres send to each other at once (both read the maps before
the exchange), each direction with its own weights; a `Crossing` turns the sender's map into
a change of the receiver's map:
- add:    recv + P(send), P a 1x1 conv from the sender's to the receiver's width;
- gate:   recv + P(send) * g, g a per-channel sigmoid gate computed from both maps' channel
          means (squeeze-and-excitation style, one hidden layer);
- concat: recv + P([recv | send]), a 1x1 conv over both maps back to the receiver's width, in
          residual form (the same family as a conv initialised to [I | 0]).
Each P is a 1x1 conv followed by BatchNorm whose scale starts at zero (as in the last BN of a
residual block, Goyal et al. 2017), so P is zero at first: an untrained callosal model computes
exactly the bilateral model's outputs (in residual form, exactly under TF32/bf16 too). The BN
matters: a bare zero-initialised conv on these unnormalised maps took gradient steps so large
at the fast recipe's lr that training diverged to NaN on the first epoch. "What crosses" is
P(send) (gate: times g; concat: the part of P due to the sender's map); `traffic` measures its
norm against the receiving map's.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import pandas as pd

from . import config as C
from . import models, results_md, stats
from .stages import heads_epoch_cost, heads_fixed_cost, pair_cost
from .registry import Stage, register, register_section

KINDS, DEPTHS, TRAIN_MODES = C.CALLOSUM_KINDS, C.CALLOSUM_DEPTHS, C.CALLOSUM_TRAIN
BLOCKS = {"prep": ("conv1",), "layer1": ("conv2", "res1"), "layer2": ("conv3",),
          "layer3": ("conv4", "res2")}
DIRECTIONS = ("to_left", "to_right")  # to_left: right hemisphere -> left
STAGES = ("callosal", "callosal_unspecialised")
FIELDS = ("callosum", "callosum_at", "callosum_train", "backbone_lr_scale")


# ---------------------------------------------------------------------------------- model

def depth_widths(backbone) -> dict:
    """Channels of a ResNet-9 backbone's output at each depth (its last BatchNorm there)."""
    missing = [b for names in BLOCKS.values() for b in names if not hasattr(backbone, b)]
    if missing or not hasattr(backbone, "pool"):
        raise ValueError(f"callosal connections need ResNet-9 hemispheres (blocks "
                         f"{', '.join(b for n in BLOCKS.values() for b in n)}, pool); "
                         f"{type(backbone).__name__} lacks {', '.join(missing) or 'pool'}")
    out = {}
    for depth, names in BLOCKS.items():
        bns = [m for m in getattr(backbone, names[-1]).modules() if isinstance(m, nn.BatchNorm2d)]
        out[depth] = bns[-1].num_features
    return out


class Crossing(nn.Module):
    """One direction at one depth: the sender's map (cs channels) changes the receiver's (cr)."""

    def __init__(self, kind: str, cr: int, cs: int, reduction: int = 8):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown callosum kind {kind!r}; allowed: {', '.join(KINDS)}")
        self.kind = kind
        self.proj = nn.Conv2d(cr + cs if kind == "concat" else cs, cr, 1, bias=False)
        self.norm = nn.BatchNorm2d(cr)
        nn.init.zeros_(self.norm.weight)  # P = 0: the identity at initialisation
        if kind == "gate":
            hidden = max(4, (cr + cs) // reduction)
            self.gate = nn.Sequential(nn.Linear(cr + cs, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, cr), nn.Sigmoid())

    def extra_repr(self):
        return f"kind={self.kind}"

    def _sender_part(self, send, cr):
        """concat: BN(W[recv | send]) = a * W_r recv + a * W_s send + b in eval mode, with
        a = gamma / sqrt(running_var + eps); the crossing is a * W_s send."""
        n = self.norm
        a = n.weight / torch.sqrt(n.running_var + n.eps)
        return F.conv2d(send, self.proj.weight[:, cr:]) * a.to(send.dtype)[:, None, None]

    def forward(self, recv, send, record=None):
        gate = None
        if self.kind == "concat":
            delta = self.norm(self.proj(torch.cat([recv, send], 1)))
            cross = None if record is None else self._sender_part(send, recv.shape[1])
        else:
            delta = cross = self.norm(self.proj(send))
            if self.kind == "gate":
                gate = self.gate(torch.cat([recv.mean((2, 3)), send.mean((2, 3))], 1))
                delta = cross = cross * gate[:, :, None, None]
        if record is not None:
            with torch.no_grad():
                record["cross"] = cross.detach().float().flatten(1).norm(dim=1)
                record["recv"] = recv.detach().float().flatten(1).norm(dim=1)
                if gate is not None:
                    record["gate"] = gate.detach().float()
        return recv + delta


class Link(nn.Module):
    """Both directions at one depth, each with its own weights, from the pre-exchange maps."""

    def __init__(self, kind, c_left, c_right):
        super().__init__()
        self.to_left = Crossing(kind, c_left, c_right)
        self.to_right = Crossing(kind, c_right, c_left)

    def forward(self, left, right, record=None):
        rec = (lambda d: None) if record is None else (lambda d: record.setdefault(d, {}))
        return self.to_left(left, right, rec("to_left")), self.to_right(right, left, rec("to_right"))


class Callosal(models.Bilateral):
    """Two ResNet-9 hemispheres joined by callosal links, then models.Bilateral's two heads.

    A models.Bilateral (same `left`, `right`, `heads`, state-dict keys, `features`, `classify`,
    `forward`) plus `links`, exchanged on the way in `sides`; so analyses and Grad-CAM (targets
    `left.res1`, `left.res2`, ...) treat both alike.
    """

    def __init__(self, left, right, n_fine, n_coarse, kind="add", at=("layer1", "layer3"),
                 dropout=0.6, backbone_lr_scale=1.0):
        bad = [d for d in at if d not in DEPTHS]
        if bad or not at:
            raise ValueError(f"callosum_at: unknown depth(s) {bad or at}; allowed: {', '.join(DEPTHS)}")
        super().__init__(left, right, n_fine, n_coarse, dropout)
        wl, wr = depth_widths(left), depth_widths(right)
        self.links = nn.ModuleDict({k: Link(kind, wl[k], wr[k]) for k in DEPTHS if k in at})
        self.kind, self.backbone_lr_scale = kind, backbone_lr_scale

    def sides(self, x, record=None):
        """Pooled left and right features; `record` (a dict) collects the traffic per link."""
        left, right = x, x
        for depth, names in BLOCKS.items():
            for name in names:
                left, right = getattr(self.left, name)(left), getattr(self.right, name)(right)
            if depth in self.links:
                rec = None if record is None else record.setdefault(depth, {})
                left, right = self.links[depth](left, right, rec)
        return self.left.pool(left), self.right.pool(right)

    def param_groups(self):
        """For train.make_optimizer: the hemispheres learn at lr x backbone_lr_scale (frozen
        ones have no trainable parameters and drop out), the links and heads at lr."""
        hemis = [*self.left.parameters(), *self.right.parameters()]
        own = [*self.links.parameters(), *self.heads.parameters()]
        return [{"params": own, "lr_scale": 1.0},
                {"params": hemis, "lr_scale": self.backbone_lr_scale}]


# ------------------------------------------------------------------------- building runs

def build(cfg: C.Config, hier, left, right, frozen: bool) -> Callosal:
    """Join two hemisphere backbones; frozen: eval mode, no gradients into their weights."""
    if frozen:
        left, right = models.freeze(left), models.freeze(right)
    scale = cfg.backbone_lr_scale if not frozen else 1.0
    return Callosal(left, right, hier.n_fine, hier.n_coarse, kind=cfg.callosum,
                    at=tuple(cfg.callosum_at), dropout=cfg.dropout, backbone_lr_scale=scale)


def callosal_model(cfg, hier, hemispheres) -> Callosal:
    """The `callosal` stage's model: the trained hemispheres of this seed and condition (the
    runner loads them and hands them over), joined."""
    left, right = (h.backbone for h in hemispheres)
    return build(cfg, hier, left, right, frozen=cfg.callosum_train == "connections")


def build_unspecialised(cfg, hier) -> Callosal:
    """The `callosal_unspecialised` baseline: the same connected model from scratch."""
    return build(dataclasses.replace(cfg, backbone_lr_scale=1.0), hier,
                 models.hemisphere_backbone(cfg, "left"), models.hemisphere_backbone(cfg, "right"),
                 frozen=False)


def matched_hidden(cfg, hier) -> int:
    """Hidden units per head that give a bilateral model on frozen hemispheres as many trainable
    parameters as the callosal model of cfg (its connections and heads; counted on the meta
    device, nothing allocated): heads with h units hold h (2d + 2 + n_fine + n_coarse) +
    n_fine + n_coarse parameters, d the features per hemisphere pair."""
    with torch.device("meta"):
        left, right = models.hemisphere_backbone(cfg, "left"), models.hemisphere_backbone(cfg, "right")
        target = models.count_trainable(build(cfg, hier, left, right, frozen=True))
    d, nf, nc = left.out_features + right.out_features, hier.n_fine, hier.n_coarse
    return max(1, round((target - nf - nc) / (2 * d + 2 + nf + nc)))


def matched_model(cfg, hier, hemispheres) -> models.Bilateral:
    """The `bilateral_matched` control: the frozen hemispheres of this seed and condition, no
    connections, heads with a hidden layer holding the callosal model's trainable capacity;
    what a callosal model gains over it is due to its connections, not to more parameters."""
    left, right = (models.freeze(h.backbone) for h in hemispheres)
    return models.Bilateral(left, right, hier.n_fine, hier.n_coarse, dropout=cfg.dropout,
                            hidden=matched_hidden(cfg, hier))


def run_name(cfg) -> str:
    name = f"{cfg.backbone}-{cfg.condition}-{cfg.callosum}-{'+'.join(cfg.callosum_at)}"
    if cfg.callosum_train == "all":  # callosal_unspecialised resets it to the default
        name += f"-all{cfg.backbone_lr_scale:g}"
    return name


def _callosal_epoch_cost(cfg):
    # frozen hemispheres: their forward pass and the backward pass through them down to the
    # first link (no weight gradients), about two thirds of training them; else all of it
    pair = pair_cost(cfg)
    return pair * 2 / 3 if cfg.callosum_train == "connections" else pair


# The study's callosal runs: every kind of `callosum_kinds` on every condition, and the
# unspecialised model of each kind on condition A; none while callosum_kinds is empty.
register(Stage(
    "callosal", "callosum", "callosal (specialised)",
    "the hemispheres joined by callosal connections (--set callosum=add|gate|concat)",
    uses=("condition", "backbone", "augment", "head_augment"),
    owns=FIELDS,
    run_name=run_name,
    label=lambda c: f"{c.condition} callosal {c.callosum}",
    variants=lambda c: [dict(condition=k, callosum=kind)
                        for kind in c.callosum_kinds for k in c.conditions],
    epoch_cost=_callosal_epoch_cost,
    build=callosal_model,
    upstream=lambda c: [("hemisphere", dict(side=s)) for s in C.SIDES]))

register(Stage(
    "callosal_unspecialised", "callosum", "callosal, no specialisation",
    "the same callosal model trained end to end from scratch",
    uses=("condition", "backbone", "augment"),
    owns=("callosum", "callosum_at"),
    run_name=run_name,
    label=lambda c: f"callosal {c.callosum}, no specialisation",
    variants=lambda c: [dict(condition="A", callosum=kind)
                        for kind in c.callosum_kinds if "A" in c.conditions],
    epoch_cost=pair_cost,
    build=lambda c, hier, ups: build_unspecialised(c, hier)))

register(Stage(
    "bilateral_matched", "callosum", "bilateral, heads matched to a callosal model",
    "frozen hemispheres, no connections, heads with a hidden layer: as many trainable "
    "parameters as the callosal model of its kind (the capacity control)",
    uses=("condition", "backbone", "augment", "head_augment"),
    owns=("callosum", "callosum_at"),
    run_name=lambda c: f"{c.backbone}-{c.condition}-{c.callosum}-{'+'.join(c.callosum_at)}",
    label=lambda c: f"{c.condition} bilateral matched to callosal {c.callosum}",
    variants=lambda c: [dict(condition=k, callosum=kind)
                        for kind in c.callosum_kinds for k in c.conditions],
    epoch_cost=heads_epoch_cost,
    fixed_cost=heads_fixed_cost,
    build=matched_model,
    upstream=lambda c: [("hemisphere", dict(side=s)) for s in C.SIDES],
    heads_only=True))


# -------------------------------------------------------------------------- parameters

def params_rows(n_fine=100, n_coarse=20) -> list[tuple[str, int, int]]:
    """(model, total, trainable) at width 1 for each kind at the default depths (layer1,
    layer3), A/C (ResNet-9 both sides) and B/D (pyramid left), frozen and end to end."""
    rows = []
    with torch.device("meta"):  # counting only
        for label, lname in (("A, C", "resnet9"), ("B, D", "resnet9_pyramid")):
            for kind in KINDS:
                for frozen, how in ((True, "connections + heads"), (False, "end to end")):
                    m = Callosal(models.build_backbone(lname), models.build_backbone("resnet9"),
                                 n_fine, n_coarse, kind=kind)
                    if frozen:
                        models.freeze(m.left), models.freeze(m.right)
                    total = models.count_total(m)
                    rows.append((f"Callosal {kind} at layer1+layer3 ({label}), {how}", total,
                                 models.count_trainable(m)))
    return rows


# ------------------------------------------------------------------- results.md's section

def _reference(key: str) -> str:
    """callosal/resnet9-A-add-layer1+layer3 -> bilateral/resnet9-A (same condition)."""
    backbone, condition = key.split("/", 1)[1].split("-")[:2]
    return f"bilateral/{backbone}-{condition}"


def comparison(vals: dict) -> pd.DataFrame:
    """Each callosal model minus the bilateral model of its condition, per test accuracy, with
    stats.difference's 95% interval over seeds: paired for a callosal model (it is built on
    the same hemispheres as its reference), Welch's for one trained from scratch.
    vals: the report's {model key: {metric: {seed: value}}} (results.per_seed)."""
    rows = []
    nan = dict(diff=float("nan"), lo=float("nan"), hi=float("nan"), method="")
    for key in sorted(k for k in vals if k.split("/")[0] in STAGES):
        ref = _reference(key)
        row = dict(model=key, reference=ref)
        for metric in ("fine_acc", "coarse_acc"):
            a, b = vals[key].get(metric, {}), vals.get(ref, {}).get(metric, {})
            d = stats.difference(a, b, key.startswith("callosal/")) if a and b else nan
            row.update({f"{metric}_{k}": v for k, v in d.items()})
        rows.append(row)
    return pd.DataFrame(rows)


@register_section
def markdown_section(vals: dict) -> list[str]:
    """Lines for results.md ([] without callosal runs)."""
    comp = comparison(vals)
    if comp.empty:
        return []
    lines = ["", "## Callosal models against the bilateral model of their condition", "",
             "Difference of mean test accuracy (callosal minus bilateral), percentage points, "
             "95% confidence interval over seeds (paired for a callosal model: it shares its "
             "hemispheres with its reference; Welch's for one trained from scratch). "
             "`callosal_unspecialised` is trained from scratch; its reference is still the "
             "specialised bilateral model.", ""]
    rows = [[r["model"], r["reference"], results_md.row_ci(r, "fine_acc"),
             results_md.row_ci(r, "coarse_acc")] for _, r in comp.iterrows()]
    return lines + results_md.table(["model", "against", "Δ fine [95% CI]", "Δ coarse [95% CI]"],
                                    rows)
