"""Section 8: float32 against bfloat16 autocast per model of the study, and what `precision: auto`
picks on this machine; and the measurement `pack: auto` makes at the start of a sweep."""
from __future__ import annotations

import dataclasses

import torch

from .. import plan, runner, train
from .common import base_config, loadavg, ratio, section_config

# (label, stage, config overrides, width): the study's trained models at the Fashion-MNIST preset's
# width 1/8, and ResNet-9 at width 1 (the CIFAR-100 preset's)
MODELS = [("ResNet-9", "unilateral", {}, 0.125),
          ("pyramid ResNet-9 (B left)", "hemisphere", {"condition": "B", "side": "left"}, 0.125),
          ("ResNet-9 k-WTA (C left)", "hemisphere", {"condition": "C", "side": "left"}, 0.125),
          ("pyramid ResNet-9 k-WTA (D left)", "hemisphere", {"condition": "D", "side": "left"}, 0.125),
          ("ResNet-18", "resnet18", {}, 0.125),
          ("ResNet-34", "resnet34", {}, 0.125),
          ("ResNet-9", "unilateral", {}, 1.0)]


def one_model(device, sz, label, stage, overrides, width, log) -> dict:
    """fp32 and bf16 images/s of one model's training step (train.race: one untimed step each,
    then interleaved timed ones, the best each way), and what auto picks for it here."""
    cfg = dataclasses.replace(base_config(sz, width, batch_size=sz["pr_batch"]), **overrides)
    run = plan.Run(stage, cfg, 0)
    ways = {}
    for p in ("fp32", "bf16"):
        model, batch, heads = runner.precision_probe(run, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ctx, _ = train.autocast(device, p)
        scaler = train.grad_scaler(device, p)
        ways[p] = lambda m=model, b=batch, h=heads, o=opt, c=ctx, s=scaler: train.train_step(
            m, b, o, s, c, heads=h, label_smoothing=0.0, lr=0.01)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    best = train.race(ways, sz["pr_steps"], sync=sync)
    bs = len(batch["x"])
    out = {"model": label, "stage": stage, "width": width, "batch": bs,
           "fp32_img_per_s": bs / best["fp32"], "bf16_img_per_s": bs / best["bf16"],
           "auto": runner.precision(run, device, log=log), "loadavg": loadavg()}
    out["ratio"] = ratio(out["bf16_img_per_s"], out["fp32_img_per_s"])
    out["margin_rule"] = "bf16" if out["ratio"] >= train.BF16_MARGIN else "fp32"
    log(f"  {label} width {width:g}: fp32 {out['fp32_img_per_s']:,.0f} img/s, bf16 "
        f"{out['bf16_img_per_s']:,.0f} img/s ({out['ratio']:.2f}x); auto: {out['auto']}")
    return out


def bench_precision(device, sz, splits, log) -> dict:
    models = sz["pr_models"]
    conf = section_config(device, batch=sz["pr_batch"], timed_steps=sz["pr_steps"],
                          margin=train.BF16_MARGIN, bf16_units=train.cpu_bf16_units(),
                          how="one training step (forward, backward, SGD) of the run's own model on "
                              "random images, channels_last as training uses it; best of the "
                              "timed steps, fp32 and bf16 interleaved")
    rows = [one_model(device, sz, *MODELS[i], log) for i in models]
    conf["loadavg_end"] = loadavg()
    return {"config": conf, "rows": rows}


def auto_packing(device, sz, log) -> dict:
    """What `pack: auto` measures at the start of a sweep (runner.decide_packing), on the group a
    sweep of the Fashion-MNIST preset would measure: the unilateral pool of one seed (10 runs of
    ResNet-9 at width 1/8, batch 256), packed against separate."""
    cfg = base_config(sz, sz["pka_width"], batch_size=sz["pka_batch"], pool_size=sz["pka_members"],
                      ensemble_sizes=[2], baselines=["unilateral"], conditions=["A"])
    runs_ = [r for r in plan.plan(cfg, [0]) if r.stage == "unilateral"]
    decision = runner.decide_packing(runs_, log=lambda m: log(f"  {m}"), cache=False)
    return {**decision, "loadavg": loadavg()}
