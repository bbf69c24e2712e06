"""results.md and its forest plot, from the tables `results` computes: formatting only.

Every number here comes in through the arguments (results.summary_table, comparison_table,
kwta_table, analysis_table), so this module neither reads records nor does statistics.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import forest
from .runs import atomic_write_bytes
from .stats import FEW_IN_COMMON, FEW_SEEDS, NO_RUNS, NO_SPREAD, seeds_for, sign_flip_floor

FOREST = "results_forest.png"  # written next to results.md, shown at its top


def _pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(row, metric):
    n = row[f"{metric}_n"]
    if not n:
        return "—"
    sd = row[f"{metric}_sd"]
    runs = row.get(f"{metric}_runs", n)
    where = f"{n} seed means of {runs} runs" if row.get("pooled") and runs > n else f"{n}"
    return f"{_pct(row[f'{metric}_mean'])} ± {_pct(sd) if n > 1 else 'n/a'} ({where})"


def _signed(x):
    return f"{round(100 * x, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _ci(d: dict) -> str:
    if math.isnan(d["diff"]):
        return "—"
    if math.isnan(d["lo"]):
        why = {NO_SPREAD: "no spread", FEW_IN_COMMON: "1 seed in common"}.get(d.get("why"), "1 seed")
        return f"{_signed(d['diff'])} [n/a ({why})]"
    return f"{_signed(d['diff'])} [{_signed(d['lo'])}, {_signed(d['hi'])}] ({d['method']})"


def row_ci(row, metric):
    return _ci({k: row.get(f"{metric}_{k}", "") for k in ("diff", "lo", "hi", "method", "why")})


def untestable(r, metric) -> str:
    """Why a comparison has no test, naming the models and each one's seeds."""
    why, a, b = r.get(f"{metric}_why", ""), r["reference"], r["model"]
    n, n_a, n_b = (int(r[f"{metric}_{k}"]) for k in ("n", "n_a", "n_b"))
    if why == NO_RUNS:
        return "no runs of " + " or ".join(k for k, c in ((a, n_a), (b, n_b)) if not c)
    if why == FEW_IN_COMMON:
        return f"fewer than 2 seeds in common: {n}; {a} has {n_a}, {b} has {n_b}"
    if why == FEW_SEEDS:
        return f"fewer than 2 seeds: {a} has {n_a}, {b} has {n_b}"
    return why or "no test"


def _count(x):
    return "—" if x is None or pd.isna(x) else f"{int(x):,}"


def _model_cell(row):
    return row["model"] + (f" ↑{row['rising']}/{row['judged']}" if row["rising"] else "")


def table(header, rows) -> list[str]:
    # cells are formatted text already: no number parsing (it would re-format "1e-05", "8")
    return pd.DataFrame(rows, columns=header).to_markdown(index=False, disable_numparse=True).splitlines()


def _describe(info: dict, forest: bool) -> list[str]:
    lines = [f"# Results: {info['name']}", ""]
    if forest:
        lines += [f"![bilateral model minus every other model, 95% intervals]({FOREST})", ""]
    if info.get("dataset"):
        data = info["dataset"]
        lines.append(f"Data: **{data}**" + (
            " (synthetic images: these numbers check the code, they say nothing about the study)"
            if data == "synthetic" else "") +
            f"; recipe {info.get('recipe')}, width {info.get('width')}, backbone "
            f"{info.get('backbone')}; the epochs of each model are in the table.")
    lines += [f"Seeds: {', '.join(map(str, info['seeds']))}. Rebuild with "
              f"`python -m bilateral report {info['path']}`.", ""]
    return lines


def accuracy_section(summ: pd.DataFrame, rising_z: float) -> list[str]:
    lines = ["## Test accuracy per model", "",
             "Accuracy in % as mean ± sample standard deviation (n-1 denominator) over seeds, "
             "with the number of seeds in brackets. `fine→coarse` is the fine prediction mapped "
             "to its superclass. The unilateral row averages each seed's pool members first. "
             "Total parameters count everything the model computes with (the specialised "
             "bilateral model: both frozen hemispheres and its heads; an ensemble: its members); "
             "trainable ones only what the run itself trained. `↑k/n`: validation accuracy was "
             f"still rising at the last epoch in k of the n runs judged (the gain over the last "
             f"max(4, epochs/4) epochs, on a least-squares line, exceeds {rising_z:g} standard "
             "errors of one validation accuracy; runs under 4 epochs are not "
             "judged): that model may be under-trained.", ""]
    rows = [[_model_cell(r), _cell(r, "fine_acc"), _cell(r, "coarse_acc"),
             _cell(r, "fine_as_coarse_acc"), _count(r["total_params"]),
             _count(r["trainable_params"]), r["epochs"] or "—",
             ", ".join(f"{w:g}" for w in r["weight_decay"]) or "—"]
            for _, r in summ.iterrows()]
    return lines + table(["model", "fine", "coarse", "fine→coarse", "total params",
                           "trainable params", "epochs", "weight decay"], rows)


