"""One flat dataclass holds every parameter of a run; YAML files and `--set` fill it.

Everything is validated here, before any data is read or any model is built, so a typo in a
params file stops the run in the first second rather than after an hour of training.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONDITIONS = ("A", "B", "C", "D")
RECIPES = ("original", "fast")
SIDES = ("left", "right")
REPORTS = ("last", "best")
KWTA_EVAL = ("threshold", "map_only", "batch")
DATASETS = ("cifar100", "fashion_mnist", "synthetic")
BACKBONE_CHOICES = ("resnet9", "vgg11")  # the study's backbones; the pyramid comes with condition B
BASELINES = ("one_hemisphere", "bilateral_unspecialised", "unilateral", "resnet18", "resnet34", "ensemble")
CALLOSUM_KINDS = ("add", "gate", "concat")
CALLOSUM_DEPTHS = ("prep", "layer1", "layer2", "layer3")  # ResNet-9 depths, see callosum.py
CALLOSUM_TRAIN = ("connections", "all")


# More checks of validate, added by modules that know what config does not (registry.py adds
# the check of stage_epochs' stage names): config.py imports nothing of this package.
CHECKS: list = []


def short(value, n: int = 60) -> str:
    """A value as an error message quotes it (repr): at most n characters of it."""
    return clip(repr(value), n)


def clip(text: str, n: int = 60) -> str:
    """Text in an error message: at most n characters, then how long it was."""
    text = str(text)
    return text if len(text) <= n else text[:n] + f"... ({len(text):,} characters)"


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
    # the fewest channels a pyramid stage (left hemisphere of B, D) keeps: at width 1/8 the
    # pyramid ends in 8 features and fails to train; 0 = none (the paper's widths at width 1)
    pyramid_floor: int = 0
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
    schedule: str | None = None        # lr schedule; None: the recipe's (SCHEDULES)
    warmup_epochs: float = 1.0         # wsd: warm-up epochs, the same for every budget
    decay_frac: float = 0.2            # wsd: the last ceil(decay_frac x epochs) epochs decay to 0
    # wsd budgets: keep_at keeps the checkpoints of these epochs (checkpoint-e<k>.pt);
    # branch_from is an experiment folder holding this run at a longer budget, whose kept
    # checkpoint at this budget's decay start the run starts from (sweep --grid epochs=...)
    keep_at: list[int] = field(default_factory=list)
    branch_from: str | None = None
    # epochs per stage, over `epochs` (e.g. {resnet34: 12}): deep baselines converge slower
    stage_epochs: dict[str, int] = field(default_factory=dict)
    weight_decay_equal: bool = False   # True: the hemispheres' weight decay for every stage
    # k-WTA at evaluation: threshold = per-channel thresholds tracked in training (keeps the
    # training sparsity, batch-independent); map_only = the per-map stage only; batch = both
    # stages on the test batch (the original's batch-dependent predictions)
    kwta_eval: str = "threshold"
    # unilateral pool and ensembles
    member: int = 0                    # index of a unilateral run in the ensemble pool
    pool_size: int = 10
    ensemble_size: int = 2             # members of one ensemble run
    ensemble_sizes: list[int] = field(default_factory=lambda: [2, 5])  # the study's ensembles
    # what the pipeline runs
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    slurm: dict = field(default_factory=dict)  # sweep --executor slurm: job options (SLURM_KEYS)
    grid: dict = field(default_factory=dict)   # {key: [values]}: one experiment per combination
    # engine
    device: str = "auto"
    # float32, or bfloat16 autocast; auto: AMP on CUDA (bf16, or fp16 with a scaler), and on a
    # CPU bf16 only where a measurement at start finds it faster (train.resolve_precision). A
    # run's record holds the resolved value: a bf16 run is never an fp32 one.
    precision: str = "auto"
    amp: bool = True                   # replaced by precision; kept so that old files read the same
    channels_last: bool = True         # CUDA; CPU from width 1/16 (train.use_channels_last)
    compile: bool = False
    progress: bool = True
    threads: int | None = None         # torch CPU threads; None leaves torch's choice
    pack: str = "auto"                 # train runs differing only in seed/member as one packed model: on, off, auto = on CUDA


CHOICES = {
    "dataset": DATASETS, "backbone": BACKBONE_CHOICES, "condition": CONDITIONS,
    "recipe": RECIPES, "side": SIDES, "report_epoch": REPORTS, "kwta_eval": KWTA_EVAL,
    "callosum": CALLOSUM_KINDS, "callosum_train": CALLOSUM_TRAIN, "pack": ("auto", "on", "off"),
    "precision": ("auto", "fp32", "bf16"),
}
SCHEDULES = ("constant", "warmup_linear", "wsd")
LIST_CHOICES = {"conditions": CONDITIONS, "baselines": BASELINES,
                "callosum_at": CALLOSUM_DEPTHS, "callosum_kinds": CALLOSUM_KINDS}

# Keys that do not change what a run computes, so a finished run with other values is the
# same run (a different device is allowed to pick up where another left off).
NOT_IDENTITY = {"out_dir", "data_dir", "progress", "conditions", "baselines", "device", "slurm", "grid",
                "threads", "ensemble_sizes", "pool_size", "callosum_kinds", "pack", "keep_at",
                "branch_from", "amp"}
# A key missing from a record reads as this value rather than the field's default: records
# written before `precision` existed are float32 runs (every one of them trained on a CPU).
RECORD_DEFAULTS = {"precision": "fp32"}


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
            raise ConfigError(f"{key}: expected a list, got {short(value)}{_hint(key)}")
        return [_check_type(key, v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
        return {_check_type(key, k, args[0]): _check_type(key, v, args[1]) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {short(value)}"
                          f" ({type(value).__name__}){_hint(key)}")
    return value


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def validate(cfg: Config) -> Config:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: unknown value {short(getattr(cfg, key))}; allowed: {', '.join(allowed)}")
    if not cfg.amp:
        raise ConfigError("amp: false is replaced by precision: fp32 (precision: auto | fp32 | "
                          "bf16; auto is AMP on CUDA); remove amp from the parameters")
    for key, allowed in LIST_CHOICES.items():
        for v in getattr(cfg, key):
            if v not in allowed:
                raise ConfigError(f"{key}: unknown value {short(v)}; allowed: {', '.join(allowed)}")
    positive = ["width", "synthetic_size", "pool_size", "ensemble_size", "backbone_lr_scale"] + [
        k for k in ("epochs", "batch_size", "lr", "subset_per_class", "threads") if getattr(cfg, k) is not None]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {getattr(cfg, key)}")
    if cfg.schedule is not None and cfg.schedule not in SCHEDULES:
        raise ConfigError(f"schedule: unknown value {short(cfg.schedule)}; allowed: "
                          f"{', '.join(SCHEDULES)} (or leave it out for the recipe's)")
    if not 0 < cfg.decay_frac < 1 or cfg.warmup_epochs <= 0:
        raise ConfigError(f"decay_frac must be in (0, 1) and warmup_epochs positive, got "
                          f"{cfg.decay_frac} and {cfg.warmup_epochs}")
    for check in CHECKS:
        check(cfg)
    if cfg.pyramid_floor < 0:
        raise ConfigError(f"pyramid_floor: must be 0 (none) or a number of channels, got {cfg.pyramid_floor}")
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
        raise ConfigError(f"device: unknown value {short(cfg.device)}; allowed: auto, cpu, cuda, cuda:N, mps")
    _check_name(cfg.experiment)
    _check_slurm(cfg.slurm)
    _check_grid(cfg.grid)
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


def _check_name(name):
    """The experiment is one folder under out_dir: no separators, no '..', nothing invisible."""
    bad = (name in ("", ".", "..") or "/" in name or "\\" in name or name != name.strip()
           or any(not ch.isprintable() for ch in name) or len(name.encode()) > 200)
    if bad:
        raise ConfigError(f"experiment: {short(name)} is not a folder name; use letters, digits, "
                          f"'-', '_' or '.', without '/', '\\' or a bare '..', at most 200 bytes")


def check_device(name: str):
    """At run time (not in validate: a config may be checked on one machine and run on another),
    a device this machine has, or a ConfigError saying which devices it has."""
    import torch
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    index = int(name.split(":", 1)[1]) if name.startswith("cuda:") and name[5:].isdigit() else 0
    if name.startswith("cuda") and index >= cuda or name == "mps" and not mps:
        have = ["cpu"] + [f"cuda:{i}" for i in range(cuda)] + (["mps"] if mps else [])
        raise ConfigError(f"device: {name!r} is not available on this machine (it has "
                          f"{', '.join(have)}); set device=auto or device=cpu")


# `slurm:` in a params file (or --partition ... on the command line): per-job options of
# `sweep --executor slurm`; time in minutes, mem_gb per job, setup: shell lines run first.
SLURM_KEYS = {"partition": str, "account": str, "qos": str, "constraint": str, "time": int,
              "gpus": int, "cpus": int, "mem_gb": float, "max_parallel": int, "setup": list[str]}
GRID_EXCLUDED = ("experiment", "out_dir", "slurm", "grid")


def _check_slurm(options: dict):
    for key, value in options.items():
        if key not in SLURM_KEYS:
            raise ConfigError(f"slurm.{clip(key)}: unknown option; allowed: {', '.join(SLURM_KEYS)}")
        value = _check_type(f"slurm.{key}", value, SLURM_KEYS[key])
        if key in ("time", "gpus", "cpus", "mem_gb", "max_parallel") and value < (key != "gpus"):
            raise ConfigError(f"slurm.{key}: must be {'>= 0' if key == 'gpus' else 'positive'}, got {value}")


def _check_grid(grid: dict):
    for key, values in grid.items():
        if key not in FIELD_TYPES or key in GRID_EXCLUDED:
            allowed = [k for k in FIELD_TYPES if k not in GRID_EXCLUDED]
            raise ConfigError(f"grid.{clip(key)}: not a parameter a grid can vary; allowed: {', '.join(allowed)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {short(values)}")
        for v in values:
            _check_type(f"grid.{key}", v, _HINTS[key])


def from_dict(values: dict) -> Config:
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown parameter(s): {clip(', '.join(map(str, unknown)), 200)}; "
                          f"allowed: {', '.join(FIELD_TYPES)}")
    if isinstance(values.get("pack"), bool):  # YAML reads an unquoted `pack: on/off` as true/false
        values = {**values, "pack": "on" if values["pack"] else "off"}
    typed = {k: _check_type(k, v, _HINTS[k]) for k, v in values.items()}
    return validate(Config(**typed))


MAX_VALUE_CHARS = 10_000        # one --set/--grid value
MAX_PARAMS_BYTES = 1_000_000    # a params file (the presets are about 1 KB)


def parse_value(raw: str, what: str):
    """One value from the command line (`--set`, `--grid`), read as YAML by the same loader as
    params files: no aliases, no tags that build objects, a bounded size."""
    if len(raw) > MAX_VALUE_CHARS:
        raise ConfigError(f"{what}: the value is {len(raw):,} characters long; at most "
                          f"{MAX_VALUE_CHARS:,}")
    try:
        return yaml.load(raw, Loader=_UniqueKeys) if raw.strip() else None  # safe: a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: the value is not valid YAML ({_yaml_why(e)}); "
                          f"write it as YAML, in quotes if it is text") from None


def parse_overrides(items) -> dict:
    """`--set key=value` pairs (or a dict, as papermill passes); values are read as YAML."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {short(item)}")
        key, raw = item.split("=", 1)
        out[key.strip()] = parse_value(raw, f"--set {clip(item, 80)}")
    return out


