"""One condition's inputs to the analyses, made once: its models, and their predictions and
features on the test split and on a sample of the train split.

`load(cfg, seed, condition)` reads the finished hemisphere, bilateral and (where its run
exists) bilateral_unspecialised runs of that condition and seed; nothing is trained here.
Every section of sections.py then works from the returned `Condition` without another pass
of a model over a split (Grad-CAM, which needs gradients, makes its own on a few images).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .. import data, plan, runs, train
from ..seeds import derive_seed
from . import measures

DEFAULTS = dict(
    cam_images=256,        # random test images for the localisation statistics
    cam_per_scenario=4,    # images per scenario in the Grad-CAM grids
    cam_frac=0.5,          # localisation: fraction of pixels >= cam_frac * peak
    max_pairs=5000,        # same-fine-label pairs per scenario for similarity (sampled)
    plot_pairs=1500,       # of those, points drawn per panel (a seeded shuffle, then the cut)
    probe_train=10000,     # train images the probes are fitted on (sampled); their mean
                           # feature also centres the head attribution
    probe_l2=1e-4,
    probe_iters=200,
    batch_size=256,
)
_POSITIVE_INTS = ("cam_images", "cam_per_scenario", "max_pairs", "plot_pairs", "probe_train",
                  "probe_iters", "batch_size")


def caps(**kw) -> dict:
    """DEFAULTS with the given overrides, each checked before any work."""
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown analysis parameter(s): {', '.join(sorted(unknown))}; "
                        f"allowed: {', '.join(DEFAULTS)}")
    p = {**DEFAULTS, **kw}
    for k in _POSITIVE_INTS:
        if isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 1:
            raise ValueError(f"analysis parameter {k} must be a positive int, got {p[k]!r}")
    if not 0 < float(p["cam_frac"]) <= 1:
        raise ValueError(f"analysis parameter cam_frac must be in (0, 1], got {p['cam_frac']!r}")
    if not float(p["probe_l2"]) >= 0:
        raise ValueError(f"analysis parameter probe_l2 must be >= 0, got {p['probe_l2']!r}")
    return p


# ------------------------------------------------------------------------------ the runs

def condition_runs(cfg, seed, condition) -> dict:
    """The runs one condition's analysis reads: {"left", "right", "bilateral",
    "unspecialised"} as plan.Run."""
    c = dataclasses.replace(cfg, condition=condition)
    return {"left": plan.Run("hemisphere", dataclasses.replace(c, side="left"), seed),
            "right": plan.Run("hemisphere", dataclasses.replace(c, side="right"), seed),
            "bilateral": plan.Run("bilateral", c, seed),
            "unspecialised": plan.Run("bilateral_unspecialised", c, seed)}


def available(cfg, seed, condition) -> bool:
    """Whether the bilateral run of this condition and seed, and its hemispheres, finished."""
    r = condition_runs(cfg, seed, condition)
    return all(r[k].status() == "finished" for k in ("left", "right", "bilateral"))


def ready(cfg, seed) -> list[str]:
    """The conditions of cfg.conditions that can be analysed for this seed."""
    return [c for c in cfg.conditions if available(cfg, seed, c)]


def generator(seed, *purpose) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "analysis", *purpose))


def out_dir(cfg, condition, seed) -> Path:
    return runs.experiment_dir(cfg) / "analysis" / condition / f"seed={seed}"


# --------------------------------------------------------------------------- the condition

@dataclasses.dataclass
class Condition:
    """What the sections of one condition's analysis share. `out` and `u_out` hold the test
    outputs (left_feat, right_feat, fine, coarse; `out` also left_logits and right_logits, the
    hemispheres' own heads), `train_out` and `u_train_out` the features of the train sample
    `train_idx`; `u_*` belong to bilateral_unspecialised, None where its run is missing."""
    cfg: object
    seed: int
    condition: str
    p: dict
    device: torch.device
    folder: Path
    train_split: object
    test_split: object
    hier: object
    left: object                 # hemisphere models (backbone + their own head)
    right: object
    bil: object                  # bilateral (frozen hemispheres + heads)
    unspec: object
    out: dict
    u_out: dict | None
    train_idx: torch.Tensor
    train_out: dict
    u_train_out: dict | None
    right_wrong: dict            # the four bool tensors of measures.OUTCOMES
    scen: torch.Tensor           # test image -> index into measures.SCENARIOS
    seconds: float               # wall time spent on this condition so far (load + sections)
    metrics: dict = dataclasses.field(default_factory=dict)

    def gen(self, *purpose):
        """A generator of its own for each use, e.g. gen("cam sample")."""
        return generator(self.seed, *purpose)

    @property
    def title(self):
        return f"condition {self.condition}, seed {self.seed}"

    def write_csv(self, name, df, index=False):
        runs.atomic_write_bytes(self.folder / name, df.to_csv(index=index).encode())


def load(cfg, seed: int, condition: str, device=None, **kw) -> Condition:
    """Load the models of one condition and seed and run them once over the test split and the
    probes' train sample. kw: analysis parameters overriding DEFAULTS."""
    p = caps(**kw)
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, condition=condition)
    if not available(cfg, seed, condition):  # the runs say which is missing, and its command
        for k in ("left", "right", "bilateral"):
            condition_runs(cfg, seed, condition)[k].check_finished()
    device = train.pick_device(cfg.device if device is None else device)
    train_split, _, test_split = data.load_splits(cfg)
    hier = test_split.hierarchy
    r = condition_runs(cfg, seed, condition)
    left, right, bil = (r[k].load_model(hier, device) for k in ("left", "right", "bilateral"))
    unspec = r["unspecialised"].load_model(hier, device) if r["unspecialised"].status() == "finished" else None

    n_tr = min(p["probe_train"], len(train_split))
    train_idx = torch.randperm(len(train_split), generator=generator(seed, "probe sample"))[:n_tr].sort().values
    test_dl = loader(test_split, device, p["batch_size"])
    train_dl = loader(subset(train_split, train_idx), device, p["batch_size"])
    run = lambda fn, dl: train.predict(fn, dl, device, cfg.amp)[0]  # noqa: E731
    out = run(outputs(bil, left.heads["fine"], right.heads["coarse"]), test_dl)
    train_out = run(features(bil), train_dl)
    u_out = u_train_out = None
    if unspec is not None:
        u_out = run(outputs(unspec), test_dl)
        u_train_out = run(features(unspec), train_dl)
    right_wrong = measures.correct(out, test_split.fine, test_split.coarse)
    return Condition(cfg=cfg, seed=seed, condition=condition, p=p, device=device,
                     folder=out_dir(cfg, condition, seed), train_split=train_split,
                     test_split=test_split, hier=hier, left=left, right=right, bil=bil,
                     unspec=unspec, out=out, u_out=u_out, train_idx=train_idx, train_out=train_out,
                     u_train_out=u_train_out, right_wrong=right_wrong,
                     scen=measures.scenario_index(right_wrong),
                     seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------- passes over data

def subset(split, idx):
    return data.Split(split.images[idx], split.fine[idx], split.coarse[idx], split.hierarchy, split.name)


def loader(split, device, batch_size):
    return data.DeviceLoader(split, batch_size, device=device, shuffle=False, augment=False)


def normalised(split, idx, device):
    """The images idx of a split as the models take them (one batch, no augmentation)."""
    dl = loader(subset(split, idx), device, max(1, len(idx)))
    return next(iter(dl))["x"]


def features(bil):
    """forward for train.predict: each hemisphere's features of a bilateral model."""
    def fn(x):
        o = bil(x, return_features=True)  # a callosal model's sides exchange maps on the way
        return {"left_feat": o["left"].float(), "right_feat": o["right"].float()}
    return fn


def outputs(bil, left_head=None, right_head=None):
    """forward for train.predict: features and heads of a bilateral model, and the hemisphere
    models' own heads on the same features (the hemispheres are the same frozen networks)."""
    def fn(x):
        o = bil(x, return_features=True)
        fl, fr = o["left"].float(), o["right"].float()
        out = {"left_feat": fl, "right_feat": fr, **bil.classify(torch.cat([fl, fr], 1))}
        if left_head is not None:
            out["left_logits"] = left_head(fl)
            out["right_logits"] = right_head(fr)
        return out
    return fn