def decay_note(summ: pd.DataFrame, ref: str) -> list[str]:
    """Which comparisons with the reference are free of the weight-decay confound, from the
    weight decay the runs recorded (a bilateral model's: its hemispheres')."""
    wd = {r["model"]: tuple(r["weight_decay"]) for _, r in summ.iterrows()}
    own = wd.get(ref, ())
    if not own:
        return []
    fair = [k for k in wd if k != ref and wd[k] == own]
    unfair = [f"{k} ({', '.join(f'{w:g}' for w in wd[k])})" for k in wd
              if k != ref and wd[k] and wd[k] != own]
    lines = ["", f"Weight decay (from the runs' records): {ref}'s hemispheres were trained with "
                 f"{', '.join(f'{w:g}' for w in own)}. "]
    if not unfair:
        return lines[:1] + [lines[1] + "Every model was trained with the same weight decay, so "
                            "no comparison is confounded with regularisation."]
    return lines[:1] + [lines[1] + "Free of the regularisation confound (same weight decay): "
                        + (", ".join(fair) or "none") + ". Confounded (different weight decay): "
                        + ", ".join(unfair) + "; the `weight_decay_equal` ablation removes it."]


def pool_note(summ: pd.DataFrame) -> list[str]:
    """Both spreads of a pooled row (several runs per seed, averaged per seed in the table):
    the SD of the per-seed means, which the table shows and the comparisons use, and the SD
    of one run over all its runs."""
    if "pooled" not in summ or not summ.pooled.any():
        return []
    rows = [[r["model"], head.replace("_acc", "").replace("fine_as_coarse", "fine→coarse"),
             _pct(r[f"{head}_mean"]), f"{_pct(r[f'{head}_sd'])} ({r[f'{head}_n']} seeds)",
             f"{_pct(r[f'{head}_run_sd'])} ({r[f'{head}_runs']} runs)"]
            for _, r in summ[summ.pooled].iterrows()
            for head in ("fine_acc", "coarse_acc", "fine_as_coarse_acc") if r[f"{head}_n"]]
    return ["", "A pooled row (the unilateral members: several runs per seed) shows the mean of "
            "each seed's members, and its ± is the SD of those per-seed means, the spread the "
            "comparisons below use; one run varies more, by the SD of one run over all runs:",
            "", *table(["pooled model", "head", "mean", "SD of per-seed means",
                        "SD of one run"], rows)]


def _p(x) -> str:
    if x is None or pd.isna(x):
        return "—"
    return "<0.0001" if x < 1e-4 else "1" if x >= 0.9995 else f"{x:#.3g}"


def _df(x) -> str:
    return "—" if pd.isna(x) else f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _n(r, metric) -> str:
    if r[f"{metric}_method"] == "paired":
        return f"{r[f'{metric}_n']}"
    return f"{r[f'{metric}_n_a']} + {r[f'{metric}_n_b']}"


def verdict(r, metric, alpha) -> str:
    """What a test of the family lets results.md say: it holds (one way or the other) only
    when Holm's adjusted p is below alpha."""
    p, d = r[f"{metric}_p_holm"], r[f"{metric}_diff"]
    if pd.isna(r[f"{metric}_p"]):
        return f"not testable ({untestable(r, metric)})"
    if not r.get("family", "main" if r["in_family"] else ""):
        return "exploratory"
    if p < alpha:
        return "**holds**: ahead" if d > 0 else "**holds the other way**: behind"
    return "does not hold"


def _label(r) -> str:
    return r["label"] if "label" in r and isinstance(r["label"], str) else r["model"]


def _test_rows(comp, alpha) -> list[list[str]]:
    return [[_label(r), metric.replace("_acc", ""), _n(r, metric), row_ci(r, metric),
             _df(r[f"{metric}_df"]), _p(r[f"{metric}_p"]), _p(r[f"{metric}_p_holm"]),
             _p(r[f"{metric}_p_sign_flip"]), verdict(r, metric, alpha)]
            for _, r in comp.iterrows() for metric in ("fine_acc", "coarse_acc")
            if not pd.isna(r[f"{metric}_diff"]) or _is_test(r, metric)]