def _yaml_why(e) -> str:
    """A YAML error in one line: what, and where (1-based line and column)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return clip(where + (getattr(e, "problem", None) or str(e).splitlines()[0]), 200)


class _UniqueKeys(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error (PyYAML keeps the last one
    silently, so `epochs: 1` further down a file would quietly win), and that aliases are
    refused: a few hundred bytes of nested aliases expand to gigabytes (a "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed; "
                                              "write the value out", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_params(path) -> dict:
    """A params file as a dict; every way it can be wrong is a ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"params file {path} is a directory; give a YAML file such as "
                          f"params/smoke.yaml")
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a params file holds at most "
                          f"{MAX_PARAMS_BYTES:,} (the presets are about 1 KB)")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeys)  # safe: a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_why(e)}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as text ({e})") from None
    if values is None:  # an empty file is more likely a mistake than a wish for every default
        raise ConfigError(f"{path} is empty; write the parameters in it (see params/smoke.yaml), "
                          f"or write {{}} to run every default on purpose")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(values).__name__}")
    return values


def load(path=None, overrides=None) -> Config:
    values = {}
    if path is not None:
        values = read_params(path)
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
    defaults = {**dataclasses.asdict(Config()), **RECORD_DEFAULTS}
    get = lambda d, k: d[k] if k in d else defaults.get(k)  # noqa: E731
    keys = sorted(set(a) | set(b))
    return [f"{k}: {get(a, k)!r} -> {get(b, k)!r}" for k in keys if get(a, k) != get(b, k)]
