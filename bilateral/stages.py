"""Every stage of the study as one function call: `run_stage(stage, cfg, seed)`.

A stage builds its model from the config, trains it with `train.fit` and records the run under
outputs/<experiment>/<stage>/<name>/seed=<k>/. The bilateral stage and the ensembles read the
runs they build on from those records, so the stages can run in separate processes.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import zlib

import torch

from . import config as C
from . import callosum, data, models, runs, train


# ---------------------------------------------------------------------------- configs and names

def stage_config(cfg: C.Config, stage: str) -> C.Config:
    """Reset the parameters a stage does not use, so they neither appear in its record nor
    make two identical runs look different."""
    if stage not in C.STAGES:
        raise C.ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(C.STAGES)}")
    d = C.Config()
    unused = {"side", "member", "ensemble_size", "head_augment"}
    if stage == "hemisphere":
        unused -= {"side"}
    if stage in ("bilateral", "callosal"):
        unused -= {"head_augment"}
    unused |= callosum.unused_fields(stage, cfg)
    if stage == "unilateral":
        unused -= {"member"}
    if stage == "ensemble":
        unused -= {"ensemble_size"}
    if stage in ("unilateral", "resnet18", "resnet34", "ensemble"):
        unused |= {"condition"}
    if stage in ("resnet18", "resnet34"):
        unused |= {"backbone"}
    if stage == "ensemble":  # pool members are trained by the unilateral stage
        unused |= {"augment"}
    cond = d.condition if "condition" in unused else cfg.condition
    if cond not in ("C", "D"):
        unused |= {"kwta_k", "kwta_k_batch", "kwta_eval_batch"}
    return dataclasses.replace(cfg, **{k: getattr(d, k) for k in unused})


def run_name(stage: str, cfg: C.Config) -> str:
    if stage == "hemisphere":
        return f"{cfg.backbone}-{cfg.condition}-{cfg.side}"
    if stage in ("bilateral", "bilateral_unspecialised"):
        return f"{cfg.backbone}-{cfg.condition}"
    if stage == "unilateral":
        return f"{cfg.backbone}-m{cfg.member}"
    if stage == "ensemble":
        return f"{cfg.backbone}-k{cfg.ensemble_size}"
    if stage in callosum.STAGES:
        return callosum.run_name(stage, cfg)
    return stage  # resnet18, resnet34


def run_seed(stage: str, name: str, seed: int) -> int:
    """A distinct, stable torch seed per run: pool members and the two hemispheres of a seed
    must not start from the same weights by accident."""
    return zlib.crc32(f"{stage}/{name}/{seed}".encode())


def train_command(stage, cfg, seed, params="params/<preset>.yaml") -> str:
    sets = {"hemisphere": f" --set condition={cfg.condition} --set side={cfg.side}",
            "unilateral": f" --set member={cfg.member}"}.get(stage, "")
    return f"python -m bilateral train {stage} --params {params} --seed {seed}{sets}"


# ------------------------------------------------------------------------------------ data

@functools.lru_cache(maxsize=4)
def _splits(dataset, data_dir, val_size, split_seed, synthetic_size):
    kw = dict(data_dir=data_dir, val_size=val_size, split_seed=split_seed)
    if dataset == "synthetic":  # the images themselves are drawn from the split seed
        kw.update(size=synthetic_size, seed=split_seed)
    return tuple(data.load_dataset(dataset, s, **kw) for s in ("train", "val", "test"))


def load_splits(cfg: C.Config):
    return _splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.synthetic_size)


def loaders(cfg, device, batch_size, seed, augment):
    train_split, val_split, test_split = load_splits(cfg)
    cl = cfg.channels_last and torch.device(device).type == "cuda"
    eval_bs = max(batch_size, 512)
    return (data.DeviceLoader(train_split, batch_size, device=device, shuffle=True, augment=augment,
                              seed=seed, subset_per_class=cfg.subset_per_class, channels_last=cl),
            data.DeviceLoader(val_split, eval_bs, device=device, shuffle=False, augment=False,
                              channels_last=cl),
            data.DeviceLoader(test_split, eval_bs, device=device, shuffle=False, augment=False,
                              channels_last=cl),
            train_split.hierarchy)


# ---------------------------------------------------------------------------------- models

def hemisphere_backbone(cfg: C.Config, side: str) -> torch.nn.Module:
    name = "resnet9_pyramid" if side == "left" and cfg.condition in ("B", "D") else cfg.backbone
    kwta = {}
    if cfg.condition in ("C", "D"):
        kwta = dict(k=cfg.kwta_k, k_batch=cfg.kwta_k_batch, kwta_eval_batch=cfg.kwta_eval_batch)
    return models.build_backbone(name, cfg.width, bn_momentum=cfg.bn_momentum, **kwta)


def hemisphere_model(cfg, side, hier) -> models.Unilateral:
    heads = ("fine",) if side == "left" else ("coarse",)
    return models.Unilateral(hemisphere_backbone(cfg, side), hier.n_fine, hier.n_coarse,
                             heads=heads, dropout=cfg.dropout)


def build_model(stage, cfg, hier):
    n = dict(n_fine=hier.n_fine, n_coarse=hier.n_coarse)
    if stage == "hemisphere":
        return hemisphere_model(cfg, cfg.side, hier)
    if stage == "bilateral_unspecialised":
        return models.Bilateral(hemisphere_backbone(cfg, "left"), hemisphere_backbone(cfg, "right"),
                                dropout=cfg.dropout, **n)
    if stage == "unilateral":
        bb = models.build_backbone(cfg.backbone, cfg.width, bn_momentum=cfg.bn_momentum)
        return models.Unilateral(bb, dropout=cfg.dropout, **n)
    if stage in ("resnet18", "resnet34"):
        bb = models.build_backbone(stage, cfg.width, bn_momentum=cfg.bn_momentum)
        return models.Unilateral(bb, dropout=cfg.dropout, **n)
    if stage == "callosal_unspecialised":
        return callosum.build_unspecialised(cfg, hier)
    raise ValueError(f"stage {stage!r} has no model of its own to build")


def load_run_model(stage, cfg, seed, hier, device="cpu"):
    """The trained model of a finished run, rebuilt from its config and loaded strictly."""
    cfg = stage_config(cfg, stage)
    path = runs.run_dir(cfg, stage, run_name(stage, cfg), seed)
    if not runs.finished(path):
        raise FileNotFoundError(f"{stage} run {path} is missing or unfinished; make it with:\n  "
                                f"{train_command(stage, cfg, seed)}")
    model = upstream_model(stage, cfg, seed, hier)
    state = runs.load_torch(path / "model.pt")
    models.load_state_strict(model, state, what=f"{stage} run {path}")
    return model.to(device).eval()


def upstream_model(stage, cfg, seed, hier):
    """The model a run trains, built on its upstream runs where it has any."""
    if stage == "bilateral":
        return load_bilateral(cfg, seed, hier)
    if stage == "callosal":
        return callosum.load_callosal(cfg, seed, hier)
    return build_model(stage, cfg, hier)


def load_hemisphere(cfg, side, seed, hier):
    c = dataclasses.replace(cfg, side=side)
    return load_run_model("hemisphere", c, seed, hier).backbone


def load_bilateral(cfg, seed, hier):
    """Frozen, specialised hemispheres of this seed and condition, joined by new heads."""
    left = models.freeze(load_hemisphere(cfg, "left", seed, hier))
    right = models.freeze(load_hemisphere(cfg, "right", seed, hier))
    return models.Bilateral(left, right, hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


# --------------------------------------------------------------------------------- running

def heads_of(stage, cfg):
    if stage == "hemisphere":
        return ("fine",) if cfg.side == "left" else ("coarse",)
    return ("fine", "coarse")


def run_stage(stage: str, cfg: C.Config, seed: int, force: bool = False, log=print) -> dict:
    """Train (or, if already finished with the same config, just read) one run; return its
    metrics."""
    cfg = stage_config(C.validate(cfg), stage)
    name = run_name(stage, cfg)
    path = runs.run_dir(cfg, stage, name, seed)
    tag = f"[{stage} {name} seed={seed}]"
    status = runs.prepare(path, C.identity(cfg), force)
    if status == "done":
        log(f"{tag} already finished with the same config: {path}")
        return runs.read_json(path / "metrics.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = train.pick_device(cfg.device)
    t0 = time.perf_counter()
    if stage == "ensemble":
        metrics = _ensemble(cfg, seed, device, path, log=lambda m: log(f"{tag} {m}"))
    else:
        metrics = _train(stage, cfg, seed, device, path, status, log=lambda m: log(f"{tag} {m}"))
    metrics["wall_s"] = time.perf_counter() - t0
    runs.write_json(path / "metrics.json", metrics)
    (path / "checkpoint.pt").unlink(missing_ok=True)
    log(f"{tag} done in {metrics['wall_s']:.0f}s: " + ", ".join(
        f"test {k} {v:.2%}" for k, v in metrics["test"].items()))
    return metrics


def _record(path, cfg, stage, seed, device, extra):
    rec = {"config": C.identity(cfg), "resolved": dataclasses.asdict(cfg), "stage": stage,
           "seed": seed, **runs.provenance(device), **extra}
    runs.write_json(path / "config.json", rec)


def _train(stage, cfg, seed, device, path, status, log):
    hp = train.hyper(cfg, stage)
    rseed = run_seed(stage, run_name(stage, cfg), seed)
    torch.manual_seed(rseed)
    heads = heads_of(stage, cfg)
    cached = stage == "bilateral" and not cfg.head_augment
    augment = cfg.head_augment if stage in ("bilateral", "callosal") else cfg.augment
    train_dl, val_dl, test_dl, hier = loaders(cfg, device, hp.batch_size, rseed, augment)
    model = upstream_model(stage, cfg, seed, hier).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if stage == "bilateral":
        forward, train_dl, val_dl, test_dl = bilateral_forward(model, train_dl, val_dl, test_dl,
                                                               cached, hp, rseed, device, cfg.amp)
    if cfg.compile:
        forward = torch.compile(forward)
    _record(path, cfg, stage, seed, device, {
        "name": run_name(stage, cfg), "run_seed": rseed, "hyper": dataclasses.asdict(hp),
        "trainable_params": models.count_trainable(model), "cached_features": cached,
        "n_train": train_dl.n})
    history, best = train.fit(
        model, forward, train_dl, val_dl, heads=heads, hp=hp, device=device,
        fine_to_coarse=hier.fine_to_coarse, ckpt_path=path / "checkpoint.pt", amp=cfg.amp,
        progress=cfg.progress, log=log, on_epoch=lambda h: runs.write_csv(path / "history.csv", h))
    f2c = hier.fine_to_coarse
    last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ev = lambda dl: train.evaluate(forward, dl, device, f2c, cfg.amp)  # noqa: E731
    out = {"val": {"last": ev(val_dl)}, "test_last": ev(test_dl)}
    model.load_state_dict(best["state"])
    out["val"]["best"], out["test_best"] = ev(val_dl), ev(test_dl)
    if cfg.report_epoch == "last":
        model.load_state_dict(last_state)
    runs.save_torch(path / "model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    return {"test": out[f"test_{cfg.report_epoch}"], "test_last": out["test_last"],
            "test_best": out["test_best"], "val": out["val"][cfg.report_epoch], "val_all": out["val"],
            "best_epoch": best["epoch"], "epochs": hp.epochs, "report": cfg.report_epoch,
            "heads": list(heads)}


def bilateral_forward(model, train_dl, val_dl, test_dl, cached, hp, seed, device, amp):
    """The bilateral heads see frozen hemispheres. Without augmentation the hemispheres'
    features never change, so compute them once and train the heads on the cache (the
    original recomputed them every batch); with augmentation run them without autograd."""
    if not cached:
        def forward(x):
            with torch.no_grad():
                feats = model.features(x)
            return model.classify(feats.float())
        return forward, train_dl, val_dl, test_dl
    feats = [cache_features(model, dl, device, amp) for dl in (train_dl, val_dl, test_dl)]
    return (model.classify,
            train.FeatureLoader(*feats[0], hp.batch_size, shuffle=True, seed=seed),
            train.FeatureLoader(*feats[1], 1024, shuffle=False),
            train.FeatureLoader(*feats[2], 1024, shuffle=False))


@torch.no_grad()
def cache_features(model, loader, device, amp=True):
    ctx, _ = train.autocast(device, amp)
    xs, fine, coarse = [], [], []
    model.eval()
    for batch in loader:
        with ctx:
            xs.append(model.features(batch["x"]).float())
        fine.append(batch["fine"])
        coarse.append(batch["coarse"])
    return torch.cat(xs), torch.cat(fine), torch.cat(coarse)


def pool_metrics(cfg, seed):
    """Validation metrics of every unilateral run in the ensemble pool of this seed."""
    found, missing = {}, []
    for m in range(cfg.pool_size):
        c = stage_config(dataclasses.replace(cfg, member=m), "unilateral")
        p = runs.run_dir(c, "unilateral", run_name("unilateral", c), seed)
        if runs.finished(p):
            found[m] = runs.read_json(p / "metrics.json")
        else:
            missing.append(train_command("unilateral", c, seed))
    if missing:
        raise FileNotFoundError(f"the ensemble needs {len(missing)} more unilateral runs of seed "
                                f"{seed}; make them with:\n  " + "\n  ".join(missing))
    return found


def _ensemble(cfg, seed, device, path, log):
    """Top-k unilateral runs by validation accuracy (never test), logits averaged per head."""
    pool = pool_metrics(cfg, seed)
    ranked = sorted(pool, key=lambda m: -train.score(pool[m]["val"], ("fine", "coarse")))
    chosen = sorted(ranked[:cfg.ensemble_size])
    _, val_dl, test_dl, hier = loaders(cfg, device, 512, 0, False)
    members = [load_run_model("unilateral", dataclasses.replace(cfg, member=m), seed, hier, device)
               for m in chosen]
    model = models.Ensemble(members).to(device).eval()
    _record(path, cfg, stage="ensemble", seed=seed, device=device, extra={
        "name": run_name("ensemble", cfg), "members": chosen,
        "trainable_params": models.count_trainable(model)})
    f2c = hier.fine_to_coarse
    val = train.evaluate(model, val_dl, device, f2c, cfg.amp)
    test = train.evaluate(model, test_dl, device, f2c, cfg.amp)
    log(f"members {chosen} chosen by validation accuracy from a pool of {cfg.pool_size}")
    return {"test": test, "val": val, "members": chosen, "report": "last",
            "pool_val": {m: pool[m]["val"] for m in pool}, "heads": ["fine", "coarse"]}
