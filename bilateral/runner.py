"""Trains runs and writes their records: one sequence for every run, alone or packed.

`train_runs(runs)` is the whole of it, read top to bottom: check the data and device, claim every
run's folder (runs.claim), check each claimed folder (`check_claimed`: finished with the same
config -> its metrics; stale or foreign -> refused), then for the runs left: build each model
(`prepare`: its seed, loaders, upstream models, config.json), train (train.fit; several runs
of one packable group as one packed model), and seal each (`finish_model`, `seal`).

A run here is a plan.Run (stage, cfg, seed, path, spec, upstream(), build() ...); this
module reads those attributes and never imports plan.py, which builds on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import types
from pathlib import Path

import torch

from . import config as C
from . import data, models, packed, runs, train
from .seeds import derive_seed


def run_seed(stage: str, name: str, seed: int) -> int:
    """A distinct, stable torch seed per run: pool members and the two hemispheres of a seed
    must not start from the same weights by accident."""
    return derive_seed(seed, "run", stage, name)


def tag(run) -> str:
    return f"[{run.stage} {run.name} seed={run.seed}]"


# ------------------------------------------------------------------------------- precision

def identity(run) -> dict:
    """What decides what a run computes (config.identity), with its precision resolved: the
    record of a bf16 run is not an fp32 run's, whatever `precision: auto` chose where."""
    return {**C.identity(run.cfg), "precision": precision(run)}


def precision(run, device=None, log=print) -> str:
    """The precision `run` trains in on `device` (its config's by default): train.resolve_precision,
    measured where auto asks for it on the run's own architecture (precision_key)."""
    device = train.pick_device(run.cfg.device) if device is None else torch.device(device)
    key = precision_key(run, device)
    return train.resolve_precision(run.cfg.precision, device, key,
                                   lambda: precision_probe(run, device), log=log)


def precision_arch(run) -> str | None:
    """The architecture a run trains end to end, for the precision measurement; None for a run
    that trains no backbone of its own (heads on frozen hemispheres, callosal connections,
    ensembles): auto keeps those in float32 on a CPU."""
    if run.spec.build is None or run.spec.heads_only or run.spec.upstream(run.cfg):
        return None
    if run.stage == "hemisphere":
        name, kwta = models.hemisphere_arch(run.cfg, run.cfg.side)
        return name + "+kwta" * kwta
    if run.stage == "bilateral_unspecialised":
        return "+".join(n + "+kwta" * k for n, k in (models.hemisphere_arch(run.cfg, s) for s in C.SIDES))
    return architecture(run)


def precision_key(run, device) -> tuple | None:
    arch = precision_arch(run)
    if arch is None:
        return None
    bs = min(train.hyper(run.cfg, run.stage).batch_size, train.PRECISION_BATCH)
    return (torch.device(device).type, run.stage, arch, run.cfg.width, bs,
            train.use_channels_last(run.cfg, device))


def precision_probe(run, device):
    """(model, batch, heads) for train.measure_precision: the run's own untrained model, as
    training lays it out in memory, and one batch of random images."""
    key = precision_key(run, device)
    bs, cl = key[4], key[5]
    # drawn on the CPU in a forked stream: the probe runs while a run is being prepared, after
    # its seed, and must not move the random numbers its initialisation and loaders draw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hier = types.SimpleNamespace(n_fine=10, n_coarse=2)
        model = run.spec.build(run.cfg, hier, [])
        x = torch.randn(bs, 3, 32, 32)
        fine, coarse = torch.randint(0, 10, (bs,)), torch.randint(0, 2, (bs,))
    model, x = model.to(device), x.to(device)
    if cl:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, {"x": x, "fine": fine.to(device), "coarse": coarse.to(device)}, run.heads


def loaders(cfg, device, batch_size, seed, augment):
    train_split, val_split, test_split = data.load_splits(cfg)
    cl = train.use_channels_last(cfg, device)
    eval_bs = max(batch_size, 512)
    return (data.DeviceLoader(train_split, batch_size, device=device, shuffle=True, augment=augment,
                              seed=seed, subset_per_class=cfg.subset_per_class, channels_last=cl),
            data.DeviceLoader(val_split, eval_bs, device=device, shuffle=False, augment=False,
                              channels_last=cl),
            data.DeviceLoader(test_split, eval_bs, device=device, shuffle=False, augment=False,
                              channels_last=cl),
            train_split.hierarchy)