def _is_test(r, metric) -> bool:
    """Is this head one of the pair's tests (counted in its family's m, testable or not)?"""
    return bool(r.get(f"{metric}_test", not pd.isna(r[f"{metric}_p"])))


def family_tests(comp: pd.DataFrame) -> list:
    """[(row, head)] of every test of a family: its m, including those not testable."""
    return [(r, h) for _, r in comp.iterrows() for h in ("fine_acc", "coarse_acc") if _is_test(r, h)]


def untestable_lines(tests) -> list[str]:
    """The declared tests that could not be made, each with why (counted with p = 1)."""
    lines = [f"- {_label(r)}, {h.replace('_acc', '')}: {untestable(r, h)}"
             for r, h in tests if pd.isna(r[f"{h}_p"])]
    return ["", f"Not testable ({len(lines)}), each counted in m with p = 1:", *lines] if lines else []


def _result(r, metric) -> str:
    return (f"{_label(r)}, {metric.replace('_acc', '')}: {row_ci(r, metric)}, "
            f"p {_p(r[f'{metric}_p'])}, Holm p {_p(r[f'{metric}_p_holm'])}")


def seeds_note(comp: pd.DataFrame, m: int, alpha: float) -> list[str]:
    """What the number of seeds can and cannot show, from the tests made."""
    ns = sorted({int(r[f"{h}_n"]) for _, r in comp[comp.in_family].iterrows()
                 for h in ("fine_acc", "coarse_acc") if r[f"{h}_method"] == "paired"
                 and not pd.isna(r[f"{h}_p"])})
    lines = []
    for n in ns:
        floor = sign_flip_floor(n)
        lines.append(
            f"With {n} paired seeds the exact sign-flip test cannot give p below 2/2^{n} = "
            f"{floor:g}" + (f", so no paired claim here can reach {alpha:g} without the "
                            "t-test's assumption that the per-seed differences are normal, "
                            f"which {n} values cannot check; that takes {seeds_for(alpha)} "
                            "seeds" if floor >= alpha else "") +
            (f", and {seeds_for(alpha / m)} to pass the first step of Holm's correction over "
             f"{m} tests ({alpha:g}/{m} = {alpha / m:.2g})" if m > 1 else "") + ".")
    lines.append("Every p here is two-sided and rests on a handful of seeds: a claim that "
                 "does not hold is not shown false either, and an interval that includes zero leaves both "
                 "directions open; more seeds (and, for models still improving, longer "
                 "training) are what can settle it.")
    return [" ".join(lines)]


def comparison_section(comp: pd.DataFrame, summ: pd.DataFrame) -> list[str]:
    """The pooled rows' two spreads, then the reference against every other model: the
    declared family with its Holm-adjusted p and what it lets results.md claim, then the
    exploratory comparisons outside it."""
    pools = pool_note(summ)
    if not len(comp):
        return pools
    ref, alpha = comp.reference.iloc[0], comp.attrs.get("alpha", 0.05)
    family = comp["family"] if "family" in comp else comp.in_family.map({True: "main", False: ""})
    fam, rest = comp[comp.in_family], comp[family == ""]
    callosal = comp[family == "callosal"]
    tests = family_tests(fam)
    m = len(tests)
    lines = pools + [
        "", f"## {ref} against every other model", "",
        f"Difference of mean test accuracy ({ref} minus the model), percentage points, with a "
        "95% confidence interval, its degrees of freedom and two-sided p (scipy.stats). "
        f"**paired**: the model shares runs with {ref} (its own hemispheres, or a callosal "
        "model built on them, seed by seed): t-test of the per-seed differences (`ttest_rel`), "
        "n = pairs of seeds, df = n − 1; beside it the exact sign-flip p (every one of the 2^n "
        "sign patterns of those differences; no normality assumed). **Welch**: the models were "
        "trained from independent seeds: `ttest_ind(equal_var=False)`, n = seeds of each model, "
        "Welch–Satterthwaite df. **Holm p**: Holm's step-down correction over the "
        f"{m} tests of the family declared in `bilateral/results.py` (`FAMILY`, written down "
        f"before the results; every head both models have) {family_scope(comp)} A claim "
        f"**holds** only when its Holm p < {alpha:g}: \"ahead\" means {ref} is ahead, "
        "\"behind\" that the model is; "
        "\"does not hold\" means the data cannot tell at this family-wise level (not that the "
        "difference is zero). One seed gives no "
        "interval and no test.", "", *seeds_note(comp, m, alpha), ""]
    lines += table(["model", "head", "n", "Δ [95% CI]", "df", "p", "Holm p", "sign-flip p",
                    "verdict"], _test_rows(fam, alpha))
    held = [f"- holds: {r['claim']}: {_result(r, h)}" if r[f"{h}_diff"] > 0 else
            f"- holds the other way (the model is ahead), contrary to \"{r['claim']}\": "
            f"{_result(r, h)}" for r, h in tests if r[f"{h}_p_holm"] < alpha]
    lost = [f"- {_result(r, h)}" for r, h in tests if r[f"{h}_p"] < alpha <= r[f"{h}_p_holm"]]
    lines += ["", f"Of the {m} tests of the family, {len(held)} "
              f"{'holds' if len(held) == 1 else 'hold'} after Holm's correction"
              + (":" if held else "."), *held, *untestable_lines(tests)]
    if lost:
        lines += ["", f"p < {alpha:g} before the correction but not after: neither direction "
                  "is claimed.", *lost]
    lines += missing_lines(comp)
    lines += callosal_lines(callosal, alpha)
    if len(rest):
        lines += ["", "Outside the families (exploratory: shown, no correction, never claimed):",
                  "", *table(["model", "head", "n", "Δ [95% CI]", "df", "p", "Holm p",
                              "sign-flip p", "verdict"], _test_rows(rest, alpha))]
    return lines + decay_note(summ, ref)


