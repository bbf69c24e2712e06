"""The study as a plan of runs: every kind of run declared once, and the runs a study holds.

Read top to bottom:
1. Stages: each kind of run (hemisphere, bilateral, ...) is a registry.Stage, declared once in
   its module (stages.py: the paper's; callosum.py: the corpus callosum's); this is the one
   module that names those modules, so importing it gives the whole study.
2. `Run`: (stage, config, seed) and all that is known of it on disk: folder, status, metrics,
   history, model, upstream runs, cost. `Run.train()` makes it (runner.train_runs); `run_stage`
   trains one from the command line's terms.
3. Provenance: a run built on other runs records the sha256 of their model.pt files in its
   config.json; when one of those files changes (retrained) the dependant is stale.
4. `plan(cfg, seeds)`: the whole study as a list of runs in dependency order; `phase_runs` the
   runs of one phase of one seed (what a notebook trains); `describe` prints a plan
   (`python -m bilateral plan`).

Statuses: missing (no record), in_progress (started, not finished), finished, stale (a record is
there but it is not the run the plan asks for: the folder holds another config, or an upstream
model.pt is not the one it was built on). Training a stale run or loading its model refuses
(without --force), and the notebooks (read_runs) and the report leave it out. `plan` prints a
stale run's status with the reason and counts it, and every run downstream of a run still to
train, as still to train. A retraining that writes the same model.pt again (training is
deterministic on a CPU) leaves its dependants current.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

# The stage modules, each registering its stages; this order is the order of the study's tables.
from . import stages  # noqa: F401  isort: skip  (the paper's stages first)
from . import callosum  # noqa: F401  isort: skip  (beyond the paper)
from . import config as C
from . import models, runner, runs, train
from .registry import (KWTA_FIELDS, OPTIONAL, PHASES, STAGES, VARIANT_FIELDS, Stage,  # noqa: F401
                       register, spec, stage_config)

STATUSES = ("finished", "in_progress", "stale", "missing")


# ---------------------------------------------------------------------------------- 2. runs

@dataclass(frozen=True, eq=False)
class Run:
    """One training run: a stage, its config (reduced to the fields the stage uses) and a seed.
    Two Runs are the same run when they have the same folder."""
    stage: str
    cfg: C.Config
    seed: int

    def __post_init__(self):
        object.__setattr__(self, "cfg", stage_config(self.cfg, self.stage))

    def __eq__(self, other):
        return isinstance(other, Run) and self.path == other.path

    def __hash__(self):
        return hash(self.path)

    def __repr__(self):
        return f"Run({self.key})"

    @property
    def spec(self) -> Stage:
        return spec(self.stage)

    @property
    def name(self) -> str:
        return self.spec.run_name(self.cfg)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}/seed={self.seed}"

    @property
    def path(self) -> Path:
        return runs.run_dir(self.cfg, self.stage, self.name, self.seed)

    @property
    def label(self) -> str:
        return self.spec.label(self.cfg)

    @property
    def heads(self) -> tuple:
        return self.spec.heads(self.cfg)

    @property
    def phase(self) -> str:
        return self.spec.phase

    def upstream(self) -> list[Run]:
        """The runs this one is built on (bilateral: its hemispheres; ensemble: its pool)."""
        return [Run(s, dataclasses.replace(self.cfg, **o), self.seed)
                for s, o in self.spec.upstream(self.cfg)]

    def epochs(self) -> int:
        return train.hyper(self.cfg, self.stage).epochs if self.spec.build else 0

    def cost(self) -> float:
        """Estimated training cost in ResNet-9 epochs (epochs x relative cost per epoch)."""
        return self.epochs() * self.spec.epoch_cost(self.cfg) + self.spec.fixed_cost(self.cfg)

    # -------------------------------------------------------------------- on disk

    def record(self) -> dict | None:
        """config.json (written when training starts), or None."""
        f = self.path / "config.json"
        return runs.read_json(f) if f.exists() else None

    def status(self) -> str:
        rec = self.record()
        if rec is None:
            return "missing"
        if self.stale_reasons(rec):
            return "stale"
        return "finished" if runs.finished(self.path) else "in_progress"

    def stale_reasons(self, rec: dict | None = None) -> list[str]:
        """Why the record on disk is not this run (empty: it is, or there is none)."""
        rec = rec or self.record()
        if rec is None:
            return []
        out = []
        changes = C.diff(rec["config"], runner.identity(self))  # precision resolved
        if changes:
            out.append(f"its folder holds another config ({'; '.join(changes)})")
        changed = self.changed_upstream(rec)
        if changed:
            out.append(f"upstream retrained or removed since it was built: {', '.join(changed)}")
        return out

    def changed_upstream(self, rec: dict | None = None) -> list[str]:
        """Keys of upstream runs whose model.pt is not the one this run was built on."""
        rec = rec or self.record()
        ups = self.upstream()
        if rec is None or not ups:
            return []
        if "upstream" not in rec:  # recorded before provenance existed: compare times instead
            t = (self.path / "config.json").stat().st_mtime
            return [u.key for u in ups if not (u.path / "model.pt").exists()
                    or (u.path / "model.pt").stat().st_mtime > t]
        now, then = upstream_hashes(self), rec["upstream"]
        return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))

    def metrics(self) -> dict | None:
        f = self.path / "metrics.json"
        return runs.read_json(f) if f.exists() else None

    def history(self):
        """history.csv as a DataFrame (one row per epoch); empty when there is none."""
        import pandas as pd
        f = self.path / "history.csv"
        return pd.read_csv(f) if f.exists() and f.stat().st_size else pd.DataFrame()

    def command(self, params="params/<preset>.yaml") -> str:
        """The command line that trains this run alone."""
        sets = "".join(f" --set {k}={getattr(self.cfg, k)}" for k in VARIANT_FIELDS
                       if k in self.spec.uses + self.spec.owns)
        return f"python -m bilateral train {self.stage} --params {params} --seed {self.seed}{sets}"

    def check_finished(self):
        """Raise unless this run is finished and current: FileNotFoundError naming the command
        that makes it, or runs.RunConflict saying why it is stale."""
        status = self.status()
        if status == "stale":
            raise runs.RunConflict(f"{self.stage} run {self.path} is stale: "
                                   f"{'; '.join(self.stale_reasons())}; retrain it with:\n  "
                                   f"{self.command()} --force")
        if status != "finished":
            raise FileNotFoundError(f"{self.stage} run {self.path} is {status.replace('_', ' ')}; "
                                    f"make it with:\n  {self.command()}")

    def build(self, hier, hashes: dict | None = None):
        """This run's untrained model, its builder handed the trained models of its upstream
        runs (loaded here; `hashes` collects the sha256 of the bytes each was loaded from)."""
        if self.spec.build is None:
            raise ValueError(f"stage {self.stage!r} has no model of its own to build")
        return self.spec.build(self.cfg, hier, [u.load_model(hier, "cpu", hashes)
                                                for u in self.upstream()])

    def load_model(self, hier, device="cpu", hashes: dict | None = None):
        """The trained model, rebuilt from the config (and its upstream models) and loaded
        strictly; `hashes` collects {run key: sha256 of the bytes loaded}."""
        self.check_finished()
        if self.spec.build is None:
            raise ValueError(f"{self.stage} runs have no model file of their own")
        model = self.build(hier)
        state, sha = runs.read_torch(self.path / "model.pt")
        models.load_state_strict(model, state, what=f"{self.stage} run {self.path}")
        if hashes is not None:
            hashes[self.key] = sha
        return model.to(device).eval()

    def __reduce__(self):
        # a worker process that unpickles a run of a stage registered outside the package
        # (a user's plug-in module) imports that module first
        return unpickle_run, (self.stage, self.cfg, self.seed, self.spec.variants.__module__)

    def train(self, force: bool = False, log=print, wait: bool = False) -> dict:
        """Train this run (or read it when finished with the same config); its metrics."""
        return runner.train_runs([self], force, log, wait)[0]


def unpickle_run(stage, cfg, seed, module):
    if stage not in STAGES:
        importlib.import_module(module)  # a plug-in outside the package registers its stage
    return Run(stage, cfg, seed)


# ---------------------------------------------------------------------------- 3. provenance

def upstream_hashes(run: Run) -> dict[str, str | None]:
    """{upstream key: sha256 of its model.pt}: what a run records, and what is checked later."""
    return {u.key: runs.file_hash(u.path / "model.pt") for u in run.upstream()}


def changed_in(experiment_dir, record: dict) -> list[str]:
    """The recorded upstream runs whose model.pt in experiment_dir changed since: for readers
    that have a folder of records rather than a config (the report). A key is a relative path."""
    return sorted(k for k, h in record.get("upstream", {}).items()
                  if runs.file_hash(Path(experiment_dir) / k / "model.pt") != h)


# ---------------------------------------------------------------------------------- 4. plans

def study_runs(cfg: C.Config, seed: int) -> list[Run]:
    """The runs the study asks for directly (not their upstream): every stage's variants;
    a baseline or a control (config.BASELINES) only when it is listed in cfg.baselines."""
    out = []
    for s in STAGES.values():
        if (s.phase == "baselines" or s.name in C.BASELINES) and s.name not in cfg.baselines:
            continue
        out += [Run(s.name, dataclasses.replace(cfg, **v), seed) for v in s.variants(cfg)]
    return out


def order(roots: list[Run]) -> list[Run]:
    """roots and everything upstream of them, each once, every run after its upstream runs."""
    out, seen = [], set()

    def visit(run):
        if run in seen:
            return
        seen.add(run)
        for u in run.upstream():
            visit(u)
        out.append(run)

    for r in roots:
        visit(r)
    return out


def parse_seeds(items) -> list[int]:
    """Seeds from the command line: '0-4', '0 1 2', '0,2' (or ints); in order, each once."""
    out = []
    for item in [items] if isinstance(items, (str, int)) else list(items):
        for part in str(item).replace(",", " ").split():
            lo, sep, hi = part.partition("-")
            try:
                a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
            except ValueError:
                raise C.ConfigError(f"--seeds: {part!r} is not a seed; give seeds as 0-4, "
                                    f"0 1 2 or 0,2 (non-negative integers)") from None
            if a < 0 or b < a:
                raise C.ConfigError(f"--seeds: bad range {part!r}; give seeds as 0-4, 0 1 2 or 0,2")
            out += range(a, b + 1)
    if not out:
        raise C.ConfigError("--seeds: no seed given; give seeds as 0-4, 0 1 2 or 0,2")
    return list(dict.fromkeys(out))


def plan(cfg: C.Config, seeds) -> list[Run]:
    """The whole study for these seeds: every run once, each after its upstream runs."""
    cfg = C.validate(cfg)
    return order([r for seed in parse_seeds(seeds) for r in study_runs(cfg, seed)])


def phase_of(name: str) -> str:
    """A phase from its name or a notebook's ('02_hemispheres', '03_bilateral.ipynb')."""
    key = Path(str(name)).name.removesuffix(".ipynb")
    head, _, tail = key.partition("_")
    key = tail if head.isdigit() else key
    if key not in PHASES:
        raise C.ConfigError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
    return key