# ----------------------------------------------------------------------------------- train

def train_runs(group, force=False, log=print, wait=False) -> list[dict]:
    """Train (or, when finished with the same config, read) each run of `group`; their metrics.

    One run, or the runs of one packable group (`packable_groups`), trained as one packed model.
    `force`: one bool or one per run (retrain a finished, stale or different run). `wait`: a
    run another live process holds is waited for instead of refused (runs.RunLocked)."""
    group = list(group)
    forces = list(force) if isinstance(force, (list, tuple)) else [force] * len(group)
    cfg0 = group[0].cfg
    data.check_splits(data.load_splits(cfg0))  # bad data stops before any folder is claimed
    C.check_device(cfg0.device)
    if len(group) > 1 and len({pack_key(r) for r in group} | {None}) != 2:
        raise ValueError("runner.train_runs trains one run, or the runs of one packable group "
                         "(see runner.packable_groups)")
    with contextlib.ExitStack() as held:
        for r in group:
            held.enter_context(runs.claim(r.path, wait=wait, log=log))
        results = {j: check_claimed(r, f, log) for j, (r, f) in enumerate(zip(group, forces))}
        todo = [j for j, m in results.items() if m is None]
        if len(todo) > 1 and len({_ckpt_epoch(group[j].path / "checkpoint.pt") for j in todo}) > 1:
            for j in todo:  # members at different epochs resume one by one
                results[j] = train_claimed([group[j]], log)[0]
        elif todo:
            results.update(zip(todo, train_claimed([group[j] for j in todo], log)))
    return [results[j] for j in range(len(group))]


def check_claimed(run, force, log) -> dict | None:
    """A claimed run's folder checked before training: its metrics when it is finished with
    the same config, None when it is to be trained (or resumed); stale or foreign: raises."""
    path = run.path
    status = runs.prepare(path, identity(run), force, rebuild=run.command())  # checks the records
    changed = run.changed_upstream() if status != "new" else []  # force has cleared a stale run
    if changed:
        raise runs.RunConflict(f"{run.key} is stale: it was built on {', '.join(changed)}, "
                               f"retrained or removed since; use --force to retrain it")
    if status == "done":
        log(f"{tag(run)} already finished with the same config: {path}")
        return runs.read_json(path / "metrics.json")
    return None


def train_claimed(group, log) -> list[dict]:
    """Train claimed runs (one, or one packable group) and seal each; their metrics."""
    cfg0 = group[0].cfg
    if cfg0.threads:
        torch.set_num_threads(cfg0.threads)
    device = train.pick_device(cfg0.device)
    if device.type == "cpu":
        train.keep_freed_memory()
    t0 = time.perf_counter()
    if group[0].spec.build is None:
        say = lambda m: log(f"{tag(group[0])} {m}")  # noqa: E731
        return [seal(group[0], evaluate_ensemble(group[0], device, say), time.perf_counter() - t0, log)]
    hp = train.hyper(cfg0, group[0].stage)
    built = [prepare(r, device, hp) for r in group]
    if len(group) == 1:
        fitted = [_fit_one(group[0], built[0], device, hp, log)]
    else:
        fitted = _fit_packed(group, built, device, hp, log)
    out = []
    for r, b, (model, forward, best, dls) in zip(group, built, fitted):
        metrics = finish_model(r, model, forward, best, hp, b["hier"], device, *dls)
        out.append(seal(r, metrics, (time.perf_counter() - t0) / len(group), log))
    return out


def prepare(run, device, hp) -> dict:
    """A run's untrained model, loaders and config.json, in the order that fixes its numbers:
    the run's seed, its loaders, its upstream models (loaded as they are hashed), its model."""
    cfg = run.cfg
    rseed = run_seed(run.stage, run.name, run.seed)
    torch.manual_seed(rseed)
    # head_augment: the stages built on frozen hemispheres (bilateral, callosal)
    augment = cfg.head_augment if "head_augment" in run.spec.uses else cfg.augment
    train_dl, val_dl, test_dl, hier = loaders(cfg, device, hp.batch_size, rseed, augment)
    hashes = {}
    model = run.build(hier, hashes)
    generator = member_generator(device, rseed)  # continues the stream a packed member draws from
    cached = run.spec.heads_only and not cfg.head_augment
    record(run, device, hashes, {
        "name": run.name, "run_seed": rseed, "hyper": dataclasses.asdict(hp),
        "trainable_params": models.count_trainable(model), "total_params": models.count_total(model),
        "cached_features": cached, "n_train": train_dl.n, "n_val": val_dl.n})
    return dict(model=model, loaders=(train_dl, val_dl, test_dl), hier=hier, rseed=rseed,
                generator=generator, cached=cached)


