"""The study's built-in stages, each declared once: hemisphere, bilateral, and the baselines.

Each `register(Stage(...))` names the config fields a stage uses, its folder name, label, heads,
builder, recipe group, phase, upstream runs and relative cost (registry.Stage). A builder makes
the untrained model from the config and, for a stage built on other runs, from their trained
models, which the runner loads and hands over (the bilateral builder gets its two hemispheres).
Training and records are runner.py's; the plan of runs is plan.py's.
"""
from __future__ import annotations

from . import config as C
from . import models
from .registry import Stage, register

CACHED_HEADS_COST = 0.02  # an epoch of the bilateral heads on cached features, in ResNet-9 epochs


# ---------------------------------------------------------------------------------- builders

def hemisphere_model(cfg, side, hier) -> models.Unilateral:
    heads = ("fine",) if side == "left" else ("coarse",)
    return models.Unilateral(models.hemisphere_backbone(cfg, side), hier.n_fine, hier.n_coarse,
                             heads=heads, dropout=cfg.dropout)


def bilateral_model(cfg, hier, hemispheres) -> models.Bilateral:
    """Frozen, specialised hemispheres (the trained left and right runs) joined by new heads."""
    left, right = (models.freeze(h.backbone) for h in hemispheres)
    return models.Bilateral(left, right, hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


def one_hemisphere_model(cfg, hier, hemispheres) -> models.Unilateral:
    """The control of the bilateral model: its two heads on ONE frozen hemisphere's features,
    so a gain of combining both is told apart from the gain of a new head on frozen features."""
    (hemisphere,) = hemispheres
    return models.Unilateral(models.freeze(hemisphere.backbone), hier.n_fine, hier.n_coarse,
                             dropout=cfg.dropout)


def unspecialised_model(cfg, hier) -> models.Bilateral:
    return models.Bilateral(models.hemisphere_backbone(cfg, "left"),
                            models.hemisphere_backbone(cfg, "right"),
                            hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


def dual_head_model(backbone: str, cfg, hier) -> models.Unilateral:
    bb = models.build_backbone(backbone, cfg.width, bn_momentum=cfg.bn_momentum)
    return models.Unilateral(bb, hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


# ------------------------------------------------------------------------------------ costs

def pair_cost(cfg) -> float:
    return models.hemisphere_cost(cfg, "left") + models.hemisphere_cost(cfg, "right")


def heads_epoch_cost(cfg):
    """An epoch of new heads on a frozen pair of hemispheres (bilateral, its capacity control):
    with head augmentation the hemispheres run forward (about a third of a training step) every
    epoch; without, once (heads_fixed_cost) and the heads train on cached features."""
    return pair_cost(cfg) / 3 if cfg.head_augment else CACHED_HEADS_COST


def heads_fixed_cost(cfg):
    return 0.0 if cfg.head_augment else pair_cost(cfg) / 3


# ----------------------------------------------------------------------------------- stages

register(Stage(
    "hemisphere", "hemispheres", "hemisphere",
    "one backbone, one head: left = fine labels, right = coarse (--set side=...)",
    uses=("condition", "side", "backbone", "augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}-{c.side}",
    label=lambda c: f"{c.condition} {c.side}",
    variants=lambda c: [dict(condition=k, side=s) for k in c.conditions for s in C.SIDES],
    epoch_cost=lambda c: models.hemisphere_cost(c, c.side),
    build=lambda c, hier, ups: hemisphere_model(c, c.side, hier),
    heads=lambda c: ("fine",) if c.side == "left" else ("coarse",),
    recipe="hemisphere"))

register(Stage(
    "bilateral", "bilateral", "bilateral (specialised)",
    "frozen left + right hemispheres of this seed and condition, two new heads",
    uses=("condition", "backbone", "augment", "head_augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}",
    label=lambda c: f"{c.condition} bilateral",
    variants=lambda c: [dict(condition=k) for k in c.conditions],
    epoch_cost=heads_epoch_cost,
    fixed_cost=heads_fixed_cost,
    build=bilateral_model,
    upstream=lambda c: [("hemisphere", dict(side=s)) for s in C.SIDES],
    heads_only=True))

register(Stage(
    "one_hemisphere", "bilateral", "heads on one hemisphere (control)",
    "the bilateral model's two new heads on one frozen hemisphere of this seed and condition",
    uses=("condition", "side", "backbone", "augment", "head_augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}-{c.side}",
    label=lambda c: f"{c.condition} heads on {c.side} only",
    variants=lambda c: [dict(condition=k, side=s) for k in c.conditions for s in C.SIDES],
    epoch_cost=lambda c: (models.hemisphere_cost(c, c.side) / 3 if c.head_augment
                          else CACHED_HEADS_COST),
    fixed_cost=lambda c: 0.0 if c.head_augment else models.hemisphere_cost(c, c.side) / 3,
    build=one_hemisphere_model,
    upstream=lambda c: [("hemisphere", dict(side=c.side))],
    heads_only=True))

register(Stage(
    "bilateral_unspecialised", "baselines", "bilateral, no specialisation",
    "the same two-hemisphere model trained end to end from scratch",
    uses=("condition", "backbone", "augment"),
    run_name=lambda c: f"{c.backbone}-{c.condition}",
    label=lambda c: "bilateral, no specialisation",
    variants=lambda c: [dict(condition="A")],
    epoch_cost=pair_cost,
    build=lambda c, hier, ups: unspecialised_model(c, hier)))

register(Stage(
    "unilateral", "baselines", "unilateral dual-head",
    "one backbone with both heads (--set member=i for the ensemble pool)",
    uses=("backbone", "augment", "member"),
    run_name=lambda c: f"{c.backbone}-m{c.member}",
    label=lambda c: f"unilateral m{c.member}",
    variants=lambda c: [dict(member=m) for m in range(c.pool_size)],
    epoch_cost=lambda c: models.BACKBONE_COST[c.backbone],
    build=lambda c, hier, ups: dual_head_model(c.backbone, c, hier)))

for _depth, _size in (("18", "about the bilateral model's size"),
                      ("34", "about twice the bilateral model's size")):
    register(Stage(
        f"resnet{_depth}", "baselines", f"ResNet-{_depth} dual-head",
        f"ResNet-{_depth} dual-head baseline ({_size})",
        uses=("augment",),
        run_name=lambda c, n=f"resnet{_depth}": n,
        label=lambda c, d=_depth: f"ResNet-{d}",
        variants=lambda c: [{}],
        epoch_cost=lambda c, n=f"resnet{_depth}": models.BACKBONE_COST[n],
        build=lambda c, hier, ups, n=f"resnet{_depth}": dual_head_model(n, c, hier)))

# No builder: the runner evaluates the top-k pool members (runner.evaluate_ensemble).
register(Stage(
    "ensemble", "baselines", "ensemble",
    "top-k unilateral pool members by validation accuracy, logits averaged",
    uses=("backbone", "augment", "ensemble_size"),   # augment: that of its pool
    run_name=lambda c: f"{c.backbone}-k{c.ensemble_size}",
    label=lambda c: f"ensemble k={c.ensemble_size}",
    variants=lambda c: [dict(ensemble_size=k) for k in c.ensemble_sizes],
    epoch_cost=lambda c: 0.0,
    upstream=lambda c: [("unilateral", dict(member=m)) for m in range(c.pool_size)]))