def family_scope(comp: pd.DataFrame) -> str:
    """Where a family's m comes from: the study's configuration, or (none recorded) the
    models with runs."""
    if comp.attrs.get("declared"):
        return ("for this study's configuration (`study.json`: its conditions, baselines, "
                "ensemble sizes and callosal runs, as its run records state them). A declared "
                "test that could not be made (no runs, fewer than 2 seeds, no spread) is **not "
                "testable** and counts in m with p = 1, so a missing run never lowers the "
                "others' Holm p.")
    return ("among the models with runs here: no record states the study's configuration, so "
            "a declared model that was never run is not counted and m may be too small; a test "
            "among them that could not be made (fewer than 2 seeds, no spread) is **not "
            "testable** and counts in m with p = 1.")


def missing_lines(comp: pd.DataFrame) -> list[str]:
    """The main family's comparisons outside this study: not counted in m."""
    missing = comp.attrs.get("family_missing") or []
    if not missing:
        return []
    if comp.attrs.get("declared"):
        return ["", "In `FAMILY` but not part of this study's configuration (no runs declared, "
                "not counted in m): " + "; ".join(missing) + "."]
    return ["", "In `FAMILY` but not run here (not counted in m, as no record says whether the "
            "study declared them): " + "; ".join(missing) + "."]


def callosal_lines(comp: pd.DataFrame, alpha: float) -> list[str]:
    """The callosal family: each callosal model minus the bilateral model of its condition,
    with n, interval, df, p, sign-flip p and Holm's p over these tests alone."""
    if not len(comp):
        return []
    tests = family_tests(comp)
    m = len(tests)
    ns = sorted({int(r[f"{h}_n_a"]) for _, r in comp.iterrows() for h in ("fine_acc", "coarse_acc")
                 if not pd.isna(r[f"{h}_diff"])})
    held = [f"- holds: {r['claim']}: {_result(r, h)}" if r[f"{h}_diff"] > 0 else
            f"- holds the other way, contrary to \"{r['claim']}\": {_result(r, h)}"
            for r, h in tests if r[f"{h}_p_holm"] < alpha]
    return ["", "### The callosal family", "",
            "Each callosal model **minus** the bilateral model of its condition (the sign is "
            "the callosal model's gain), and minus the capacity control of its own kind and "
            "depth (`bilateral_matched`), declared in `bilateral/results.py` (`CALLOSAL_FAMILY`). "
            f"Holm's correction runs over these {m} tests alone, declared {family_scope(comp)} The "
            "callosal models ask "
            "another question (do connections between the hemispheres add to the frozen "
            "bilateral model?), were added after the main family's results, on fewer seeds "
            "and at another revision; folded into the main family they would change its m, so "
            "how many callosal variants were tried would decide the main claims. Callosal "
            f"models were run on {', '.join(map(str, ns)) or 'no'} seed(s): with 2 seeds a paired "
            "interval has 1 degree of freedom and excludes zero whenever the two seeds agree, "
            "and the sign-flip p cannot go below 0.5.", "",
            *table(["callosal model", "head", "n", "Δ [95% CI]", "df", "p", "Holm p",
                    "sign-flip p", "verdict"], _test_rows(comp, alpha)),
            "", f"Of the {m} tests of the callosal family, {len(held)} "
            f"{'holds' if len(held) == 1 else 'hold'} after Holm's correction"
            + (":" if held else "."), *held, *untestable_lines(tests)]


