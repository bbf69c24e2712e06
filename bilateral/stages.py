"""Every stage of the study as one function call: `run_stage(stage, cfg, seed)`.

What each stage is (its fields, name, heads, builder, upstream runs) is declared in plan.py;
this module builds the models and trains. A stage trains its model with `train.fit` and records
the run under outputs/<experiment>/<stage>/<name>/seed=<k>/, with the sha256 of every upstream
model.pt it was built on. The bilateral stage and the ensembles read the runs they build on from
those records, so the stages can run in separate processes.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch

from . import config as C
from . import data, models, plan, runs, train
from .seeds import derive_seed


# ---------------------------------------------------------------------------- configs and names
# Each stage is declared once in plan.py; these keep the older call forms working.

def stage_config(cfg: C.Config, stage: str) -> C.Config:
    return plan.stage_config(cfg, stage)


def run_name(stage: str, cfg: C.Config) -> str:
    return plan.spec(stage).run_name(cfg)


def run_seed(stage: str, name: str, seed: int) -> int:
    """A distinct, stable torch seed per run: pool members and the two hemispheres of a seed
    must not start from the same weights by accident."""
    return derive_seed(seed, "run", stage, name)


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
    cl = train.use_channels_last(cfg, device)
    eval_bs = max(batch_size, 512)
    return (data.DeviceLoader(train_split, batch_size, device=device, shuffle=True, augment=augment,
                              seed=seed, subset_per_class=cfg.subset_per_class, channels_last=cl),
            data.DeviceLoader(val_split, eval_bs, device=device, shuffle=False, augment=False,
                              channels_last=cl),
            data.DeviceLoader(test_split, eval_bs, device=device, shuffle=False, augment=False,
                              channels_last=cl),
            train_split.hierarchy)


# ---------------------------------------------------------------------------------- models

def hemisphere_arch(cfg: C.Config, side: str) -> tuple[str, bool]:
    """(backbone name, k-WTA on?) of a hemisphere: conditions B and D give the left the
    pyramid, C and D put k-WTA into both."""
    name = "resnet9_pyramid" if side == "left" and cfg.condition in ("B", "D") else cfg.backbone
    return name, cfg.condition in ("C", "D")


def hemisphere_backbone(cfg: C.Config, side: str) -> torch.nn.Module:
    name, kwta = hemisphere_arch(cfg, side)
    kw = dict(k=cfg.kwta_k, k_batch=cfg.kwta_k_batch, kwta_eval=cfg.kwta_eval) if kwta else {}
    return models.build_backbone(name, cfg.width, bn_momentum=cfg.bn_momentum, **kw)


def hemisphere_model(cfg, side, hier) -> models.Unilateral:
    heads = ("fine",) if side == "left" else ("coarse",)
    return models.Unilateral(hemisphere_backbone(cfg, side), hier.n_fine, hier.n_coarse,
                             heads=heads, dropout=cfg.dropout)


def unspecialised_model(cfg, hier) -> models.Bilateral:
    return models.Bilateral(hemisphere_backbone(cfg, "left"), hemisphere_backbone(cfg, "right"),
                            hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


def dual_head_model(backbone: str, cfg, hier) -> models.Unilateral:
    bb = models.build_backbone(backbone, cfg.width, bn_momentum=cfg.bn_momentum)
    return models.Unilateral(bb, hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


def build_model(stage, cfg, hier, seed=0):
    """A stage's untrained model (the bilateral one: the hemispheres of `seed`, frozen)."""
    build = plan.spec(stage).build
    if build is None:
        raise ValueError(f"stage {stage!r} has no model of its own to build")
    return build(plan.stage_config(cfg, stage), hier, seed)


def load_run_model(stage, cfg, seed, hier, device="cpu"):
    """The trained model of a finished run, rebuilt from its config and loaded strictly."""
    return plan.Run(stage, cfg, seed).load_model(hier, device)


def load_hemisphere(cfg, side, seed, hier):
    c = dataclasses.replace(cfg, side=side)
    return load_run_model("hemisphere", c, seed, hier).backbone


def load_bilateral(cfg, seed, hier):
    """Frozen, specialised hemispheres of this seed and condition, joined by new heads."""
    left = models.freeze(load_hemisphere(cfg, "left", seed, hier))
    right = models.freeze(load_hemisphere(cfg, "right", seed, hier))
    return models.Bilateral(left, right, hier.n_fine, hier.n_coarse, dropout=cfg.dropout)