def _fit_one(run, b, device, hp, log):
    cfg, path = run.cfg, run.path
    prec = precision(run, device, log)
    model = b["model"].to(device)
    if train.use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    forward, (train_dl, val_dl, test_dl) = model, b["loaders"]
    if run.spec.heads_only:
        forward, train_dl, val_dl, test_dl = bilateral_forward(
            model, train_dl, val_dl, test_dl, b["cached"], hp, b["rseed"], device, prec)
    if cfg.compile:
        forward = torch.compile(forward)
    branch(run, hp, log)
    history, best = train.fit(
        model, forward, train_dl, val_dl, heads=run.heads, hp=hp, device=device,
        fine_to_coarse=b["hier"].fine_to_coarse, ckpt_path=path / "checkpoint.pt", amp=prec,
        progress=cfg.progress, log=lambda m: log(f"{tag(run)} {m}"),
        on_epoch=lambda h: runs.write_csv(path / "history.csv", h),
        # a run built on other runs never serves as a trunk (branch): nothing to keep for it
        keep_at=() if run.upstream() else tuple(k for k in cfg.keep_at if k < hp.epochs))
    # again after fit: a run resumed after its last epoch trains nothing, and the kill may have
    # come between the last checkpoint (which holds the whole history) and history.csv
    runs.write_csv(path / "history.csv", history)
    return model, forward, best, (val_dl, test_dl)


BRANCH_MAY_DIFFER = {"experiment", "epochs", "stage_epochs"}
BRANCH_RECORD = "branch.json"  # beside a branched run: where and at which epoch it started


def branched_at(path) -> int:
    """The epoch a run's training started from (branch), 0 when it trained from the start."""
    f = Path(path) / BRANCH_RECORD
    return int(runs.read_json(f)["epoch"]) if f.is_file() else 0


def branch(run, hp, log) -> bool:
    """A wsd run at budget b starts from the same run at a longer budget (cfg.branch_from, an
    experiment folder) as it stood when b's decay starts: until then the two runs compute the
    same thing (train.lr_factor), so this saves those epochs and changes no number. Only a run
    not started yet, whose source kept that epoch's checkpoint with the same config, and not
    a run built on other runs: its inputs differ between budgets (a bilateral model's
    hemispheres at budget b are not the longer run's), so its longer run's checkpoint is not
    its own state at any epoch. Such runs are cheap (heads on cached features, or none)."""
    cfg, path = run.cfg, run.path
    if not cfg.branch_from or hp.schedule != "wsd" or (path / "checkpoint.pt").exists():
        return False
    if run.upstream():
        log(f"{tag(run)} built on runs of its own budget: trains from the start")
        return False
    start = train.decay_start(hp.epochs, hp.decay_frac)
    src = Path(cfg.branch_from) / run.stage / run.name / f"seed={run.seed}"
    kept = train.kept_checkpoint(src / "checkpoint.pt", start)
    if start < 1 or not kept.is_file() or not (src / "config.json").is_file():
        log(f"{tag(run)} no checkpoint of epoch {start} in {src}: trains from the start")
        return False
    src_rec = runs.read_json(src / "config.json")
    other = src_rec.get("config", {})
    changes = [c for c in C.diff(other, identity(run)) if c.split(":")[0] not in BRANCH_MAY_DIFFER]
    if changes:
        log(f"{tag(run)} {src} is another run ({'; '.join(changes)}): trains from the start")
        return False
    src_hyper = src_rec.get("hyper") or {}
    src_start = train.decay_start(src_hyper.get("epochs", 0), src_hyper.get("decay_frac", hp.decay_frac))
    if src_hyper.get("schedule") != "wsd" or src_start < start:
        log(f"{tag(run)} {src} decays from epoch {src_start}, before this run's {start} "
            f"(schedule {src_hyper.get('schedule')}, {src_hyper.get('epochs')} epochs): its epoch "
            f"{start} is not this run's state; trains from the start")
        return False
    # the branch is recorded beside the run (a resume finds checkpoint.pt and must still know
    # that the epochs before `start` were not trained here: sweep.calibration reads it)
    runs.write_json(path / BRANCH_RECORD, {"source": str(kept), "epoch": start})
    runs.atomic_write_bytes(path / "checkpoint.pt", kept.read_bytes())
    log(f"{tag(run)} branches from {kept} (epoch {start} of {hp.epochs})")
    return True


