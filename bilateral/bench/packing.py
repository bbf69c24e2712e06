"""Sections 6 and 7: packed against separate training, and the CPU switches (torch.compile,
channels_last, threads per worker) at the presets' widths."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .. import models, packed, stages, train
from . import precision
from .common import Stepper, base_config, cycle, load_splits, loadavg, ratio, section_config, subset, timed
from .conventional import project_loader


def _members(cfg, hier, n, device):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(stages.dual_head_model(cfg.backbone, cfg, hier).to(device))
    return out


def packed_vs_separate(device, sz, train_split, width, n, log) -> dict:
    """Images/s over all N members: N unilateral ResNet-9 stepped one after the other, each on
    its own loader, against one packed model fed by the same N loaders."""
    cfg = base_config(sz, width)
    hp = dataclasses.replace(train.hyper(cfg, "unilateral"), batch_size=sz["batch"])
    heads, bs = ("fine", "coarse"), sz["batch"]
    hier = train_split.hierarchy
    loaders = [project_loader(train_split, bs, device, False, seed=i) for i in range(n)]
    warm, steps = sz["pk_warmup"], sz["pk_steps"]
    sep_models = _members(cfg, hier, n, device)
    sep_steps = [Stepper(m, m, heads, device, amp=device.type == "cuda", hp=hp) for m in sep_models]
    sep_batches = [cycle(dl) for dl in loaders]

    def separate(_):
        for step, batches in zip(sep_steps, sep_batches):
            step(next(batches))
    sep_s = timed(itertools.repeat(None), separate, warm, steps, device)
    net = packed.pack(_members(cfg, hier, n, device)).to(device)
    pk_step = Stepper(net, net, heads, device, amp=device.type == "cuda", hp=hp)
    pk_s = timed(cycle(packed.PackedLoader(loaders)), pk_step, warm, steps, device)
    out = {"width": width, "members": n, "separate_img_per_s": n * bs * steps / sep_s,
           "packed_img_per_s": n * bs * steps / pk_s, "loadavg": loadavg()}
    out["ratio"] = ratio(out["packed_img_per_s"], out["separate_img_per_s"])
    log(f"  width {width} N={n}: separate {out['separate_img_per_s']:.0f} img/s, "
        f"packed {out['packed_img_per_s']:.0f} img/s ({out['ratio']:.2f}x), load {out['loadavg'][0]:.1f}")
    return out


def bench_packing(device, sz, splits, log) -> dict:
    train_split = subset(splits[0], sz["pk_train"])
    conf = section_config(device, batch=sz["batch"], warmup_steps=sz["pk_warmup"], timed_steps=sz["pk_steps"],
                          dataset=train_split.name, model="unilateral ResNet-9 (fine + coarse heads)",
                          how="images/s over all members; separate = the N models stepped in turn")
    rows = [packed_vs_separate(device, sz, train_split, w, n, log)
            for w, ns in sz["pk_grid"] for n in ns]
    auto = precision.auto_packing(device, sz, log)
    conf["loadavg_end"] = loadavg()
    return {"config": conf, "rows": rows, "auto": auto}


# ------------------------------------------------------------------------------ CPU switches

def _step_rate(device, sz, train_split, width, *, compile_=False, channels_last=False, n=1, kwta=False):
    """Images/s of unilateral training (packed when n > 1) with one switch set; kwta: the
    costliest run of the study instead, the pyramid k-WTA hemisphere (condition D, left)."""
    cfg = base_config(sz, width, **({"condition": "D"} if kwta else {}))
    hp = dataclasses.replace(train.hyper(cfg, "unilateral"), batch_size=sz["batch"])
    torch.manual_seed(0)
    if kwta:
        ms, heads = [stages.hemisphere_model(cfg, "left", train_split.hierarchy).to(device)], ("fine",)
    else:
        ms, heads = _members(cfg, train_split.hierarchy, n, device), ("fine", "coarse")
    model = ms[0] if n == 1 else packed.pack(ms).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if n > 1:
            model.channels_last = True
    fwd = torch.compile(model) if compile_ else model
    step = Stepper(model, fwd, heads, device, amp=False, hp=hp)
    loaders = [project_loader(train_split, sz["batch"], device, channels_last and n == 1, seed=i)
               for i in range(n)]
    batches = cycle(loaders[0] if n == 1 else packed.PackedLoader(loaders))
    first = timed(batches, step, 0, 1, device)
    dt = timed(batches, step, sz["cpu_warmup"], sz["cpu_steps"], device)
    return {"img_per_s": n * sz["batch"] * sz["cpu_steps"] / dt, "first_step_s": first}


def threads_child(spec) -> dict:
    """In a fresh interpreter: images/s with `threads` torch threads (and the process-wide
    switches: glibc keeping freed memory, k-WTA selecting with torch's kthvalue)."""
    if spec.get("keep_freed"):
        train.keep_freed_memory()
    models.SELECT_WITH_NUMPY = not spec.get("kthvalue", False)
    torch.set_num_threads(spec["threads"])
    sz = spec["sizes"]
    split = subset(load_splits(sz, ("train",))[0], sz["cpu_train"])
    return _step_rate(torch.device("cpu"), sz, split, spec["width"], n=spec["members"],
                      channels_last=spec.get("channels_last", False), kwta=spec.get("kwta", False))


def _launch(sz, width, workers, threads, members, **switches) -> list:
    """`workers` fresh processes measuring side by side with `threads` threads each."""
    code = ("import json,sys; from bilateral.bench import packing; "
            "print('BENCH-THREADS ' + json.dumps(packing.threads_child(json.loads(sys.argv[1]))))")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    spec = json.dumps({"sizes": sz, "width": width, "threads": threads, "members": members, **switches})
    return [subprocess.Popen([sys.executable, "-c", code, spec], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(workers)]


def _collect(procs) -> float:
    """Total images/s of the processes `_launch` started."""
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=1800)
        line = [x for x in out.splitlines() if x.startswith("BENCH-THREADS ")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"threads child failed ({p.returncode}):\n{err[-2000:]}")
        total += json.loads(line[-1].split(" ", 1)[1])["img_per_s"]
    return total


def _measure_apart(sz, width) -> dict:
    """Each measurement in its own fresh process(es), one after another (a timing needs the
    machine to itself); in toy mode (the test, no timing meaning) all at once, since each
    process spends seconds importing torch. Returns the workers' figures (the same cores as
    one worker with all threads, or one single-threaded worker per core) and the pyramid
    k-WTA switches (numpy's selection against torch's kthvalue, glibc keeping freed memory
    against not), each with one thread and channels_last."""
    cores = os.cpu_count() or 1
    kw = dict(kwta=True, channels_last=True)
    plans = {f"1x{cores}": (1, cores, sz["cpu_members"], {}),
             f"{cores}x1": (cores, 1, sz["cpu_members"], {}),
             "numpy_select": (1, 1, 1, dict(kw, keep_freed=True)),
             "keep_freed_off": (1, 1, 1, dict(kw, keep_freed=False)),
             "kthvalue_select": (1, 1, 1, dict(kw, keep_freed=True, kthvalue=True))}
    if sz.get("side_by_side"):
        procs = {k: _launch(sz, width, w, t, m, **sw) for k, (w, t, m, sw) in plans.items()}
        got = {k: _collect(p) for k, p in procs.items()}
    else:
        got = {k: _collect(_launch(sz, width, w, t, m, **sw)) for k, (w, t, m, sw) in plans.items()}
    kwta = {k: got[k] for k in ("numpy_select", "keep_freed_off", "kthvalue_select")}
    kwta["select_ratio"] = ratio(kwta["numpy_select"], kwta["kthvalue_select"])
    kwta["keep_freed_ratio"] = ratio(kwta["numpy_select"], kwta["keep_freed_off"])
    return {"workers": {k: got[k] for k in (f"1x{cores}", f"{cores}x1")}, "kwta": kwta}


def bench_cpu(device, sz, splits, log) -> dict:
    if device.type != "cpu":
        return {"skipped": "skipped: cpu only"}
    train_split = subset(splits[0], sz["cpu_train"])
    conf = section_config(device, batch=sz["batch"], widths=sz["cpu_widths"], timed_steps=sz["cpu_steps"],
                          dataset=train_split.name, model="unilateral ResNet-9, fast recipe, float32")
    out = {"config": conf, "widths": {}}
    for w in sz["cpu_widths"]:
        r = {"eager": _step_rate(device, sz, train_split, w),
             "channels_last": _step_rate(device, sz, train_split, w, channels_last=True)}
        if sz["cpu_compile"]:
            try:
                r["compile"] = _step_rate(device, sz, train_split, w, compile_=True)
            except Exception as e:  # noqa: BLE001 - no compiler must not lose the other figures
                r["compile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        base = r["eager"]["img_per_s"]
        for v in r.values():
            if "img_per_s" in v:
                v["ratio_vs_eager"] = ratio(v["img_per_s"], base)
        r.update(_measure_apart(sz, w))
        r["workers_members"] = sz["cpu_members"]
        r["loadavg"] = loadavg()
        out["widths"][str(w)] = r
        log(f"  width {w}: " + ", ".join(f"{k} {v['img_per_s']:.0f}" for k, v in r.items()
                                         if isinstance(v, dict) and "img_per_s" in v)
            + " img/s; workers " + ", ".join(f"{k} {v:.0f}" for k, v in r["workers"].items())
            + f" img/s; pyramid k-WTA: numpy select {r['kwta']['select_ratio']:.2f}x kthvalue, "
            f"freed memory kept {r['kwta']['keep_freed_ratio']:.2f}x not; load {r['loadavg'][0]:.1f}")
    conf["loadavg_end"] = loadavg()
    return out
