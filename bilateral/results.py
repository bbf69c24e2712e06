"""results.csv, results.md and the forest plot of an experiment, rebuilt from its run records.

`python -m bilateral report outputs/<experiment>` (or `report(dir)`) reads every finished run
(outputs/<experiment>/<stage>/<name>/seed=<k>/metrics.json, config.json, history.csv) and every
analysis record (outputs/<experiment>/analysis/**/metrics.json), and writes
- results.csv: one tidy row per (stage, model, condition, backbone, seed, split, metric);
- study.json: the study's configurations as the runs recorded them (conditions, baselines,
  ensemble sizes, callosal kinds and depths), from which the families below are declared;
- results_forest.png: the bilateral model (condition A) minus every other model, fine and
  coarse, with 95% confidence intervals;
- results.md: that figure, then per model the test accuracies (mean ± sample SD over seeds),
  total and trainable parameters, epochs and whether validation accuracy was still rising,
  weight decay; the differences with their intervals; k-WTA's evaluation rules; the analyses.

Intervals and p come from scipy.stats: paired (`ttest_rel`) only where the two models share
runs (the bilateral model and its own hemispheres, seed by seed); every other pair of models
was trained from independent seeds, so Welch's test (`ttest_ind(equal_var=False)`). The claims
results.md words are the comparisons of FAMILY, declared here before any result; a claim holds
only when its Holm-adjusted p over that family is below ALPHA. The family's m is every test it
declares for the study's configuration (study.json), those that could not be made (no runs,
fewer than 2 seeds, no spread) counted with p = 1.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from . import config as C
from . import plan, results_md, runs
from .registry import SECTIONS
from .stats import difference, hemispheres_of, holm, mean_sd, paired, shares_runs, untested
from .runs import RecordError, atomic_write_bytes

COLUMNS = ["stage", "model", "condition", "backbone", "seed", "split", "metric", "value"]
ACC = ("fine_acc", "coarse_acc", "fine_as_coarse_acc")
TRAIN_KEYS = ("wall_s", "best_epoch", "epochs")  # from metrics.json, reported with split "train"
RECORD_KEYS = ("trainable_params", "total_params")  # from config.json, split "train"
KWTA_SPLIT = "test_kwta_"  # metrics.json test_kwta_<rule>: one model evaluated every way
ANALYSIS_HIDDEN = {"median", "q25", "q75", "std", "n", "n_pairs", "n_used", "wall_s"}
RISING_Z = 2.0           # still rising: the gain over the last epochs exceeds 2 noise SEs
DEFAULT_N_VAL = 1000     # validation size assumed by records that do not hold one


# --------------------------------------------------- the claims, declared before the results

HEADS = ("fine_acc", "coarse_acc")  # every comparison is tested on each head both models have
ALPHA = 0.05                        # family-wise: a claim holds when its Holm p < ALPHA


@dataclass(frozen=True)
class Comparison:
    """One declared comparison: `model` minus `against`, on the heads of `heads` both have.
    "{backbone}" is the reference bilateral model's backbone; "{condition}" stands for every
    condition the study declares (one comparison per condition whose models it plans);
    `model` and `against` may hold `*` wildcards (one entry, several models). `same_suffix`:
    pair only models whose wildcards matched the same text (a callosal model and the control
    of its own kind and depth, never another depth's). `claim`: what `model` ahead would
    mean."""
    model: str
    against: str
    claim: str
    heads: tuple = HEADS
    same_suffix: bool = False


_BIL = "bilateral/{backbone}-A"
# The family Holm's correction runs over: the bilateral model of condition A against every
# model of the study's main table, on both heads (written down before the 5-seed results; the
# callosal models, a later addition on fewer seeds, stay exploratory). Changing it after
# seeing results would defeat the correction.
FAMILY = (
    Comparison(_BIL, "hemisphere/{backbone}-A-left",
               "combining the specialised hemispheres beats the fine hemisphere alone"),
    Comparison(_BIL, "hemisphere/{backbone}-A-right",
               "combining the specialised hemispheres beats the coarse hemisphere alone"),
    Comparison(_BIL, "hemisphere/{backbone}-B-left", "condition A beats condition B's fine hemisphere"),
    Comparison(_BIL, "hemisphere/{backbone}-B-right", "condition A beats condition B's coarse hemisphere"),
    Comparison(_BIL, "hemisphere/{backbone}-C-left", "condition A beats condition C's fine hemisphere"),
    Comparison(_BIL, "hemisphere/{backbone}-C-right", "condition A beats condition C's coarse hemisphere"),
    Comparison(_BIL, "hemisphere/{backbone}-D-left", "condition A beats condition D's fine hemisphere"),
    Comparison(_BIL, "hemisphere/{backbone}-D-right", "condition A beats condition D's coarse hemisphere"),
    Comparison(_BIL, "bilateral/{backbone}-B", "condition A beats condition B (pyramid left hemisphere)"),
    Comparison(_BIL, "bilateral/{backbone}-C", "condition A beats condition C (k-WTA)"),
    Comparison(_BIL, "bilateral/{backbone}-D", "condition A beats condition D (pyramid and k-WTA)"),
    Comparison(_BIL, "bilateral_unspecialised/{backbone}-A",
               "specialisation helps: the bilateral model beats the same two hemispheres "
               "trained end to end"),
    Comparison(_BIL, "unilateral/{backbone}", "the bilateral model beats the unilateral dual-head network"),
    Comparison(_BIL, "resnet18", "the bilateral model beats ResNet-18"),
    Comparison(_BIL, "resnet34", "the bilateral model beats ResNet-34"),
    Comparison(_BIL, "ensemble/{backbone}-k*", "the bilateral model beats an ensemble of unilateral networks"),
    # The control of "combining beats the fine (coarse) hemisphere": the bilateral model's two
    # heads trained on ONE frozen hemisphere's features (stage one_hemisphere, added after the
    # 5-seed result, before any of its runs). It shares that hemisphere with the bilateral
    # model of its condition and seed, so the test is paired. What remains of "bilateral
    # beats its fine hemisphere" against it is the gain of combining, apart from the gain of
    # a new head on frozen features. Rows appear only where such runs exist.
    Comparison("bilateral/{backbone}-{condition}", "one_hemisphere/{backbone}-{condition}-left",
               "combining the hemispheres beats the same heads trained on the fine (left) "
               "hemisphere alone", heads=("fine_acc",)),
    Comparison("bilateral/{backbone}-{condition}", "one_hemisphere/{backbone}-{condition}-right",
               "combining the hemispheres beats the same heads trained on the coarse (right) "
               "hemisphere alone", heads=("coarse_acc",)),
)

# The callosal models, each against the bilateral model of its condition (callosal minus
# bilateral): a family of their own. They ask another question (do connections between the
# hemispheres add to the frozen bilateral model?), were declared after the main family's
# results, and were run on fewer seeds at another revision; folded into FAMILY they would
# change its m, so how many callosal variants were tried would decide the main claims.
# Holm runs over these alone.
CALLOSAL_FAMILY = (
    Comparison("callosal/{backbone}-{condition}-*", "bilateral/{backbone}-{condition}",
               "the callosal connections beat the frozen bilateral model they were added to"),
    Comparison("callosal_unspecialised/{backbone}-{condition}-*", "bilateral/{backbone}-{condition}",
               "a callosal model trained from scratch beats the specialised bilateral model"),
    # the capacity control (stage bilateral_matched, added before any of its runs): the same
    # frozen hemispheres with heads of as many trainable parameters as the callosal model of
    # that kind; paired (same hemispheres). One comparison per kind, and within it per depth
    # (same_suffix), so each callosal model meets its own control only.
    *(Comparison(f"callosal/{{backbone}}-{{condition}}-{kind}-*",
                 f"bilateral_matched/{{backbone}}-{{condition}}-{kind}-*",
                 f"the {kind} connections beat heads of the same trainable capacity",
                 same_suffix=True)
      for kind in C.CALLOSUM_KINDS),
)
FAMILIES = {"main": FAMILY, "callosal": CALLOSAL_FAMILY}  # name -> comparisons, Holm within each


# ---------------------------------------------------------------------------------- reading

def _read(path: Path, problems: list | None = None) -> dict:
    """A JSON record, or {} when missing; a record that exists but cannot be read is noted in
    `problems` as (path, why), so the report lists it instead of dropping it quietly."""
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if problems is not None:
            problems.append((str(path), f"{type(e).__name__}: {e}"))
        return {}
    if not isinstance(d, dict):
        if problems is not None:
            problems.append((str(path), f"holds a {type(d).__name__}, not a mapping"))
        return {}
    return d


def seed_of(path: Path) -> int | None:
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
        elif isinstance(v, (int, float)) and math.isfinite(v):  # bools are ints: 0.0 / 1.0
            out[key] = float(v)
    return out


def still_rising(scores, n_val: int, z: float = RISING_Z) -> bool | None:
    """Was validation accuracy still rising at the last epoch? None: too short to tell.

    The gain over the last w = max(4, ceil(epochs / 4)) epochs, read off a least-squares line
    (so one lucky epoch does not decide), against the noise of one validation accuracy on
    n_val images, sqrt(p(1 - p) / n_val): rising when the gain exceeds z of those. A schedule
    that decays the learning rate to zero ends on a small annealing gain even when converged;
    that stays under the noise, a model that has not reached its plateau does not.
    """
    s = np.asarray(scores, dtype=float)
    if len(s) < 4:
        return None
    w = max(4, math.ceil(len(s) / 4))
    slope = np.polyfit(np.arange(w), s[-w:], 1)[0]
    p = min(max(s[-1], 1e-3), 1 - 1e-3)
    return bool(slope * (w - 1) > z * math.sqrt(p * (1 - p) / n_val))


def history_rising(run: Path, heads, n_val: int) -> bool | None:
    try:
        h = pd.read_csv(run / "history.csv")
        scores = h[[f"val_{x}_acc" for x in heads]].mean(axis=1)
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return None
    return still_rising(scores, n_val)


SELF_TOL = 1e-3  # two evaluations of one model that differ by more than 0.1 point disagree


def _off(a: dict, b: dict) -> list[str]:
    return [f"{m} {100 * a[m]:.2f} against {100 * b[m]:.2f}" for m in sorted(a)
            if m in b and isinstance(a[m], (int, float)) and isinstance(b[m], (int, float))
            and abs(a[m] - b[m]) > SELF_TOL]


def self_disagreement(run: Path, metrics: dict, rec: dict) -> str | None:
    """Why a run's record disagrees with itself, or None. Its test metrics and the k-WTA rule
    it was trained with (test_kwta_<its rule>) are the same model on the same images, and its
    recorded validation accuracy is the one history.csv holds for the reported epoch: two
    evaluations that differ were not both made in eval mode. (Fashion-MNIST, D-left seed 1:
    test 42.69, test_kwta_threshold 41.09. A run resumed after its last epoch's checkpoint
    trained nothing, so nothing switched its model to eval mode, and every evaluation drew
    its own dropout masks and batch statistics; runner.finish_model sets eval mode since
    bec18d0.)"""
    test = metrics.get("test") or {}
    own = (rec.get("resolved") or {}).get("kwta_eval") or "threshold"
    same_rule = metrics.get(f"{KWTA_SPLIT}{own}")
    if isinstance(same_rule, dict) and (off := _off(test, same_rule)):
        return (f"its test accuracy is not the one of its own k-WTA rule {own} ({'; '.join(off)}): "
                f"the same model evaluated twice gave two answers, so not in eval mode; "
                f"retrain it with --force")
    epoch = {"last": metrics.get("epochs"), "best": metrics.get("best_epoch")}.get(metrics.get("report"))
    val = metrics.get("val")
    if not isinstance(epoch, int) or not isinstance(val, dict):
        return None
    try:
        h = pd.read_csv(run / "history.csv")
        row = h[h.epoch == epoch].iloc[0]
    except (OSError, ValueError, KeyError, IndexError, AttributeError, pd.errors.EmptyDataError):
        return None
    seen = {m: float(row[f"val_{m}"]) for m in val if f"val_{m}" in row.index}
    if off := _off(val, seen):
        return (f"its validation accuracy is not the one history.csv holds for its reported "
                f"epoch {epoch} ({'; '.join(off)}): evaluated otherwise than in training "
                f"(not in eval mode); retrain it with --force")
    return None


def disagreeing_runs(df: pd.DataFrame) -> list[tuple[str, str]]:
    """[(stage/model/seed=k, why)] of the runs in a results.csv whose test accuracy matches
    none of the k-WTA rules it was evaluated under (each run is evaluated under its own
    rule as well, so one of them is its test accuracy): the check self_disagreement makes on
    run folders, from the table alone."""
    run_cols = ["stage", "model", "seed"]
    test = df[df.split == "test"].set_index(run_cols + ["metric"]).value
    out = []
    kw = df[df.split.astype(str).str.startswith(KWTA_SPLIT)]
    for (stage, model, seed), g in kw.groupby(run_cols):
        by_rule = {r: dict(zip(x.metric, x.value)) for r, x in g.groupby("split")}
        mine = {m: v for (st, mo, se, m), v in test.items() if (st, mo, se) == (stage, model, seed)}
        if mine and all(_off(mine, rule) for rule in by_rule.values()):
            out.append((f"{stage}/{model}/seed={seed}",
                        "its test accuracy matches none of the k-WTA rules it was evaluated "
                        f"under ({'; '.join(_off(mine, by_rule.get(KWTA_SPLIT + 'threshold', {})))}"
                        " for threshold): two evaluations of one model disagree, so not in "
                        "eval mode; left out"))
    return out


def without_runs(df: pd.DataFrame, problems) -> pd.DataFrame:
    """df less the rows of the runs named in problems (stage/model/seed=k)."""
    gone = {p for p, _ in problems}
    name = df.stage.astype(str) + "/" + df.model.astype(str) + "/seed=" + df.seed.astype(str)
    return df[~name.isin(gone)]


def _train_extras(run: Path, metrics: dict, rec: dict) -> dict:
    """The run's scalars filed under split "train": budget, time, parameters, convergence."""
    extra = {k: metrics[k] for k in TRAIN_KEYS if isinstance(metrics.get(k), (int, float))}
    extra.update({k: rec[k] for k in RECORD_KEYS if isinstance(rec.get(k), (int, float))})
    wd = (rec.get("hyper") or {}).get("weight_decay")
    if isinstance(wd, (int, float)):
        extra["weight_decay"] = wd
    rising = history_rising(run, metrics.get("heads") or ("fine", "coarse"),
                            rec.get("n_val") or DEFAULT_N_VAL)
    if rising is not None:
        extra["still_rising"] = rising
    return extra


def run_rows(exp: Path, problems: list | None = None) -> list[dict]:
    rows = []
    for stage, spec in plan.STAGES.items():
        for mfile in sorted((exp / stage).glob("*/seed=*/metrics.json")):
            run = mfile.parent
            seen = len(problems) if problems is not None else 0
            metrics, rec = _read(mfile, problems), _read(run / "config.json", problems)
            if problems is not None and len(problems) == seen and not isinstance(metrics.get("test"), dict):
                problems.append((str(mfile), "holds no test metrics"))
            if problems is not None and len(problems) > seen:
                continue  # half a record would give rows without their condition or seed
            changed = plan.changed_in(exp, rec)
            sealed = runs.finished(run)
            disagrees = sealed and not changed and self_disagreement(run, metrics, rec)
            if changed or not sealed or disagrees:
                why = (f"stale, built on {', '.join(changed)} before they were retrained "
                       f"(retrain it with --force)") if changed else disagrees or (
                       "its seal (metrics.json) does not match its model.pt or history.csv: "
                       "interrupted while sealing, or changed since (retrain it with --force)")
                if problems is None:
                    print(f"left out {run.relative_to(exp)}: {why}")
                else:
                    problems.append((str(mfile), why))
                continue
            resolved = rec.get("resolved", {})
            try:
                rows += _run_rows(stage, run, metrics, rec, resolved)
            except (TypeError, ValueError, AttributeError) as e:
                if problems is None:
                    raise
                problems.append((str(mfile), f"a value that is not a number ({e})"))
    return rows


def _run_rows(stage, run, metrics, rec, resolved) -> list[dict]:
    """The rows of one run; a value that is not a number raises (ValueError, TypeError)."""
    rows, spec = [], plan.STAGES[stage]
    # a stage that fixes its backbone (ResNet-18/34) is named after it
    base = dict(stage=stage, model=run.parent.name,
                condition=resolved.get("condition", "") if "condition" in spec.uses else "",
                backbone=resolved.get("backbone", "") if "backbone" in spec.uses else stage,
                seed=seed_of(run))
    splits = ["test", "val", *sorted(k for k in metrics if k.startswith(KWTA_SPLIT))]
    for split in splits:
        for metric, value in (metrics.get(split) or {}).items():
            rows.append(dict(base, split=split, metric=metric, value=float(value)))
    rows += [dict(base, split="train", metric=k, value=float(v))
             for k, v in _train_extras(run, metrics, rec).items()]
    return rows


def analysis_rows(exp: Path, problems: list | None = None) -> list[dict]:
    """Flat {metric: value} records of the analysis module; condition and seed from a sibling
    meta.json, else from the path analysis/<condition>/seed=<k>/metrics.json."""
    rows = []
    root = exp / "analysis"
    for mfile in sorted(root.glob("**/metrics.json")):
        meta = _read(mfile.parent / "meta.json", problems)
        rel = [p for p in mfile.parent.relative_to(root).parts if not p.startswith("seed=")]
        condition = meta.get("condition") or next((p for p in rel if p in C.CONDITIONS), "")
        seed = meta.get("seed", seed_of(mfile.parent))
        base = dict(stage="analysis", model=str(meta.get("model") or meta.get("name") or "/".join(rel)
                                                 or "analysis"),
                    condition=condition, backbone=meta.get("backbone", ""),
                    seed=None if seed is None else int(seed))
        for metric, value in _flat(_read(mfile, problems)).items():
            rows.append(dict(base, split=meta.get("split", "test"), metric=metric, value=value))
    return rows


def collect(experiment_dir, problems: list | None = None) -> pd.DataFrame:
    """Every row of every readable record; pass a list as `problems` to get the unreadable ones."""
    exp = Path(experiment_dir)
    df = pd.DataFrame(run_rows(exp, problems) + analysis_rows(exp, problems), columns=COLUMNS)
    df["seed"] = df["seed"].astype("Int64")
    return df


# ------------------------------------------------------- the study's configuration, declared

STUDY = "study.json"  # beside results.csv: the study's configurations (from_csv reads them)
# What decides which models a study plans, as its runs' config.json hold it (`resolved`): the
# lists of what it runs, which every record keeps ...
SWEEP_KEYS = ("conditions", "baselines", "ensemble_sizes", "pool_size", "callosum_kinds")
# ... and the fields the run names depend on that registry.stage_config resets to their
# defaults in the records of stages that do not use them (a ResNet-18 record holds the
# default backbone, a hemisphere's the default callosal depths)
NAME_KEYS = ("backbone", "callosum_at", "callosum_train", "backbone_lr_scale")


def _declaration(sweep: dict, names: dict) -> list[dict]:
    """Every configuration of one sweep: each NAME_KEY at each value a record of a stage that
    uses it holds (its default where no such record exists), those that validate."""
    default = C.Config()
    values = [names[k] or [getattr(default, k)] for k in NAME_KEYS]
    out = []
    for combo in itertools.product(*values):
        d = {**sweep, **dict(zip(NAME_KEYS, combo))}
        try:
            C.from_dict(d)
        except C.ConfigError:  # a record of a revision whose names this one does not know
            continue
        out.append(d)
    return out


def study_declarations(exp: Path) -> list[dict]:
    """The configurations the runs under exp were planned from, as their config.json records
    state them, reduced to SWEEP_KEYS and NAME_KEYS: one per sweep (records that agree on
    SWEEP_KEYS). [] when no record states its `conditions` and `baselines` (forged records,
    or ones from before they were recorded)."""
    default, sweeps = C.Config(), {}
    for f in sorted(exp.glob("*/*/seed=*/config.json")):
        stage, res = f.parents[2].name, _read(f).get("resolved") or {}
        if stage not in plan.STAGES or not {"conditions", "baselines"} <= set(res):
            continue
        sweep = json.dumps({k: res.get(k, getattr(default, k)) for k in SWEEP_KEYS}, sort_keys=True)
        names = sweeps.setdefault(sweep, {k: [] for k in NAME_KEYS})
        used = set(plan.spec(stage).uses) | set(plan.spec(stage).owns)
        for k in NAME_KEYS:
            if k in used and k in res and res[k] not in names[k]:
                names[k].append(res[k])
    return [d for sweep, names in sweeps.items() for d in _declaration(json.loads(sweep), names)]


def declared_models(declarations) -> dict[str, tuple] | None:
    """{model key: the heads of HEADS it is tested on} of every model the configurations plan
    (plan.plan; the seed does not change which models); None without a configuration."""
    if not declarations:
        return None
    out = {}
    for d in declarations:
        for r in plan.plan(C.from_dict(d), [0]):
            out.setdefault(model_key(r.stage, r.name), tuple(f"{h}_acc" for h in r.heads
                                                             if f"{h}_acc" in HEADS))
    return out


def read_study(path: Path) -> list[dict]:
    """The configurations a study.json holds; [] when there is none."""
    try:
        return json.loads(Path(path).read_text())["configurations"]
    except FileNotFoundError:
        return []


def write_study(exp: Path, declarations: list[dict]) -> None:
    """study.json into exp (removed when no record declares a configuration, so none is stale)."""
    if not declarations:
        (exp / STUDY).unlink(missing_ok=True)
        return
    note = ("the configurations this study's runs recorded (config.json): results.md's Holm "
            "families are built from the models they plan (bilateral.results.declared_models)")
    atomic_write_bytes(exp / STUDY, json.dumps({"note": note, "configurations": declarations},
                                               indent=1).encode())


# ------------------------------------------------------------------------------- summaries

def model_key(stage: str, model: str) -> str:
    """How a model is named in results.md; the unilateral pool members count as one model."""
    if stage == "unilateral":
        return f"unilateral/{model.rsplit('-m', 1)[0]}"
    return stage if model == stage else f"{stage}/{model}"


def _keyed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df.stage != "analysis"].copy()
    df["key"] = [model_key(s, m) for s, m in zip(df.stage, df.model)]
    return df