def _fit_packed(group, built, device, hp, log):
    """The runs of one packable group as one packed model (packed.py): each member keeps its
    own initialisation, loader and dropout stream, so it computes what its own run would."""
    cfg0, stage = group[0].cfg, group[0].stage
    net = packed.pack([b["model"] for b in built], [b["generator"] for b in built]).to(device)
    if train.use_channels_last(cfg0, device):
        net.net.to(memory_format=torch.channels_last)
        net.channels_last = True
    forward = torch.compile(net) if cfg0.compile else net
    log(f"[packed x{len(group)}] " + ", ".join(r.key for r in group))
    val_dl, test_dl = built[0]["loaders"][1:]

    def on_epoch(histories):
        for r, h in zip(group, histories):
            runs.write_csv(r.path / "history.csv", h)
    histories, bests = train.fit(
        net, forward, packed.PackedLoader([b["loaders"][0] for b in built]),
        packed.PackedLoader([val_dl] * len(group)),
        heads=group[0].heads, hp=hp, device=device, fine_to_coarse=built[0]["hier"].fine_to_coarse,
        ckpt_path=[r.path / "checkpoint.pt" for r in group], amp=precision(group[0], device, log), progress=cfg0.progress,
        log=lambda m: log(f"[packed {stage} x{len(group)}] {m}"), on_epoch=on_epoch)
    on_epoch(histories)  # as in _fit_one: whole histories after a resume past the last epoch
    out = []
    for i, b in enumerate(built):
        model = b["model"].to(device)
        model.load_state_dict(packed.unpack(net, i), strict=True)
        model.eval()
        out.append((model, model, bests[i], b["loaders"][1:]))
    return out


def member_generator(device, rseed):
    if torch.device(device).type == "cpu":
        g = torch.Generator()
        g.set_state(torch.get_rng_state())  # continues the stream its separate run would use
        return g
    return torch.Generator(device).manual_seed(rseed)  # as torch.manual_seed seeds CUDA


def _ckpt_epoch(path):
    return runs.load_torch(path)["epoch"] if path.exists() else 0


# --------------------------------------------------------------------------------- records

def record(run, device, upstream: dict, extra: dict):
    """config.json: the config, provenance, and the sha256 of every upstream model.pt, taken
    from the very bytes the run loaded (runs not loaded, such as an ensemble's unchosen pool
    members, are hashed from their files)."""
    hashes = {u.key: upstream.get(u.key) or runs.file_hash(u.path / "model.pt") for u in run.upstream()}
    ident = identity(run)
    rec = {"config": ident, "resolved": {**dataclasses.asdict(run.cfg), "precision": ident["precision"]},
           "stage": run.stage, "seed": run.seed, "upstream": hashes,
           **runs.provenance(device), **extra}
    runs.write_json(run.path / "config.json", rec)


def seal(run, metrics, wall_s, log) -> dict:
    """The end of every training: wall time, metrics.json with model.pt's sha256, a log line."""
    metrics["wall_s"] = wall_s
    metrics["branched_at"] = branched_at(run.path)  # wall_s covers the epochs after it only
    runs.finish(run.path, metrics)
    log(f"{tag(run)} done in {metrics['wall_s']:.0f}s: " + ", ".join(
        f"test {k} {v:.2%}" for k, v in metrics["test"].items()))
    return metrics


