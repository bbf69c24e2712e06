"""One flat dataclass holds every parameter of a run; YAML files and `--set` fill it.

Everything is validated here, before any data is read or any model is built, so a typo in a
params file stops the run in the first second rather than after an hour of training.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STAGES = ("hemisphere", "bilateral", "bilateral_unspecialised", "unilateral",
          "resnet18", "resnet34", "ensemble", "callosal", "callosal_unspecialised")
CONDITIONS = ("A", "B", "C", "D")
RECIPES = ("original", "fast")
SIDES = ("left", "right")
REPORTS = ("last", "best")
DATASETS = ("cifar100", "fashion_mnist", "synthetic")
BACKBONE_CHOICES = ("resnet9", "vgg11")  # the study's backbones; the pyramid comes with condition B
BASELINES = ("bilateral_unspecialised", "unilateral", "resnet18", "resnet34", "ensemble")
CALLOSUM_KINDS = ("add", "gate", "concat")
CALLOSUM_DEPTHS = ("prep", "layer1", "layer2", "layer3")  # ResNet-9 depths, see callosum.py
CALLOSUM_TRAIN = ("connections", "all")


@dataclass
class Config:
    experiment: str = "default"        # outputs/<experiment>/...
    out_dir: str = "outputs"
    # data
    dataset: str = "synthetic"
    data_dir: str = "data"
    val_size: int | None = None        # None: the dataset's default (5,000 for CIFAR-100)
    split_seed: int = 0                # fixes the train/val split, independent of the seed
    synthetic_size: int = 2000
    subset_per_class: int | None = None
    augment: bool = True               # crop + flip for every stage that trains a backbone
    head_augment: bool = False         # the bilateral heads: False allows cached features
    # model
    backbone: str = "resnet9"
    width: float = 1.0
    condition: str = "A"
    side: str = "left"                 # hemisphere stage: left = fine, right = coarse
    kwta_k: float = 0.9                # k-WTA (conditions C and D): fraction kept per map
    kwta_k_batch: float = 0.9          # ... and per channel across the batch
    kwta_eval_batch: bool = False      # True: the original's batch-dependent test predictions
    bn_momentum: float | None = None   # None: PyTorch's default; 0.9 is the original's
    dropout: float = 0.6
    # callosal connections between the hemispheres (bilateral/callosum.py)
    callosum: str = "add"              # connection kind of a callosal run
    callosum_at: list[str] = field(default_factory=lambda: ["layer1", "layer3"])  # depths joined
    callosum_train: str = "connections"  # connections: hemispheres frozen; all: fine-tuned too
    backbone_lr_scale: float = 0.1     # callosum_train all: hemispheres' lr = lr x this
    callosum_kinds: list[str] = field(default_factory=list)  # the study's callosal runs; [] = none
    # training; None takes the recipe's value
    recipe: str = "fast"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    report_epoch: str = "last"         # which epoch's test metrics tables report
    # unilateral pool and ensembles
    member: int = 0                    # index of a unilateral run in the ensemble pool
    pool_size: int = 10
    ensemble_size: int = 2             # members of one ensemble run
    ensemble_sizes: list[int] = field(default_factory=lambda: [2, 5])  # the study's ensembles
    # what the pipeline runs
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # engine
    device: str = "auto"
    amp: bool = True                   # CUDA only: bf16 (or fp16 with a scaler)
    channels_last: bool = True         # CUDA only
    compile: bool = False
    progress: bool = True
    threads: int | None = None         # torch CPU threads; None leaves torch's choice


CHOICES = {
    "dataset": DATASETS, "backbone": BACKBONE_CHOICES, "condition": CONDITIONS,
    "recipe": RECIPES, "side": SIDES, "report_epoch": REPORTS,
    "callosum": CALLOSUM_KINDS, "callosum_train": CALLOSUM_TRAIN,
}
LIST_CHOICES = {"conditions": CONDITIONS, "baselines": BASELINES,
                "callosum_at": CALLOSUM_DEPTHS, "callosum_kinds": CALLOSUM_KINDS}

# Keys that do not change what a run computes, so a finished run with other values is the
# same run (a different device is allowed to pick up where another left off).
NOT_IDENTITY = {"out_dir", "data_dir", "progress", "conditions", "baselines", "device",
                "threads", "ensemble_sizes", "pool_size", "callosum_kinds"}


class ConfigError(ValueError):
    pass


def _hint(key):
    allowed = CHOICES.get(key) or LIST_CHOICES.get(key)
    return f"; allowed: {', '.join(map(str, allowed))}" if allowed else ""


def _check_type(key, value, tp):
    """Return value converted to the field's type, or raise naming key, value and type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}{_hint(key)}")
        return [_check_type(key, v, args[0]) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}"
                          f" ({type(value).__name__}){_hint(key)}")
    return value


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def validate(cfg: Config) -> Config:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: unknown value {getattr(cfg, key)!r}; allowed: {', '.join(allowed)}")
    for key, allowed in LIST_CHOICES.items():
        for v in getattr(cfg, key):
            if v not in allowed:
                raise ConfigError(f"{key}: unknown value {v!r}; allowed: {', '.join(allowed)}")
    positive = ["width", "synthetic_size", "pool_size", "ensemble_size", "backbone_lr_scale"] + [
        k for k in ("epochs", "batch_size", "lr", "subset_per_class") if getattr(cfg, k) is not None]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {getattr(cfg, key)}")
    for key in ("kwta_k", "kwta_k_batch", "dropout"):
        v = getattr(cfg, key)
        if not (0 < v <= 1 or key == "dropout" and v == 0):
            raise ConfigError(f"{key}: must be in (0, 1], got {v}")
    if cfg.backbone != "resnet9" and any(c != "A" for c in [cfg.condition, *cfg.conditions]):
        raise ConfigError(f"backbone {cfg.backbone!r} supports condition A only (the pyramid and "
                          f"k-WTA are ResNet-9 variants); set conditions: [A]")
    for k in [cfg.ensemble_size, *cfg.ensemble_sizes]:
        if k > cfg.pool_size:
            raise ConfigError(f"ensemble_size: {k} members cannot be chosen from a pool of {cfg.pool_size}")
    _check_callosum(cfg)
    if not 0 <= cfg.member < cfg.pool_size:
        raise ConfigError(f"member: must be in 0..{cfg.pool_size - 1}, got {cfg.member}")
    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: unknown value {cfg.device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    return cfg


def _check_callosum(cfg):
    at = cfg.callosum_at
    if not at or len(set(at)) != len(at):
        raise ConfigError(f"callosum_at: expected one or more distinct depths, got {at!r}; "
                          f"allowed: {', '.join(CALLOSUM_DEPTHS)}")
    cfg.callosum_at = sorted(at, key=CALLOSUM_DEPTHS.index)  # one order, one run identity
    if cfg.callosum_kinds and cfg.backbone != "resnet9":
        raise ConfigError(f"callosum_kinds: callosal connections are defined for ResNet-9 "
                          f"hemispheres only, not backbone {cfg.backbone!r}; set callosum_kinds: []")


def from_dict(values: dict) -> Config:
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown parameter(s): {', '.join(unknown)}; "
                          f"allowed: {', '.join(FIELD_TYPES)}")
    typed = {k: _check_type(k, v, _HINTS[k]) for k, v in values.items()}
    return validate(Config(**typed))


def parse_overrides(items) -> dict:
    """`--set key=value` pairs (or a dict, as papermill passes); values are read as YAML."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load(path=None, overrides=None) -> Config:
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of parameters, got {type(values).__name__}")
    values.update(parse_overrides(overrides))
    try:
        return from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path or 'parameters'}: {e}") from None


def identity(cfg: Config) -> dict:
    """The part of a config that decides what a run computes (compared on reruns)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}


def diff(a: dict, b: dict) -> list[str]:
    # a key missing on one side reads as its default: a field added after a run was recorded,
    # left at its default, does not make that run a different one
    defaults = dataclasses.asdict(Config())
    get = lambda d, k: d[k] if k in d else defaults.get(k)  # noqa: E731
    keys = sorted(set(a) | set(b))
    return [f"{k}: {get(a, k)!r} -> {get(b, k)!r}" for k in keys if get(a, k) != get(b, k)]