def per_seed(df: pd.DataFrame, split="test") -> dict:
    """{model key: {metric: {seed: value}}} of the accuracies; the unilateral pool members are
    averaged per seed (each seed's pool is one unilateral result)."""
    acc = _keyed(df[(df.split == split) & df.metric.isin(ACC)])
    out = {}
    for (key, metric, seed), v in acc.groupby(["key", "metric", "seed"], sort=False).value:
        out.setdefault(key, {}).setdefault(metric, {})[int(seed)] = float(v.mean())
    return out


def per_run(df: pd.DataFrame, split="test") -> dict:
    """{model key: {metric: [value of each run]}}: a pool's members one by one."""
    acc = _keyed(df[(df.split == split) & df.metric.isin(ACC)])
    return {key: {metric: g.value.astype(float).tolist() for metric, g in kg.groupby("metric")}
            for key, kg in acc.groupby("key")}


def _order(keys):
    stage_rank = {s: i for i, s in enumerate(plan.STAGES)}
    return sorted(keys, key=lambda k: (stage_rank.get(k.split("/")[0], 99), k))


def _span(values) -> str:
    v = sorted({int(x) for x in values})
    return "—" if not v else str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def decay_source(key: str) -> str:
    """The model whose training set the weight decay that matters for `key`: a bilateral
    model's capacity is in its hemispheres, an ensemble's in its unilateral members."""
    stage, _, name = key.partition("/")
    hemispheres = hemispheres_of(key)  # a built-on model's: its left one (or its only one)
    if hemispheres:
        return f"hemisphere/{min(hemispheres)}"
    if stage == "ensemble":
        return f"unilateral/{name.rsplit('-k', 1)[0]}"
    return key