def finish_model(run, model, forward, best, hp, hier, device, val_dl, test_dl) -> dict:
    """A trained model's metrics (last and best epoch, val and test) and its model.pt, the
    reported epoch's state. Always in eval mode, whatever path led here (a run resumed after
    its last epoch trains nothing, and must still evaluate as the uninterrupted run did)."""
    cfg, stage, heads = run.cfg, run.stage, run.heads
    model.eval()
    f2c = hier.fine_to_coarse
    prec = precision(run, device)
    ev = lambda dl: train.evaluate(forward, dl, device, f2c, prec)  # noqa: E731
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
    # not heads on frozen hemispheres (bilateral, its controls): they were trained on features
    # made under one rule (and cached, so another rule would not even reach them)
    kwta = {} if run.spec.heads_only else kwta_test_metrics(model, ev, test_dl,
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


# ----------------------------------------------------------------------- frozen hemispheres

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


# -------------------------------------------------------------------------------- ensembles

def pool_metrics(run) -> dict:
    """Validation metrics of every unilateral run in an ensemble's pool."""
    pool = run.upstream()
    missing = [r.command() for r in pool if r.status() != "finished"]
    if missing:
        raise FileNotFoundError(f"the ensemble needs {len(missing)} more unilateral runs of seed "
                                f"{run.seed}; make them with:\n  " + "\n  ".join(missing))
    return {r.cfg.member: r.metrics() for r in pool}


def evaluate_ensemble(run, device, log) -> dict:
    """Top-k unilateral runs by validation accuracy (never test), logits averaged per head."""
    cfg = run.cfg
    pool = pool_metrics(run)
    ranked = sorted(pool, key=lambda m: -train.score(pool[m]["val"], ("fine", "coarse")))
    chosen = sorted(ranked[:cfg.ensemble_size])
    _, val_dl, test_dl, hier = loaders(cfg, device, 512, 0, False)
    by_member, hashes = {u.cfg.member: u for u in run.upstream()}, {}
    members = [by_member[m].load_model(hier, device, hashes) for m in chosen]
    model = models.Ensemble(members).to(device).eval()
    record(run, device, hashes, {"name": run.name, "members": chosen,
                                 "trainable_params": models.count_trainable(model),
                                 "total_params": models.count_total(model)})
    f2c = hier.fine_to_coarse
    prec = precision(run, device)
    val = train.evaluate(model, val_dl, device, f2c, prec)
    test = train.evaluate(model, test_dl, device, f2c, prec)
    log(f"members {chosen} chosen by validation accuracy from a pool of {cfg.pool_size}")
    return {"test": test, "val": val, "members": chosen, "report": "last",
            "pool_val": {m: pool[m]["val"] for m in pool}, "heads": ["fine", "coarse"]}


# ---------------------------------------------------------------------------------- packing

PACKABLE_STAGES = ("hemisphere", "unilateral", "resnet18", "resnet34")
MAX_MEMBERS = 10  # a larger group is split (memory grows with N; see the benchmark)


def architecture(run) -> str:
    if run.stage == "hemisphere":
        return models.hemisphere_arch(run.cfg, run.cfg.side)[0]
    return run.cfg.backbone if run.stage == "unilateral" else run.stage


PACK_STEPS = 2  # timed steps each way (after one untimed step) in decide_packing
# Packed must beat separate by this much for auto to pack: a packed run is its separate run only
# up to float rounding (not the same bytes), and a 2-step measurement on a shared machine
# varies by more than a few percent (10 x ResNet-9 at width 1/8 measured 1.05x at load 5.5 on
# the 2-core AMD VM, where the idle grid of bench section 6 measured 0.42x).
PACK_MARGIN = 1.10
PACK_DECISIONS: dict = {}  # {device type: what decide_packing measured and chose}


def packs(cfg) -> bool:
    """pack: on, off, or auto: what decide_packing measured in this process on the device the
    runs train on (a sweep measures at its start and hands its runs pack on or off); apart
    until it has. On the 2-core CPU VMs packed grouped convolutions ran 0.3-0.8x of the N
    plain ones (bench section 6), so auto measures rather than assumes."""
    if cfg.pack != "auto":
        return cfg.pack == "on"
    decision = PACK_DECISIONS.get(train.pick_device(cfg.device).type)
    return bool(decision and decision["pack"])


def decide_packing(todo, log=print, steps=PACK_STEPS, timer=time.perf_counter, cache=True) -> dict | None:
    """pack: auto at the start of a sweep: time `steps` training steps of one packable group
    of `todo` (the one with the most members, the cheaper on a tie) packed and separate on the
    device that will train it, print both figures, and pack only if packed is faster by
    PACK_MARGIN (1.10x). The
    decision (a dict; None when no run is auto or no group has two members) is kept in
    PACK_DECISIONS for the device type and holds for every group of the sweep."""
    auto = [r for r in todo if r.cfg.pack == "auto"]
    groups = [g for g in packable_groups(auto, force=True) if len(g) > 1]
    if not groups:
        return None
    device = train.pick_device(auto[0].cfg.device)
    if cache and device.type in PACK_DECISIONS:
        return PACK_DECISIONS[device.type]
    group = min(groups, key=lambda g: (-len(g), sum(r.cost() for r in g)))
    rates = measure_packing(group, device, steps, timer)
    decision = {"pack": rates["packed"] >= PACK_MARGIN * rates["separate"], "device": device.type,
                "members": len(group), "group": f"{group[0].stage} {group[0].name}",
                "separate_img_per_s": rates["separate"], "packed_img_per_s": rates["packed"],
                "ratio": rates["packed"] / rates["separate"], "batch": rates["batch"],
                "margin": PACK_MARGIN}
    if cache:  # the bench measures (cache=False) without deciding for the process
        PACK_DECISIONS[device.type] = decision
    log(f"pack auto: {len(group)} x {decision['group']} on {device.type}, batch {rates['batch']} "
        f"per member: separate {rates['separate']:,.0f} img/s, packed {rates['packed']:,.0f} img/s "
        f"({decision['ratio']:.2f}x; packing needs {PACK_MARGIN:.2f}x): "
        f"{'packed' if decision['pack'] else 'separate'}")
    return decision


def measure_packing(group, device, steps=PACK_STEPS, timer=time.perf_counter) -> dict:
    """Images/s over all members of `group`: one step of the members' own models one after
    the other against one step of the same models packed (packed.pack), on random images at
    the runs' batch size, in their precision and memory format; train.race: one untimed step
    each way, then `steps` timed ones each way, interleaved, the best of each counted."""
    run, n = group[0], len(group)
    hp = train.hyper(run.cfg, run.stage)
    bs = hp.batch_size
    cl = train.use_channels_last(run.cfg, device)
    ctx, _ = train.autocast(device, precision(run, device))
    scaler = train.grad_scaler(device, precision(run, device))
    hier = types.SimpleNamespace(n_fine=10, n_coarse=2)
    torch.manual_seed(0)
    members = [r.spec.build(r.cfg, hier, []).to(device) for r in group]

    def labels(*shape):
        return {"fine": torch.randint(0, 10, shape, device=device),
                "coarse": torch.randint(0, 2, shape, device=device)}

    kw = dict(heads=run.heads, label_smoothing=hp.label_smoothing, lr=hp.lr)
    fmt = torch.channels_last if cl else torch.contiguous_format
    sep = [(m.to(memory_format=fmt), train.make_optimizer(m.parameters(), hp)) for m in members]
    x = torch.randn(bs, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    one = {"x": x, **labels(bs)}
    net = packed.pack([r.spec.build(r.cfg, hier, []) for r in group]).to(device)
    if cl:
        net.net.to(memory_format=torch.channels_last)
        net.channels_last = True
    opt = train.make_optimizer(net.parameters(), hp)
    many = {"x": torch.randn(bs, n, 3, 32, 32, device=device), **labels(bs, n)}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    best = train.race({"separate": lambda: [train.train_step(m, one, o, scaler, ctx, **kw) for m, o in sep],
                       "packed": lambda: train.train_step(net, many, opt, scaler, ctx, **kw)},
                      steps, timer, sync)
    separate, together = best["separate"], best["packed"]
    return {"separate": n * bs / separate, "packed": n * bs / together, "batch": bs}


def with_pack(run, pack: str):
    """The same run (same folder and identity: pack is not part of it) with cfg.pack set, so
    that a worker process trains it as the sweep decided."""
    return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, pack=pack))


def pack_key(run, force=False):
    """Runs with equal keys can share one packed model: one stage and config (so one
    architecture, data and recipe), differing only in seed or pool member. None: never packed
    (force: as if packing were on)."""
    if not (force or packs(run.cfg)) or run.stage not in PACKABLE_STAGES \
            or architecture(run) not in packed.PACKABLE_BACKBONES:
        return None
    ident = C.identity(run.cfg)
    ident.pop("member")
    return run.stage, repr(sorted(ident.items()))


def packable_groups(runs_, max_members=MAX_MEMBERS, force=False) -> list[list]:
    """The runs split into groups to train together, in the runs' order (a group stands where
    its first run stood): the same run across seeds and the pool members of a seed share a
    group; runs that cannot be packed stay alone. Give it the runs still to train."""
    groups, by_key = [], {}
    for r in runs_:
        key = pack_key(r, force)
        if key is None:
            groups.append([r])
            continue
        g = by_key.get(key)
        if g is None or len(g) >= max_members:
            g = by_key[key] = []
            groups.append(g)
        g.append(r)
    return groups