def kwta_section(kw: pd.DataFrame) -> list[str]:
    if not len(kw):
        return []
    rules = [r for r in ("threshold", "map_only", "batch") if r in kw]
    lines = ["", "## k-WTA at evaluation (conditions C and D)", "",
             "Each k-WTA run evaluated on the test set under every rule (the rule changes "
             "evaluation only, so these are the same trained runs): `threshold`, per-channel "
             "thresholds tracked in training (the training sparsity, about k·k_batch of the "
             "activations); `map_only`, the per-map stage alone (about k survive, a "
             "distribution BatchNorm never saw in training); `batch`, both stages on the test "
             "batch (the original's, batch-dependent). Accuracy in % (mean ± SD (n)); the last "
             "column: threshold minus map_only, paired 95% interval.", ""]
    fmt = lambda t: f"{_pct(t[0])} ± {_pct(t[1])} ({t[2]})"  # noqa: E731
    rows = [[r["model"], r["metric"].replace("_acc", ""),
             *(fmt(r[x]) if isinstance(r.get(x), tuple) else "—" for x in rules),
             _ci(r["threshold_minus_map_only"]) if isinstance(r.get("threshold_minus_map_only"), dict)
             else "—"] for _, r in kw.iterrows()]
    return lines + table(["model", "head", *rules, "Δ threshold − map_only"], rows)


def analysis_section(an: pd.DataFrame | None, n_metrics: int) -> list[str]:
    if an is None or not len(an):
        return []
    lines = ["", "## Analyses", "",
             f"Mean ± sample standard deviation over seeds (n) of the analysis records "
             f"(`bilateral.analysis`); spreads, quantiles and counts are left out here: "
             f"results.csv holds all {n_metrics} metrics (stage `analysis`).", ""]
    rows = [[metric, *row] for metric, row in zip(an.index, an.values.tolist())]
    return lines + table(["metric", *(f"condition {c}" if c else "—" for c in an.columns)], rows)


def markdown(info: dict, summ, comp, kw, analysis, *, n_analysis=0, forest=False,
             rising_z=2.0) -> str:
    lines = (_describe(info, forest) + accuracy_section(summ, rising_z)
             + comparison_section(comp, summ) + kwta_section(kw)
             + analysis_section(analysis, n_analysis))
    return "\n".join(lines) + "\n"


def grid_markdown(df: pd.DataFrame, keys: list[str]) -> str:
    """One table across the points of a grid: a column per grid key, then the accuracies."""
    rows = [[*(r[k] for k in keys), r["model"], _cell(r, "fine_acc"), _cell(r, "coarse_acc"),
             _cell(r, "fine_as_coarse_acc")] for _, r in df.iterrows()]
    lines = [f"# Grid over {', '.join(keys)}", "", "Test accuracy in %, mean ± sample SD over "
             "seeds (n); one experiment per grid point, each with its own results.md.", "",
             *table([*keys, "model", "fine", "coarse", "fine→coarse"], rows)]
    return "\n".join(lines) + "\n"


def drawable(comp: pd.DataFrame) -> pd.DataFrame:
    """The comparisons with a point to draw: a declared comparison without runs has none."""
    cols = [f"{h}_diff" for h in forest.HEADS if f"{h}_diff" in comp]
    drawn = comp[comp[cols].notna().any(axis=1)] if cols else comp.iloc[:0]
    drawn.attrs = comp.attrs
    return drawn


def forest_plot(comp: pd.DataFrame):
    """The comparisons as a forest plot (forest.forest_plot: grouped rows, n per row, far rows
    in their own panel)."""
    return forest.forest_plot(drawable(comp))


def save_forest(exp: Path, comp: pd.DataFrame) -> Path | None:
    """results_forest.png; none (and no stale one) when no comparison has a point to draw."""
    if not len(drawable(comp)):
        (exp / FOREST).unlink(missing_ok=True)
        return None
    import matplotlib.pyplot as plt
    fig = forest_plot(comp)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(exp / FOREST, buf.getvalue())
    return exp / FOREST