def run_facts(df: pd.DataFrame) -> dict:
    """{model key: facts of its runs}: parameters, epochs, still-rising count, weight decay."""
    tr = _keyed(df[df.split == "train"])
    out = {}
    for key, g in tr.groupby("key"):
        val = lambda m: g[g.metric == m].value  # noqa: E731
        rising = val("still_rising")
        out[key] = dict(
            trainable_params=int(val("trainable_params").iloc[0]) if len(val("trainable_params")) else None,
            total_params=int(val("total_params").iloc[0]) if len(val("total_params")) else None,
            epochs=_span(val("epochs")), rising=int(rising.sum()), judged=len(rising),
            weight_decay=sorted(set(val("weight_decay"))))
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model: mean, sample SD and n of each test accuracy over seeds, and its run
    facts. A pooled model (several runs per seed: the unilateral members) is averaged per seed
    first, so its SD is that of the per-seed means; `pooled` marks it, and <metric>_run_sd,
    <metric>_runs give the SD of one run over all its runs."""
    vals, facts, each = per_seed(df), run_facts(df), per_run(df)
    rows = []
    for key in _order(vals):
        row = dict(model=key, stage=key.split("/")[0], pooled=False)
        for metric in ACC:
            m, sd, n = mean_sd(list(vals[key].get(metric, {}).values()))
            _, run_sd, runs = mean_sd(each.get(key, {}).get(metric, []))
            row.update({f"{metric}_mean": m, f"{metric}_sd": sd, f"{metric}_n": n,
                        f"{metric}_run_sd": run_sd, f"{metric}_runs": runs})
            row["pooled"] |= runs > n
        f = facts.get(key, {})
        row.update({k: f.get(k) for k in ("trainable_params", "total_params", "epochs")},
                   rising=f.get("rising", 0), judged=f.get("judged", 0),
                   weight_decay=facts.get(decay_source(key), {}).get("weight_decay", []))
        rows.append(row)
    return pd.DataFrame(rows)


def reference_key(keys) -> str | None:
    """The bilateral specialised model the others are compared with: condition A if run."""
    bil = sorted(k for k in keys if k.startswith("bilateral/"))
    return next((k for k in bil if k.endswith("-A")), bil[0] if bil else None)


def _conditions(c: Comparison) -> tuple:
    return tuple(C.CONDITIONS) if "{condition}" in c.model + c.against else ("",)


def wildcard_text(pattern: str, key: str) -> tuple | None:
    """What each `*` of pattern matched in key (a tuple), or None when key does not match."""
    m = re.fullmatch("(.*)".join(map(re.escape, pattern.split("*"))), key)
    return m.groups() if m else None


def family_pairs(ref: str, keys, family=FAMILY) -> tuple[list[tuple[str, str, Comparison]], list[str]]:
    """A family made concrete for this study: [(model, against, its Comparison)] for every
    declared comparison whose models are both among `keys` (the study's declared models, or
    those with runs: one per condition for "{condition}", one per match of a wildcard, only
    matches of the same text where same_suffix), and ["model against pattern"] for the
    comparisons none of whose pairs are among them."""
    backbone = ref.split("/", 1)[1].rsplit("-", 1)[0]
    keys, pairs, missing = _order(set(keys)), [], []
    for c in family:
        found = []
        for cond in _conditions(c):
            fill = dict(backbone=backbone, condition=cond)
            models = [(k, t) for k in keys if (t := wildcard_text(c.model.format(**fill), k)) is not None]
            against = [(k, t) for k in keys if (t := wildcard_text(c.against.format(**fill), k)) is not None]
            found += [(a, b, c) for a, ta in models for b, tb in against
                      if a != b and (ta == tb or not c.same_suffix)]
        pairs += found
        if not found:
            fill = dict(backbone=backbone, condition="<condition>" if "{condition}" in
                        c.model + c.against else "")
            missing.append(f"{c.model.format(**fill)} against {c.against.format(**fill)}")
    return pairs, missing


def row_label(reference: str, model: str, main: str) -> str:
    """How a comparison's row is named: the other model where the reference or a bilateral
    model is the first term, else the first term (a callosal model minus its bilateral)."""
    return model if reference == main or reference.startswith("bilateral/") else reference


def data_heads(vals: dict) -> dict[str, tuple]:
    """{model key: the heads of HEADS it has results for}."""
    return {k: tuple(m for m in HEADS if v.get(m)) for k, v in vals.items()}


def comparison_row(vals, heads, pair, ref) -> dict:
    """One pair of models (reference minus model) on each head: the difference (stats.py) on
    the heads that are tests of the pair, i.e. in the comparison's heads and in `heads` of
    both models (declared: a missing run makes the test untestable, not absent); NaN on the
    rest. <head>_test marks the tests."""
    a_key, b_key, c, family = pair
    row = dict(reference=a_key, model=b_key, label=row_label(a_key, b_key, ref), family=family,
               in_family=family == "main", claim=c.claim if c else "")
    shared = shares_runs(a_key, b_key) or shares_runs(b_key, a_key)
    for metric in HEADS:
        a, b = vals.get(a_key, {}).get(metric, {}), vals.get(b_key, {}).get(metric, {})
        test = (metric in (c.heads if c else HEADS) and metric in heads.get(a_key, ())
                and metric in heads.get(b_key, ()))
        d = difference(a, b, shared) if test else untested(len(a), len(b))
        row.update({f"{metric}_{k}": v for k, v in d.items()}, **{f"{metric}_test": test})
    return row


def holm_within_families(comp: pd.DataFrame) -> None:
    """<head>_p_holm: Holm's adjusted p within each family over every test it declares; a
    test that could not be made (p NaN) counts in m with p = 1 and keeps a NaN (stats.holm)."""
    for m in HEADS:
        comp[f"{m}_p_holm"] = float("nan")
    for name in FAMILIES:
        tests = [(i, m) for i in comp.index[comp.family == name] for m in HEADS
                 if comp.at[i, f"{m}_test"]]
        for (i, m), p in zip(tests, holm([comp.at[i, f"{m}_p"] for i, m in tests])):
            comp.at[i, f"{m}_p_holm"] = p


def comparison_table(df: pd.DataFrame, declared: dict | None = None) -> pd.DataFrame:
    """One row per pair of models (reference minus model): first the declared families
    (FAMILIES: the main one, then the callosal one), then the reference bilateral model
    against every model no family compares (exploratory). Per head: the difference with its
    interval, n, df, t, p and, paired, the exact sign-flip p (stats.py), and within each
    family Holm's adjusted p (<head>_p_holm, NaN outside the families and for the tests that
    could not be made).

    declared: {model key: heads} of the models the study's configuration plans
    (declared_models). The families are built from it, so m counts every declared test, those
    without runs or with fewer than 2 seeds as p = 1. None (no configuration recorded): from
    the models with runs, so a declared model never run is not counted.

    `family`: "main", "callosal" or "" (exploratory); `in_family`: in the main family;
    <head>_test: the head is one of the pair's tests. attrs: "declared" (whether the families
    came from a configuration), "family_missing" (the main family's comparisons none of whose
    models the study declares, or has runs of), "missing" (every family's), "alpha"."""
    vals = per_seed(df)
    have = data_heads(vals)
    heads = have if declared is None else declared
    ref = reference_key(set(vals) | set(heads))
    if ref is None:
        return pd.DataFrame()
    pairs, missing = [], {}
    for name, fam in FAMILIES.items():
        found, missing[name] = family_pairs(ref, heads, fam)
        pairs += [(a, b, c, name) for a, b, c in found]
    covered = {k for a, b, _, _ in pairs for k in (a, b)}
    rows = [comparison_row(vals, heads, p, ref) for p in pairs]
    rows += [comparison_row(vals, have, (ref, key, None, ""), ref)
             for key in _order(vals) if key != ref and key not in covered]
    comp = pd.DataFrame(rows)
    if comp.empty:  # one model: nothing to compare
        return comp
    holm_within_families(comp)
    comp.attrs.update(declared=declared is not None, family_missing=missing["main"],
                      missing=missing, alpha=ALPHA)
    return comp


def kwta_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every model evaluated under each k-WTA rule, and the tracked threshold minus the
    per-map rule (paired: the same trained runs evaluated two ways)."""
    rules = sorted(s[len(KWTA_SPLIT):] for s in df.split.unique() if str(s).startswith(KWTA_SPLIT))
    by_rule = {r: per_seed(df, KWTA_SPLIT + r) for r in rules}
    rows = []
    for key in _order(by_rule.get("threshold", {})):
        for metric in ("fine_acc", "coarse_acc"):
            got = {r: by_rule[r].get(key, {}).get(metric) for r in rules}
            if not got.get("threshold"):
                continue
            row = dict(model=key, metric=metric)
            row.update({r: mean_sd(list(v.values())) for r, v in got.items() if v})
            if got.get("map_only"):
                row["threshold_minus_map_only"] = paired(got["threshold"], got["map_only"])
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ what results.md shows

def describe(exp: Path, df: pd.DataFrame) -> dict:
    """The experiment's name, data, recipe and seeds, from its first run record."""
    recs = [_read(p) for p in sorted(exp.glob("*/*/seed=*/config.json"))[:1]]
    res = recs[0].get("resolved", {}) if recs else {}
    return dict(name=exp.name, path=str(exp), seeds=sorted({int(s) for s in df.seed.dropna()}),
                **{k: res.get(k) for k in ("dataset", "recipe", "width", "backbone")})


def analysis_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± SD (n) of every analysis metric (rows) per condition (columns), as text."""
    an = df[df.stage == "analysis"]
    last = an.metric.str.rsplit(".", n=1).str[-1]
    cells = {}
    for (metric, cond), g in an[~last.isin(ANALYSIS_HIDDEN)].groupby(["metric", "condition"]):
        m, sd, n = mean_sd(g.value)
        cells.setdefault(cond, {})[metric] = f"{m:.4g} ± {'n/a' if n < 2 else f'{sd:.2g}'} ({n})"
    out = pd.DataFrame(cells).sort_index()
    return out[sorted(out.columns)].fillna("—").rename_axis("metric")


def unreadable_lines(problems) -> list[str]:
    if not problems:
        return []
    return ["## Records that could not be read, or disagree with themselves", "",
            f"{len(problems)} record(s) could not be read, or disagree with themselves, and are "
            "left out of every table below; rebuild each run with its train command and "
            "`--force`.", "",
            *(f"- `{path}`: {why}" for path, why in problems), ""]


def markdown(exp: Path, df: pd.DataFrame, problems=(), declared: dict | None = None) -> str:
    """results.md; declared: the study's declared models (comparison_table)."""
    an = df[df.stage == "analysis"]
    text = results_md.markdown(
        describe(exp, df), summary_table(df), comparison_table(df, declared), kwta_table(df),
        analysis_table(df) if len(an) else None, n_analysis=an.metric.nunique(),
        forest=(exp / results_md.FOREST).exists(), rising_z=RISING_Z)
    text += "".join(f"{line}\n" for line in files_lines(exp))
    vals = per_seed(df)
    for section in SECTIONS:  # plug-ins' sections (callosum.markdown_section, ...)
        text += "".join(f"{line}\n" for line in section(vals))
    if not problems:
        return text
    title, rest = text.split("\n", 1)  # the unreadable records come right under the title
    return "\n".join([title, "", *unreadable_lines(problems)]) + rest


def report(experiment_dir) -> dict:
    """Rebuild results.csv, the forest plot and results.md of an experiment; return the tables."""
    exp = Path(experiment_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"no experiment folder {exp}")
    problems = []
    df = collect(exp, problems)
    if df.empty:
        if problems:
            raise RecordError(f"none of the records under {exp} could be read: " + "; ".join(
                f"{p} ({why})" for p, why in problems) + "; rebuild the runs with --force")
        raise FileNotFoundError(f"no finished runs under {exp} (looked for "
                                f"<stage>/<name>/seed=<k>/metrics.json)")
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(exp / "results.csv", buf.getvalue().encode())
    declarations = study_declarations(exp)
    write_study(exp, declarations)
    declared = declared_models(declarations)
    comp = comparison_table(df, declared)
    tables = write_tables(exp)
    forest = results_md.save_forest(exp, comp)  # removes a stale figure when it draws none
    atomic_write_bytes(exp / "results.md", markdown(exp, df, problems, declared).encode())
    for path, why in problems:
        print(f"could not read {path}: {why}; left out of the results")
    print(f"wrote {exp / 'results.csv'} ({len(df)} rows), {exp / 'results.md'}"
          + (f" and {forest}" if forest else "")
          + (f"; {len(problems)} unreadable record(s) listed there" if problems else ""))
    return dict(rows=df, summary=summary_table(df), comparison=comp, kwta=kwta_table(df),
                csv=exp / "results.csv", md=exp / "results.md", forest=forest,
                tables=tables, unreadable=problems, declarations=declarations)


# the tables the analyses write per condition and seed (bilateral.analysis, callosum_study)
ANALYSIS_TABLES = ("scenarios.csv", "cam_localisation.csv", "similarity_medians.csv",
                   "attribution.csv", "probes.csv", "traffic.csv")
HISTORIES = "histories.csv"


def history_table(exp: Path) -> pd.DataFrame:
    """Every finished run's history.csv (a row per epoch: training loss, validation
    accuracies) in one table, with stage, model, condition, backbone and seed columns."""
    frames = []
    for stage, spec in plan.STAGES.items():
        for h in sorted((exp / stage).glob("*/seed=*/history.csv")):
            run = h.parent
            if not runs.finished(run):
                continue
            try:
                t = pd.read_csv(h)
            except (OSError, ValueError, pd.errors.EmptyDataError):
                continue
            res = _read(run / "config.json").get("resolved", {})
            t.insert(0, "seed", seed_of(run))
            t.insert(0, "backbone", res.get("backbone", "") if "backbone" in spec.uses else stage)
            t.insert(0, "condition", res.get("condition", "") if "condition" in spec.uses else "")
            t.insert(0, "model", run.parent.name)
            t.insert(0, "stage", stage)
            frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def analysis_tables(exp: Path) -> dict[str, pd.DataFrame]:
    """{analysis_<table>.csv: every analysis folder's <table>.csv stacked, with the folder
    (analysis/<condition>/seed=<k>), its condition and seed}: the tables the analyses'
    sentences rest on, small enough to commit (no figures, no models)."""
    out = {}
    for name in ANALYSIS_TABLES:
        frames = []
        for f in sorted((exp / "analysis").glob(f"**/{name}")):
            try:
                t = pd.read_csv(f)
            except (OSError, ValueError, pd.errors.EmptyDataError):
                continue
            meta = _read(f.parent / "meta.json")
            rel = f.parent.relative_to(exp / "analysis")
            cond = meta.get("condition") or next((p for p in rel.parts if p in C.CONDITIONS), "")
            t.insert(0, "seed", meta.get("seed", seed_of(f.parent)))
            t.insert(0, "condition", cond)
            t.insert(0, "folder", str(rel))
            frames.append(t)
        if frames:
            out[f"analysis_{name}"] = pd.concat(frames, ignore_index=True)
    return out


def write_tables(exp: Path) -> list[Path]:
    """histories.csv and analysis_<table>.csv into the experiment folder (the earlier ones
    removed first, so none is stale); the paths written."""
    for old in [exp / HISTORIES, *exp.glob("analysis_*.csv")]:
        old.unlink(missing_ok=True)
    tables = analysis_tables(exp)
    hist = history_table(exp)
    if len(hist):
        tables = {HISTORIES: hist, **tables}
    for name, t in tables.items():
        atomic_write_bytes(exp / name, t.to_csv(index=False).encode())
    return [exp / name for name in tables]


def files_lines(exp: Path) -> list[str]:
    """results.md's list of the tables beside it."""
    what = {HISTORIES: "every run's validation history, a row per epoch (stage, model, "
                       "condition, backbone, seed, epoch, train_loss, val_*_acc)",
            "analysis_scenarios.csv": "outcome scenarios per condition and seed",
            "analysis_cam_localisation.csv": "Grad-CAM localisation (area at half peak) per heatmap kind",
            "analysis_similarity_medians.csv": "feature similarity medians per scenario",
            "analysis_attribution.csv": "head attribution (left / right share of the logit)",
            "analysis_probes.csv": "specialisation probes (linear probes on frozen features)",
            "analysis_traffic.csv": "callosal traffic per connection"}
    have = [n for n in what if (exp / n).exists()]
    if not have:
        return []
    return ["", "## Tables beside this report", "",
            "Everything the sentences above rest on, as CSV in this folder (per run, condition "
            "and seed; the analyses' `folder` column names analysis/<condition>/seed=<k>):", "",
            *(f"- `{n}`: {what[n]}" for n in have)]


def from_csv(csv_path, out_dir, study: list[dict] | None = None) -> dict:
    """results.md and the forest plot rebuilt from a results.csv alone (a published one, whose
    run folders are elsewhere), into out_dir: the runs whose test accuracy disagrees with
    their own evaluations (disagreeing_runs) are left out and listed. study: the study's
    configurations (study_declarations' form); by default the study.json beside the csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(csv_path)
    df["seed"] = df["seed"].astype("Int64")
    problems = disagreeing_runs(df)
    df = without_runs(df, problems)
    declarations = read_study(Path(csv_path).parent / STUDY) if study is None else study
    declared = declared_models(declarations)
    comp = comparison_table(df, declared)
    forest = results_md.save_forest(out, comp)
    atomic_write_bytes(out / "results.md", markdown(out, df, problems, declared).encode())
    return dict(rows=df, comparison=comp, forest=forest, md=out / "results.md", unreadable=problems)


def grid_report(points, out_dir) -> pd.DataFrame:
    """One table across the points of a grid (bilateral.sweep --grid): every experiment's
    summary table (report() is rebuilt first) with a column per grid key, as results.csv and
    results.md in out_dir. points: [(experiment dir, {grid key: value})]."""
    frames, keys = [], []
    for exp, point in points:
        t = summary_table(report(exp)["rows"])
        # a grid key the table already has a column for (epochs) gets its own: "grid epochs"
        keys = [k if k not in t.columns else f"grid {k}" for k in point]
        for i, (k, v) in enumerate(zip(keys, point.values())):
            t.insert(i, k, ",".join(map(str, v)) if isinstance(v, list) else v)
        frames.append(t)
    df = pd.concat(frames, ignore_index=True)
    out = Path(out_dir)
    md = results_md.grid_markdown(df, keys)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "results.md", md.encode())
    print(f"wrote {out / 'results.csv'} and {out / 'results.md'} ({len(points)} grid points)")
    return df


def trainable_params(experiment_dir, seed=None) -> pd.DataFrame:
    """Trainable and total parameters each run recorded in its config.json (at the
    experiment's width)."""
    df = collect(experiment_dir)
    df = df[(df.split == "train") & df.metric.isin(RECORD_KEYS)]
    if seed is not None:
        df = df[df.seed == seed]
    out = df.pivot_table(index=["stage", "model", "condition", "seed"], columns="metric",
                         values="value", aggfunc="first").reset_index()
    out.columns.name = None
    for k in RECORD_KEYS:
        if k in out:
            out[k] = out[k].astype("Int64")
    rank = {s: i for i, s in enumerate(plan.STAGES)}
    out = out.sort_values(["stage", "model", "seed"], key=lambda c: c.map(rank) if c.name == "stage" else c)
    return out[[c for c in out if c not in RECORD_KEYS] + [k for k in RECORD_KEYS if k in out]] \
        .reset_index(drop=True)