# --------------------------------------------------------------------------------- running

def run_stage(stage: str, cfg: C.Config, seed: int, force: bool = False, log=print) -> dict:
    """Train (or, if already finished with the same config, just read) one run; return its
    metrics. A run whose upstream runs were retrained since it was built is refused (stale),
    unless `force`, which retrains it. Bad data stops before the run folder is claimed; a second
    process asking for a run in progress refuses (runs.RunLocked)."""
    run = plan.Run(stage, C.validate(cfg), seed)
    data.check_splits(load_splits(run.cfg))  # bad data stops before the run folder is claimed
    C.check_device(run.cfg.device)
    with runs.claim(run.path):
        return _run_claimed(run, force, log)


def _run_claimed(run, force, log):
    done = check_claimed(run, force, log)
    if done is not None:
        return done
    if run.cfg.threads:
        torch.set_num_threads(run.cfg.threads)
    device = train.pick_device(run.cfg.device)
    if device.type == "cpu":
        train.keep_freed_memory()
    t0 = time.perf_counter()
    say = lambda m: log(f"{tag(run)} {m}")  # noqa: E731
    metrics = _train(run, device, say) if run.spec.build else _ensemble(run, device, say)
    return seal(run, metrics, time.perf_counter() - t0, log)


def tag(run) -> str:
    return f"[{run.stage} {run.name} seed={run.seed}]"


def check_claimed(run, force, log) -> dict | None:
    """A claimed run's folder checked before training: its metrics when it is finished with
    the same config, None when it is to be trained (or resumed); stale or foreign: raises."""
    path = run.path
    status = runs.prepare(path, C.identity(run.cfg), force, rebuild=run.command())  # checks the records
    changed = run.changed_upstream() if status != "new" else []  # force has cleared a stale run
    if changed:
        raise runs.RunConflict(f"{run.key} is stale: it was built on {', '.join(changed)}, "
                               f"retrained or removed since; use --force to retrain it")
    if status == "done":
        log(f"{tag(run)} already finished with the same config: {path}")
        return runs.read_json(path / "metrics.json")
    return None


def seal(run, metrics, wall_s, log) -> dict:
    """The end of every training: wall time, metrics.json with model.pt's sha256, a log line."""
    metrics["wall_s"] = wall_s
    runs.finish(run.path, metrics)
    log(f"{tag(run)} done in {metrics['wall_s']:.0f}s: " + ", ".join(
        f"test {k} {v:.2%}" for k, v in metrics["test"].items()))
    return metrics


def _record(run, device, extra):
    """config.json: the config, provenance, and the sha256 of every upstream model.pt."""
    rec = {"config": C.identity(run.cfg), "resolved": dataclasses.asdict(run.cfg),
           "stage": run.stage, "seed": run.seed, "upstream": plan.upstream_hashes(run),
           **runs.provenance(device), **extra}
    runs.write_json(run.path / "config.json", rec)


def _train(run, device, log):
    stage, cfg, seed, path = run.stage, run.cfg, run.seed, run.path
    hp = train.hyper(cfg, stage)
    rseed = run_seed(stage, run.name, seed)
    torch.manual_seed(rseed)
    heads = run.heads
    heads_only = run.spec.heads_only
    cached = heads_only and not cfg.head_augment
    # head_augment: the stages built on frozen hemispheres (bilateral, callosal)
    augment = cfg.head_augment if "head_augment" in run.spec.uses else cfg.augment
    train_dl, val_dl, test_dl, hier = loaders(cfg, device, hp.batch_size, rseed, augment)
    model = run.spec.build(cfg, hier, seed).to(device)
    if train.use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if heads_only:
        forward, train_dl, val_dl, test_dl = bilateral_forward(model, train_dl, val_dl, test_dl,
                                                               cached, hp, rseed, device, cfg.amp)
    if cfg.compile:
        forward = torch.compile(forward)
    record_training(run, device, rseed, hp, model, cached, train_dl, val_dl)
    history, best = train.fit(
        model, forward, train_dl, val_dl, heads=heads, hp=hp, device=device,
        fine_to_coarse=hier.fine_to_coarse, ckpt_path=path / "checkpoint.pt", amp=cfg.amp,
        progress=cfg.progress, log=log, on_epoch=lambda h: runs.write_csv(path / "history.csv", h))
    return finish_model(run, model, forward, best, hp, hier, device, val_dl, test_dl)