def phase_runs(cfg: C.Config, phase: str, seed: int) -> list[Run]:
    """The runs one phase trains for one seed, in dependency order."""
    phase = phase_of(phase)
    return [r for r in plan(cfg, [seed]) if r.phase == phase]


def pending(runs_: list[Run]) -> list[Run]:
    """The runs a sweep would (re)train: those not finished, and every run downstream of one."""
    todo = set()
    for r in runs_:  # dependency order: upstream runs are decided first
        if r.status() != "finished" or any(u in todo for u in r.upstream()):
            todo.add(r)
    return [r for r in runs_ if r in todo]


def totals(runs_: list[Run]) -> dict:
    """Counts and costs of a plan: runs per status, cost in all and still to train (in
    ResNet-9 epochs), and that cost in ResNet-9 trainings when every run has the same epochs."""
    status = [r.status() for r in runs_]
    todo = pending(runs_)
    epochs = {r.epochs() for r in runs_ if r.epochs()}
    return dict(runs=len(runs_), **{k: status.count(k) for k in STATUSES},
                cost=sum(r.cost() for r in runs_), todo=len(todo),
                todo_cost=sum(r.cost() for r in todo),
                epochs=epochs.pop() if len(epochs) == 1 else None)


# ------------------------------------------------------------------------------ 5. printing

