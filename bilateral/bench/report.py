"""The run of every section, its Markdown tables, and the `python -m bilateral bench` command."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .. import runs, train
from . import accuracy, memory, packing, precision, sections
from .common import environment, load_splits, ratio, sizes


# ------------------------------------------------------------------------------ the run
SECTIONS = ("throughput", "bilateral", "time_to_accuracy", "cuda", "memory", "packing", "cpu", "precision")
RUNNERS = {"throughput": sections.bench_throughput, "bilateral": sections.bench_bilateral,
           "time_to_accuracy": accuracy.bench_time_to_accuracy, "cuda": sections.bench_cuda,
           "memory": lambda device, sz, splits, log: memory.bench_memory(device, sz, log),
           "packing": packing.bench_packing, "cpu": packing.bench_cpu,
           "precision": precision.bench_precision}


def run(device="cpu", quick=True, toy=False, log=print, only=None) -> dict:
    """Every section (or those named in `only`); returns the JSON-ready dict (no file written)."""
    device = train.pick_device(device) if isinstance(device, str) else device
    sz = sizes(device, quick, toy)
    if sz["dataset"] == "fashion_mnist":
        try:
            splits = load_splits(sz)
        except FileNotFoundError as e:
            log(f"Fashion-MNIST not available ({e}); falling back to synthetic data")
            sz.update(dataset="synthetic", synthetic_size=4000)
            splits = load_splits(sz)
    else:
        splits = load_splits(sz)
    mode = "toy" if toy else "quick" if quick else "full"
    t0 = time.perf_counter()
    result = {"mode": mode, "environment": environment(device), "sizes": sz,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": runs.git_revision()}
    for name in only or SECTIONS:
        log(f"[{name}]")
        s0 = time.perf_counter()
        result[name] = RUNNERS[name](device, sz, splits, log)
        result[name]["section_s"] = time.perf_counter() - s0
    result["wall_s"] = time.perf_counter() - t0
    return result


def _f(v, fmt="{:,.0f}"):
    return "n/a" if v is None else fmt.format(v)


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def table(r: dict) -> str:
    """Markdown tables of the figures and ratios, one per section that ran."""
    env = r["environment"]
    head = (f"bench ({r['mode']}) on {env['device']}" + (f" ({env.get('gpu')})" if env.get("gpu") else "")
            + f", {env['cpu_model']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
              f"{env['threads']} threads, {r['wall_s']:.0f}s")
    parts = [head, "Load average (1 min) is recorded with every section: the machine may be shared.", ""]
    for name in SECTIONS:
        if name in r:
            s = r[name]
            la = s.get("config", {})
            parts += RENDER[name](s)
            if la.get("loadavg_start") and la.get("loadavg_end"):
                parts += [f"(load average {la['loadavg_start'][0]:.1f} at the start, "
                          f"{la['loadavg_end'][0]:.1f} at the end)", ""]
    return "\n".join(parts)


def _throughput(t):
    c = t["config"]
    return [f"1. Hemisphere training, ResNet-9 width {c['width']}, batch {c['batch']}, "
            f"{c['timed_steps']} steps x {c['rounds']} rounds (median), {c['dataset']}, "
            f"conventional with {c['conventional']['num_workers']} workers",
            "", "| images/s | project (DeviceLoader) | conventional (DataLoader + PIL) | ratio |",
            "|---|---:|---:|---:|",
            f"| training | {_f(t['train_img_per_s']['project'])} | {_f(t['train_img_per_s']['conventional'])} "
            f"| {_x(t['train_ratio'])} |",
            f"| loader alone | {_f(t['loader_img_per_s']['project'])} | "
            f"{_f(t['loader_img_per_s']['conventional'])} | {_x(t['loader_ratio'])} |", ""]


def _bilateral(b):
    c, pr, e = b["config"], b["ratio_incl_cache_per_recipe"], b["recipe_head_epochs"]
    rows = [f"2. Bilateral heads, two frozen ResNet-9 width {c['width']}, batch {c['batch']}, "
            f"{c['n_train']} train images", "", "| | seconds | ratio |", "|---|---:|---:|",
            f"| epoch on cached features | {_f(b['epoch_cached_s'], '{:.3f}')} | |",
            f"| epoch recomputing the hemispheres | {_f(b['epoch_recompute_s'], '{:.2f}')} | {_x(b['ratio'])} |",
            f"| one-off caching (train {c['n_train']} + val {c['n_val']} + test {c['n_test']}) | "
            f"{_f(b['cache_once_s'], '{:.2f}')} | |",
            f"| 1 epoch incl. caching | | {_x(b['ratio_incl_cache_1_epoch'])} |",
            f"| {e['fast']} epochs (fast recipe) incl. caching | | {_x(pr['fast'])} |",
            f"| {e['original']} epochs (original recipe) incl. caching | | {_x(pr['original'])} |"]
    base = b["epoch_cached_load_s"].get(f"idle,threads={b['threads_default']}")
    rows += [f"| cached epoch, {k.replace(',', ', ')} (one busy loop per core when busy) | {v:.3f} | "
             f"{_x(ratio(v, base))} of idle |" for k, v in b["epoch_cached_load_s"].items()]
    return rows + [""]


def _time_to_accuracy(a):
    c, o = a["config"], a["original"]
    rows = [f"3. Time to accuracy, left hemisphere (fine), ResNet-9 width {c['width']}, {c['dataset']} "
            f"({o['n_train']} train / {o['n_val']} val). The original (Adam 1e-4, constant) ran "
            f"{o['epochs_run']} of {o['epoch_budget']} epochs (stopped after {c['original_patience']} "
            f"without a new best): final {o['final_val_acc']:.2%}, best {o['best_val_acc']:.2%} at epoch "
            f"{o['best_epoch']}, {o['seconds']:.0f}s", "",
            "| fast recipe budget | final val fine | best | epoch reaching original's final (time ratio) "
            "| epoch reaching original's best (time ratio) |", "|---:|---:|---:|---|---|"]
    reach = lambda d: "never" if d["epoch"] is None else f"{d['epoch']} ({_x(d['seconds_ratio'])})"  # noqa: E731
    for F, v in a["fast_budgets"].items():
        rows.append(f"| {F} epochs | {v['final_val_acc']:.2%} | {v['best_val_acc']:.2%} | "
                    f"{reach(v['reaches_original_final'])} | {reach(v['reaches_original_best'])} |")
    return rows + ["", "Time ratio: the original's seconds to its end over the fast run's seconds to the "
                   "epoch named (training + validation, under the load of the time).", ""]


def _cuda(cu):
    if "skipped" in cu:
        return [f"4. AMP / channels_last / torch.compile on CUDA: {cu['skipped']}", ""]
    rows = ["4. CUDA switches (DeviceLoader)", "", "| setting | images/s | vs fp32 |", "|---|---:|---:|"]
    rows += [f"| {k} | {_f(v['img_per_s'])} | {_x(v['ratio_vs_fp32'])} |" for k, v in cu["amp_channels_last"].items()]
    comp = cu["compile"]
    if "error" in comp:
        rows.append(f"| torch.compile | failed: {comp['error']} | |")
    else:
        rows.append(f"| torch.compile (amp + channels_last), compile {comp['compile_s']:.0f}s | "
                    f"{_f(comp['img_per_s'])} | {_x(comp['ratio'])} vs eager |")
    return rows + [""]


def _memory(m):
    c = m["config"]
    rows = [f"5. Memory, hemisphere training, ResNet-9 width {c['width']}, batch {c['batch']}, "
            f"{c['steps']} steps, {c['dataset']}", "",
            "| pipeline | RSS before training (MB) | peak RSS in training (MB) | training's own (MB) "
            "| peak RSS overall (MB) | peak CUDA allocated (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for p in ("project", "conventional"):
        if p in m:
            v = m[p]
            extra = (f" (a worker: {v['peak_rss_largest_worker_mb']:,.0f}, mostly shared)"
                     if "peak_rss_largest_worker_mb" in v else "")
            rows.append(f"| {p} | {_f(v['rss_before_training_mb'])} | {_f(v['peak_rss_training_mb'])} | "
                        f"{_f(v['training_delta_mb'])} | {_f(v['peak_rss_mb'])}{extra} | "
                        f"{_f(v.get('cuda_max_allocated_mb'))} |")
    return rows + [""]


def _packing(p):
    c = p["config"]
    rows = [f"6. Packed against separate training, unilateral ResNet-9, batch {c['batch']} per member, "
            f"{c['timed_steps']} steps, {c['dataset']}", "",
            "| width | members | separate (img/s) | packed (img/s) | packed / separate | load avg |",
            "|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {v['width']} | {v['members']} | {_f(v['separate_img_per_s'])} | {_f(v['packed_img_per_s'])} | "
             f"{_x(v['ratio'])} | {v['loadavg'][0]:.1f} |" for v in p["rows"]]
    a = p.get("auto")
    if a:
        rows += ["", f"pack: auto, as a sweep decides at its start (runner.decide_packing, best of "
                 f"interleaved steps): {a['members']} x {a['group']}, batch {a['batch']}: separate "
                 f"{_f(a['separate_img_per_s'])} img/s, packed {_f(a['packed_img_per_s'])} img/s, "
                 f"packed / separate {_x(a['ratio'])} (packing needs {a.get('margin', 1.1):.2f}x): auto trains "
                 f"{'packed' if a['pack'] else 'separate'}"]
    return rows + [""]


def _cpu(p):
    if "skipped" in p:
        return [f"7. CPU switches: {p['skipped']}", ""]
    rows = ["7. CPU switches, unilateral ResNet-9 (float32): one process, and the same cores as one "
            "worker with every thread or one single-threaded worker per core (each training "
            "a packed group); the last two columns: the pyramid k-WTA hemisphere (condition D, "
            "left, the study's costliest run), one thread, channels_last, each way in its own process", "",
            "| width | eager | channels_last | torch.compile | workers x threads (total img/s) "
            "| pyramid k-WTA: numpy / kthvalue select | pyramid k-WTA: freed memory kept / not | load avg |",
            "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for w, r in p["widths"].items():
        comp = r.get("compile", {"error": "not run"})
        cell = lambda v: f"{_f(v['img_per_s'])} ({_x(v['ratio_vs_eager'])})" if "img_per_s" in v else "n/a"  # noqa: E731
        rows.append(f"| {w} | {_f(r['eager']['img_per_s'])} | {cell(r['channels_last'])} | {cell(comp)} | "
                    + ", ".join(f"{k}: {v:,.0f}" for k, v in r["workers"].items())
                    + f" (N={r['workers_members']}) | " + _kwta_cells(r.get("kwta"))
                    + f" | {r['loadavg'][0]:.1f} |")
    return rows + [""]


def _kwta_cells(k):
    if not k:  # a result written before these switches were measured
        return "n/a | n/a"
    return (f"{_f(k['numpy_select'])} / {_f(k['kthvalue_select'])} ({_x(k['select_ratio'])}) | "
            f"{_f(k['numpy_select'])} / {_f(k['keep_freed_off'])} ({_x(k['keep_freed_ratio'])})")


def _precision(p):
    c = p["config"]
    units = "has" if c["bf16_units"] else "has no"
    rows = [f"8. float32 against bf16 autocast, one training step of each model, batch {c['batch']}, "
            f"best of {c['timed_steps']} interleaved steps; this CPU {units} bf16 instructions; "
            f"auto: what `precision: auto` trains in here (bf16 needs {c['margin']:.2f}x)", "",
            "| model | width | fp32 (img/s) | bf16 (img/s) | bf16 / fp32 | auto | load avg |",
            "|---|---:|---:|---:|---:|---|---:|"]
    rows += [f"| {v['model']} | {v['width']:g} | {_f(v['fp32_img_per_s'])} | {_f(v['bf16_img_per_s'])} | "
             f"{_x(v['ratio'])} | {v['auto']} | {v['loadavg'][0]:.1f} |" for v in p["rows"]]
    return rows + [""]


RENDER = {"throughput": _throughput, "bilateral": _bilateral, "time_to_accuracy": _time_to_accuracy,
          "cuda": _cuda, "memory": _memory, "packing": _packing, "cpu": _cpu, "precision": _precision}


def main(args) -> int:
    device = train.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    only = getattr(args, "only", None)
    unknown = [s for s in only or () if s not in SECTIONS]
    if unknown:
        print(f"error: --only: unknown section {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    part = "-" + "+".join(only) if only else ""  # a partial run does not overwrite a whole one
    out = Path(args.out) if args.out else Path("outputs") / "bench" / f"bench-{device.type}{part}.json"
    r = run(device, quick=args.quick, toy=False, only=only)
    text = table(r)
    r["table"] = text
    runs.write_json(out, r)
    print()
    print(text)
    print(f"\nwritten: {out}")
    return 0