def record_training(run, device, rseed, hp, model, cached, train_dl, val_dl):
    """config.json of a run that trains a model (packed or not)."""
    _record(run, device, {
        "name": run.name, "run_seed": rseed, "hyper": dataclasses.asdict(hp),
        "trainable_params": models.count_trainable(model), "total_params": models.count_total(model),
        "cached_features": cached, "n_train": train_dl.n, "n_val": val_dl.n})


def finish_model(run, model, forward, best, hp, hier, device, val_dl, test_dl) -> dict:
    """A trained model's metrics (last and best epoch, val and test) and its model.pt, the
    reported epoch's state (packed runs come here with each unpacked member)."""
    cfg, stage, heads = run.cfg, run.stage, run.heads
    f2c = hier.fine_to_coarse
    ev = lambda dl: train.evaluate(forward, dl, device, f2c, cfg.amp)  # noqa: E731
    out = {"val": {"last": ev(val_dl)}, "test_last": ev(test_dl)}
    if best["epoch"] == hp.epochs:  # the best state is the last one: the same numbers, unevaluated
        out["val"]["best"], out["test_best"] = out["val"]["last"], out["test_last"]
    else:
        last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best["state"])
        out["val"]["best"], out["test_best"] = ev(val_dl), ev(test_dl)
        if cfg.report_epoch == "last":
            model.load_state_dict(last_state)
    runs.save_torch(run.path / "model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    # not the bilateral heads: they were trained on features made under one rule (and cached)
    kwta = {} if stage == "bilateral" else kwta_test_metrics(model, ev, test_dl,
                                                             out[f"test_{cfg.report_epoch}"])
    return {"test": out[f"test_{cfg.report_epoch}"], "test_last": out["test_last"],
            "test_best": out["test_best"], "val": out["val"][cfg.report_epoch], "val_all": out["val"],
            "best_epoch": best["epoch"], "epochs": hp.epochs, "report": cfg.report_epoch,
            "heads": list(heads), **kwta}


def kwta_test_metrics(model, ev, test_dl, own_test=None) -> dict:
    """The reported model's test metrics under every k-WTA evaluation rule (conditions C, D):
    the rule changes evaluation only, so one trained run shows them all side by side
    ({"test_kwta_threshold": {...}, "test_kwta_map_only": ..., "test_kwta_batch": ...}).
    own_test: the model's test metrics under its own rule, already computed (not redone)."""
    own = models.set_kwta_eval(model, "threshold")
    if own is None:
        return {}
    out = {}
    for rule in models.KWTA.EVAL_RULES:
        models.set_kwta_eval(model, rule)
        out[f"test_kwta_{rule}"] = own_test if rule == own and own_test is not None else ev(test_dl)
    models.set_kwta_eval(model, own)
    return out


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
    pool = plan.Run("ensemble", cfg, seed).upstream()
    missing = [r.command() for r in pool if r.status() != "finished"]
    if missing:
        raise FileNotFoundError(f"the ensemble needs {len(missing)} more unilateral runs of seed "
                                f"{seed}; make them with:\n  " + "\n  ".join(missing))
    return {r.cfg.member: r.metrics() for r in pool}


def _ensemble(run, device, log):
    """Top-k unilateral runs by validation accuracy (never test), logits averaged per head."""
    cfg, seed = run.cfg, run.seed
    pool = pool_metrics(cfg, seed)
    ranked = sorted(pool, key=lambda m: -train.score(pool[m]["val"], ("fine", "coarse")))
    chosen = sorted(ranked[:cfg.ensemble_size])
    _, val_dl, test_dl, hier = loaders(cfg, device, 512, 0, False)
    members = [load_run_model("unilateral", dataclasses.replace(cfg, member=m), seed, hier, device)
               for m in chosen]
    model = models.Ensemble(members).to(device).eval()
    _record(run, device, extra={"name": run.name, "members": chosen,
                                "trainable_params": models.count_trainable(model),
                                "total_params": models.count_total(model)})
    f2c = hier.fine_to_coarse
    val = train.evaluate(model, val_dl, device, f2c, cfg.amp)
    test = train.evaluate(model, test_dl, device, f2c, cfg.amp)
    log(f"members {chosen} chosen by validation accuracy from a pool of {cfg.pool_size}")
    return {"test": test, "val": val, "members": chosen, "report": "last",
            "pool_val": {m: pool[m]["val"] for m in pool}, "heads": ["fine", "coarse"]}