def _ranges(numbers) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, numbers = [], sorted(numbers)
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def describe(runs_: list[Run]) -> str:
    """The plan as text: every run with its status, cost and the runs it waits for, then
    totals. Stale runs are listed with the reason; they and everything downstream of a run
    still to train count as still to train."""
    index = {r: i + 1 for i, r in enumerate(runs_)}
    status = {r: r.status() for r in runs_}
    w = max([len(r.key) for r in runs_] + [3])
    lines = [f"{'#':>4}  {'run':<{w}}  {'status':<11}  {'epochs':>6}  {'cost':>8}  after"]
    for r in runs_:
        after = _ranges(index[u] for u in r.upstream() if u in index)
        lines.append(f"{index[r]:>4}  {r.key:<{w}}  {status[r]:<11}  {r.epochs() or '-':>6}  "
                     f"{r.cost():>8.1f}  {after}".rstrip())
    stale = [r for r in runs_ if status[r] == "stale"]
    if stale:
        lines += ["", "stale (training refuses them without --force):"]
        lines += [f"  {r.key}: {'; '.join(r.stale_reasons())}" for r in stale]
    groups = [g for g in runner.packable_groups(pending(runs_)) if len(g) > 1]
    if groups:
        lines += ["", f"packed (pack: {runs_[0].cfg.pack}): each group trains as one model, in one job:"]
        lines += [f"  {len(g)} x {g[0].stage} {g[0].name}: runs {_ranges(index[r] for r in g)}"
                  for g in groups]
    lines += ["", f"{'stage':<24} {'runs':>5} {'cost':>10}  model"]
    for s in dict.fromkeys(r.stage for r in runs_):
        rs = [r for r in runs_ if r.stage == s]
        lines.append(f"{s:<24} {len(rs):>5} {sum(r.cost() for r in rs):>10,.1f}  {spec(s).title}")
    t = totals(runs_)
    counts = ", ".join(f"{t[k]} {k.replace('_', ' ')}" for k in STATUSES)
    e = t["epochs"]
    per = f" (= {t['cost'] / e:,.1f} ResNet-9 trainings of {e} epoch{'s' * (e != 1)})" if e else ""
    lines += [f"{'total':<24} {t['runs']:>5} {t['cost']:>10,.1f}",
              "", f"{t['runs']} runs: {counts}",
              f"cost in ResNet-9 epochs (epochs x cost per epoch relative to ResNet-9, measured "
              f"on CPU at width 1): {t['cost']:,.1f} in all{per}, {t['todo_cost']:,.1f} "
              f"still to train ({t['todo']} runs)"]
    return "\n".join(lines)



# ------------------------------------------------------------------------------ 6. running

def run_stage(stage: str, cfg: C.Config, seed: int, force: bool = False, log=print,
              wait: bool = False) -> dict:
    """Train (or, if already finished with the same config, just read) one run; return its
    metrics. A run whose upstream runs were retrained since it was built is refused (stale),
    unless `force`, which retrains it. Bad data stops before the run folder is claimed; a second
    process asking for a run in progress refuses (runs.RunLocked), or waits with `wait`."""
    return Run(stage, C.validate(cfg), seed).train(force, log, wait)


def build_model(stage, cfg, hier, seed=0):
    """A stage's untrained model (the bilateral one: the trained hemispheres of `seed`, frozen)."""
    return Run(stage, cfg, seed).build(hier)


def load_run_model(stage, cfg, seed, hier, device="cpu"):
    """The trained model of a finished run, rebuilt from its config and loaded strictly."""
    return Run(stage, cfg, seed).load_model(hier, device)
