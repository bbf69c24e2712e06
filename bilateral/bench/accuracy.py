"""Section 3: time to accuracy, the fast recipe against the original one."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from .. import data, stages, train
from .common import base_config, loadavg, ratio, section_config, subset


class _Reached(Exception):
    pass


def _fit_hemisphere(device, sz, splits, recipe, epochs, patience=None, log=print) -> dict:
    """Train a left hemisphere (fine labels) with train.fit; with `patience`, stop once val fine
    accuracy has not improved for that many epochs (the fit is interrupted after that epoch)."""
    tr, va = subset(splits[0], sz["tta_train"]), subset(splits[1], sz["tta_val"])
    hier, cuda = tr.hierarchy, device.type == "cuda"
    cfg = base_config(sz, sz["tta_width"], recipe=recipe, epochs=epochs)
    hp = dataclasses.replace(train.hyper(cfg, "hemisphere"), batch_size=sz["batch"])
    torch.manual_seed(0)
    model = stages.hemisphere_model(cfg, "left", hier).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    train_dl = data.DeviceLoader(tr, hp.batch_size, device=device, shuffle=True, augment=True, seed=0,
                                 channels_last=cuda)
    val_dl = data.DeviceLoader(va, 512, device=device, shuffle=False, augment=False, channels_last=cuda)
    seen = []

    def on_epoch(history):
        seen[:] = history
        acc = [h["val_fine_acc"] for h in history]
        if patience and len(acc) - 1 - acc.index(max(acc)) >= patience:
            raise _Reached

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train.fit(model, model, train_dl, val_dl, heads=("fine",), hp=hp, device=device,
                      fine_to_coarse=hier.fine_to_coarse, ckpt_path=Path(tmp) / "checkpoint.pt",
                      amp=True, progress=False, log=lambda m: log(f"  [{recipe} {epochs} ep] {m}"),
                      on_epoch=on_epoch)
        except _Reached:
            pass
    acc = [h["val_fine_acc"] for h in seen]
    return {"recipe": recipe, "epoch_budget": epochs, "epochs_run": len(seen), "hyper": dataclasses.asdict(hp),
            "val_fine_acc": acc, "final_val_acc": acc[-1], "best_val_acc": max(acc),
            "best_epoch": acc.index(max(acc)) + 1,
            "epoch_seconds": [h["seconds"] for h in seen], "seconds": sum(h["seconds"] for h in seen),
            "wall_s": time.perf_counter() - t0, "n_train": len(tr), "n_val": len(va)}


def _first_reaching(run, target):
    """(epoch, seconds up to it) of the first epoch at or above target, or (None, None)."""
    for i, a in enumerate(run["val_fine_acc"]):
        if a >= target:
            return i + 1, sum(run["epoch_seconds"][:i + 1])
    return None, None


def bench_time_to_accuracy(device, sz, splits, log) -> dict:
    """The fast recipe against the CONVERGED original: the original runs its full budget (180
    epochs) or until its validation accuracy has not improved for `tta_patience` epochs; every
    fast budget then reports its epochs (and seconds) to reach the original's final and best."""
    E, P = sz["tta_original_epochs"], sz["tta_patience"]
    conf = section_config(device, width=sz["tta_width"], batch=sz["batch"], dataset=splits[0].name,
                          train_per_class=sz["tta_train"], val_per_class=sz["tta_val"], original_epochs=E,
                          original_patience=P, fast_budgets=sz["tta_fast"], amp=device.type == "cuda",
                          channels_last=device.type == "cuda", model="resnet9 hemisphere (left, fine head)",
                          metric="val fine accuracy after each epoch; seconds = train + val eval per epoch")
    orig = _fit_hemisphere(device, sz, splits, "original", E, patience=P, log=log)
    final, best = orig["final_val_acc"], orig["best_val_acc"]
    log(f"  original: {orig['epochs_run']} epochs, val fine final {final:.2%}, best {best:.2%} "
        f"(epoch {orig['best_epoch']}), {orig['seconds']:.0f}s")
    budgets = {}
    for F in sz["tta_fast"]:
        r = _fit_hemisphere(device, sz, splits, "fast", F, log=log)
        for name, target in (("final", final), ("best", best)):
            ep, secs = _first_reaching(r, target)
            r[f"reaches_original_{name}"] = {"epoch": ep, "seconds": secs,
                                             "epochs_ratio": ratio(orig["epochs_run"], ep),
                                             "seconds_ratio": ratio(orig["seconds"], secs)}
        budgets[str(F)] = r
        log(f"  fast {F} epochs: val fine final {r['final_val_acc']:.2%}, best {r['best_val_acc']:.2%}; "
            f"original's final at epoch {r['reaches_original_final']['epoch']}, "
            f"best at epoch {r['reaches_original_best']['epoch']}")
    conf["loadavg_end"] = loadavg()
    return {"config": conf, "original": orig, "fast_budgets": budgets}
