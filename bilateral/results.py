"""results.csv and results.md of an experiment, rebuilt from its run records alone.

`python -m bilateral report outputs/<experiment>` (or `report(dir)`) reads every finished run
(outputs/<experiment>/<stage>/<name>/seed=<k>/metrics.json and config.json) and every analysis
record (outputs/<experiment>/analysis/**/metrics.json), and writes
- results.csv: one tidy row per (stage, model, condition, backbone, seed, split, metric);
- results.md: per model, fine and coarse test accuracy as mean ± sample standard deviation over
  seeds, and the bilateral (specialised) model against every other model: the difference of
  means with a 95% confidence interval over seeds.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd

from . import config as C
from .runs import atomic_write_bytes

COLUMNS = ["stage", "model", "condition", "backbone", "seed", "split", "metric", "value"]
ACC = ("fine_acc", "coarse_acc", "fine_as_coarse_acc")
CONDITION_STAGES = ("hemisphere", "bilateral", "bilateral_unspecialised", "callosal",
                    "callosal_unspecialised")
TRAIN_KEYS = ("wall_s", "best_epoch", "epochs")  # from metrics.json, reported with split "train"
ANALYSIS_HIDDEN = {"median", "q25", "q75", "std", "n", "n_pairs", "n_used", "wall_s"}
STAGE_LABEL = {
    "hemisphere": "hemisphere", "bilateral": "bilateral (specialised)",
    "bilateral_unspecialised": "bilateral, no specialisation", "unilateral": "unilateral dual-head",
    "resnet18": "ResNet-18 dual-head", "resnet34": "ResNet-34 dual-head", "ensemble": "ensemble",
    "callosal": "callosal (specialised)", "callosal_unspecialised": "callosal, no specialisation",
}


# ---------------------------------------------------------------------------------- reading

def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _seed_of(path: Path) -> int | None:
    for part in reversed(path.parts):
        if part.startswith("seed="):
            try:
                return int(part.split("=", 1)[1])
            except ValueError:
                return None
    return None


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
        elif isinstance(v, bool):
            out[key] = float(v)
    return out


def run_rows(exp: Path) -> list[dict]:
    rows = []
    for stage in C.STAGES:
        for mfile in sorted((exp / stage).glob("*/seed=*/metrics.json")):
            run = mfile.parent
            metrics, rec = _read(mfile), _read(run / "config.json")
            resolved = rec.get("resolved", {})
            base = dict(stage=stage, model=run.parent.name,
                        condition=resolved.get("condition", "") if stage in CONDITION_STAGES else "",
                        backbone=stage if stage in ("resnet18", "resnet34")
                        else resolved.get("backbone", ""),
                        seed=_seed_of(run))
            for split in ("test", "val"):
                for metric, value in (metrics.get(split) or {}).items():
                    rows.append(dict(base, split=split, metric=metric, value=float(value)))
            extra = {k: metrics[k] for k in TRAIN_KEYS if isinstance(metrics.get(k), (int, float))}
            if "trainable_params" in rec:
                extra["trainable_params"] = rec["trainable_params"]
            rows += [dict(base, split="train", metric=k, value=float(v)) for k, v in extra.items()]
    return rows


def analysis_rows(exp: Path) -> list[dict]:
    """Flat {metric: value} records of the analysis module; condition and seed from a sibling
    meta.json, else from the path analysis/<condition>/seed=<k>/metrics.json."""
    rows = []
    root = exp / "analysis"
    for mfile in sorted(root.glob("**/metrics.json")):
        meta = _read(mfile.parent / "meta.json")
        rel = [p for p in mfile.parent.relative_to(root).parts if not p.startswith("seed=")]
        condition = meta.get("condition") or next((p for p in rel if p in C.CONDITIONS), "")
        seed = meta.get("seed", _seed_of(mfile.parent))
        base = dict(stage="analysis", model=str(meta.get("model") or meta.get("name") or "/".join(rel)
                                                 or "analysis"),
                    condition=condition, backbone=meta.get("backbone", ""),
                    seed=None if seed is None else int(seed))
        for metric, value in _flat(_read(mfile)).items():
            rows.append(dict(base, split=meta.get("split", "test"), metric=metric, value=value))
    return rows


def collect(experiment_dir) -> pd.DataFrame:
    exp = Path(experiment_dir)
    df = pd.DataFrame(run_rows(exp) + analysis_rows(exp), columns=COLUMNS)
    df["seed"] = df["seed"].astype("Int64")
    return df


# ----------------------------------------------------------------------------- statistics

def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (p > 0.5), by bisection on its CDF (Simpson's rule); no SciPy."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(x, n=2000):
        h = x / n
        s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values) -> tuple[float, float, int]:
    s = pd.Series(values, dtype=float).dropna()
    return float(s.mean()), (float(s.std(ddof=1)) if len(s) > 1 else float("nan")), len(s)


def difference(a: dict, b: dict, level=0.95) -> dict:
    """Difference of means a - b with a `level` CI over seeds.

    Paired (t-interval of the per-seed differences) when both cover the same seeds, else
    Welch's interval. a and b map seed -> value.
    """
    paired = sorted(a) == sorted(b)
    out = dict(diff=float("nan"), lo=float("nan"), hi=float("nan"),
               method="paired" if paired else "Welch", n_a=len(a), n_b=len(b))
    q = 1 - (1 - level) / 2
    if paired:
        d = [a[s] - b[s] for s in sorted(a)]
        m, sd, n = mean_sd(d)
        out["diff"] = m
        if n >= 2:
            half = t_quantile(q, n - 1) * sd / math.sqrt(n)
            out.update(lo=m - half, hi=m + half)
        return out
    ma, sa, na = mean_sd(list(a.values()))
    mb, sb, nb = mean_sd(list(b.values()))
    out["diff"] = ma - mb
    if na >= 2 and nb >= 2:
        va, vb = sa ** 2 / na, sb ** 2 / nb
        se = math.sqrt(va + vb)
        if se == 0:
            out.update(lo=ma - mb, hi=ma - mb)
        else:
            dof = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
            half = t_quantile(q, dof) * se
            out.update(lo=ma - mb - half, hi=ma - mb + half)
    return out


# ------------------------------------------------------------------------------- summaries

def model_key(stage: str, model: str) -> str:
    """How a model is named in results.md; the unilateral pool members count as one model."""
    if stage == "unilateral":
        return f"unilateral/{model.rsplit('-m', 1)[0]}"
    return stage if model == stage else f"{stage}/{model}"


def per_seed(df: pd.DataFrame, split="test") -> dict:
    """{model key: {metric: {seed: value}}} of the accuracies; the unilateral pool members are
    averaged per seed (each seed's pool is one unilateral result)."""
    acc = df[(df.stage != "analysis") & (df.split == split) & df.metric.isin(ACC)].copy()
    acc["key"] = [model_key(s, m) for s, m in zip(acc.stage, acc.model)]
    out = {}
    for (key, metric, seed), v in acc.groupby(["key", "metric", "seed"], sort=False).value:
        out.setdefault(key, {}).setdefault(metric, {})[int(seed)] = float(v.mean())
    return out


def _order(keys, df):
    stage_rank = {s: i for i, s in enumerate(C.STAGES)}
    return sorted(keys, key=lambda k: (stage_rank.get(k.split("/")[0], 99), k))


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model: mean, sample SD and n of each test accuracy, and trainable params."""
    vals = per_seed(df)
    params = df[(df.split == "train") & (df.metric == "trainable_params")].copy()
    params["key"] = [model_key(s, m) for s, m in zip(params.stage, params.model)]
    rows = []
    for key in _order(vals, df):
        stage = key.split("/")[0]
        row = dict(model=key, stage=stage)
        for metric in ACC:
            m, sd, n = mean_sd(list(vals[key].get(metric, {}).values()))
            row.update({f"{metric}_mean": m, f"{metric}_sd": sd, f"{metric}_n": n})
        p = params[params.key == key].value
        row["trainable_params"] = int(p.iloc[0]) if len(p) else None
        rows.append(row)
    return pd.DataFrame(rows)


def reference_key(keys) -> str | None:
    """The bilateral specialised model the others are compared with: condition A if run."""
    bil = sorted(k for k in keys if k.startswith("bilateral/"))
    return next((k for k in bil if k.endswith("-A")), bil[0] if bil else None)


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    vals = per_seed(df)
    ref = reference_key(vals)
    rows = []
    if ref is None:
        return pd.DataFrame(rows)
    for key in _order(vals, df):
        if key == ref:
            continue
        row = dict(reference=ref, model=key)
        for metric in ("fine_acc", "coarse_acc"):
            a, b = vals[ref].get(metric, {}), vals[key].get(metric, {})
            d = difference(a, b) if a and b else dict(diff=float("nan"), lo=float("nan"),
                                                      hi=float("nan"), method="", n_a=len(a), n_b=len(b))
            row.update({f"{metric}_{k}": v for k, v in d.items()})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------- writing

def _pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(row, metric):
    n = row[f"{metric}_n"]
    if not n:
        return "—"
    sd = row[f"{metric}_sd"]
    return f"{_pct(row[f'{metric}_mean'])} ± {_pct(sd) if n > 1 else 'n/a'} ({n})"


def _ci_cell(row, metric):
    d = row[f"{metric}_diff"]
    if isinstance(d, float) and math.isnan(d):
        return "—"
    sign = lambda x: f"{round(100 * x, 1) + 0.0:+.1f}"  # noqa: E731 (+ 0.0: no "-0.0")
    lo, hi = row[f"{metric}_lo"], row[f"{metric}_hi"]
    if math.isnan(lo):
        return f"{sign(d)} [n/a (1 seed)]"
    return f"{sign(d)} [{sign(lo)}, {sign(hi)}] ({row[f'{metric}_method']})"


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _describe(exp: Path, df: pd.DataFrame) -> list[str]:
    recs = [_read(p) for p in sorted(exp.glob("*/*/seed=*/config.json"))[:1]]
    res = recs[0].get("resolved", {}) if recs else {}
    seeds = sorted({int(s) for s in df.seed.dropna()})
    lines = [f"# Results: {exp.name}", ""]
    if res:
        data = res.get("dataset")
        lines.append(f"Data: **{data}**" + (
            " (synthetic images: these numbers check the code, they say nothing about the study)"
            if data == "synthetic" else "") +
            f"; recipe {res.get('recipe')}, epochs {res.get('epochs')}, width {res.get('width')}, "
            f"backbone {res.get('backbone')}.")
    lines += [f"Seeds: {', '.join(map(str, seeds))}. Rebuild with "
              f"`python -m bilateral report {exp}`.", ""]
    return lines


def markdown(exp: Path, df: pd.DataFrame) -> str:
    summ, comp = summary_table(df), comparison_table(df)
    lines = _describe(exp, df)
    lines += ["## Test accuracy per model", "",
              "Accuracy in % as mean ± sample standard deviation (n-1 denominator) over seeds, "
              "with the number of seeds in brackets. `fine→coarse` is the fine prediction mapped "
              "to its superclass. The unilateral row averages each seed's pool members first. "
              "Trainable parameters are those the run itself trained: the specialised bilateral "
              "model trains only its two heads on frozen hemispheres (trained in their own runs).",
              ""]
    rows = [[r["model"], _cell(r, "fine_acc"), _cell(r, "coarse_acc"),
             _cell(r, "fine_as_coarse_acc"),
             "—" if pd.isna(r["trainable_params"]) else f"{int(r['trainable_params']):,}"]
            for _, r in summ.iterrows()]
    lines += _md_table(["model", "fine", "coarse", "fine→coarse", "trainable params"], rows)
    if len(comp):
        ref = comp.reference.iloc[0]
        lines += ["", f"## {ref} against every other model", "",
                  f"Difference of mean test accuracy ({ref} minus the model), percentage points, "
                  "with a 95% confidence interval over seeds: a t-interval of the per-seed "
                  "differences when both cover the same seeds (paired), else Welch's interval. "
                  "One seed gives no interval.", ""]
        rows = [[r["model"], _ci_cell(r, "fine_acc"), _ci_cell(r, "coarse_acc")]
                for _, r in comp.iterrows()]
        lines += _md_table(["model", "Δ fine [95% CI]", "Δ coarse [95% CI]"], rows)
    from .callosum_study import markdown_section  # callosal rows: callosum_study.py
    lines += markdown_section(df)
    an = df[df.stage == "analysis"]
    if len(an):
        last = an.metric.str.rsplit(".", n=1).str[-1]
        shown = an[~last.isin(ANALYSIS_HIDDEN)]
        conds = sorted(shown.condition.unique())
        lines += ["", "## Analyses", "",
                  f"Mean ± sample standard deviation over seeds (n) of the analysis records "
                  f"(`bilateral.analysis`); spreads, quantiles and counts are left out here: "
                  f"results.csv holds all {an.metric.nunique()} metrics (stage `analysis`).", ""]
        cells = {}
        for (metric, cond), g in shown.groupby(["metric", "condition"]):
            m, sd, n = mean_sd(g.value)
            cells.setdefault(metric, {})[cond] = f"{m:.4g} ± {'n/a' if n < 2 else f'{sd:.2g}'} ({n})"
        rows = [[metric, *(cells[metric].get(c, "—") for c in conds)] for metric in sorted(cells)]
        lines += _md_table(["metric", *(f"condition {c}" if c else "—" for c in conds)], rows)
    return "\n".join(lines) + "\n"


def report(experiment_dir) -> dict:
    """Rebuild results.csv and results.md of an experiment; return the tables."""
    exp = Path(experiment_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"no experiment folder {exp}")
    df = collect(exp)
    if df.empty:
        raise FileNotFoundError(f"no finished runs under {exp} (looked for "
                                f"<stage>/<name>/seed=<k>/metrics.json)")
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(exp / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(exp / "results.md", markdown(exp, df).encode())
    print(f"wrote {exp / 'results.csv'} ({len(df)} rows) and {exp / 'results.md'}")
    return dict(rows=df, summary=summary_table(df), comparison=comparison_table(df),
                csv=exp / "results.csv", md=exp / "results.md")


def trainable_params(experiment_dir, seed=None) -> pd.DataFrame:
    """Trainable parameters each run recorded in its config.json (at the experiment's width)."""
    df = collect(experiment_dir)
    df = df[(df.split == "train") & (df.metric == "trainable_params")]
    if seed is not None:
        df = df[df.seed == seed]
    out = df[["stage", "model", "condition", "seed", "value"]].rename(
        columns={"value": "trainable_params"})
    out["trainable_params"] = out["trainable_params"].astype(int)
    return out.reset_index(drop=True)
