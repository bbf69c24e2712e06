"""The plan executed (bilateral.sweep): local workers against the sequential path, a real
one-node SLURM cluster (scripts/slurm-up.sh; not a mock) for dependencies, results and a
requeue that resumes, a failing run whose dependants are skipped, grids and options."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bilateral import config as C
from bilateral import plan, runner, runs, sweep
from bilateral.execute import jobs as execjobs
from bilateral.execute import slurm

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"
SEEDS = [0, 1]
# The smoke preset reduced so that the 2-seed plan trains in about half a minute on 2 cores:
# condition A (the pyramid trains in test_stages), a pool of 2 with one 2-member
# ensemble, 1 epoch, no ResNet-18/34, unspecialised model or control. 12 runs; bilateral runs wait for
# their hemispheres, the ensemble for its pool. pack=off: one job per run, whose records equal
# the sequential path's bit for bit (packed ones only up to float rounding, see test_packed).
REDUCED = ["conditions=[A]", "pool_size=2", "ensemble_sizes=[2]", "epochs=1",
           "baselines=[unilateral, ensemble]", "pack=off"]


def reduced(out, *more):
    return [*REDUCED, f"out_dir={out}", *more]


def the_plan(out, seeds=SEEDS, *more):
    return plan.plan(C.load(SMOKE, reduced(out, *more)), seeds)


def metrics_of(runs_) -> dict:
    """{run key: metrics without the wall time} of finished runs."""
    out = {}
    for r in runs_:
        m = r.metrics()
        assert m is not None, f"{r.key} did not finish"
        m.pop("wall_s")
        m.pop("history_sha256", None)  # history.csv holds each epoch's seconds
        out[r.key] = m
    return out


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The reference: every run of the plan in order in this process (plan.run_stage)."""
    out = tmp_path_factory.mktemp("sequential")
    runs_ = the_plan(out)
    for r in runs_:
        plan.run_stage(r.stage, r.cfg, r.seed, log=lambda m: None)
    return metrics_of(runs_)


# ------------------------------------------------------------------------------- local

def test_local_workers_equal_the_sequential_path(sequential, tmp_path, capsys):
    code, outcomes = sweep.sweep(SMOKE, SEEDS, "local", jobs=2, overrides=reduced(tmp_path))
    assert code == 0 and [o.status for o in outcomes] == ["ok"] * 12
    assert metrics_of(the_plan(tmp_path)) == sequential
    text = capsys.readouterr().out
    assert "12 trainings to run" in text and "12 of 12 trainings ran" in text
    # each job's own log; a rerun finds everything finished and submits nothing
    log = Path(outcomes[0].log)
    assert log.parent == tmp_path / "smoke" / "jobs" / "local" and "done in" in log.read_text()
    code, outcomes = sweep.sweep(SMOKE, SEEDS, "local", jobs=2, overrides=reduced(tmp_path))
    assert code == 0 and outcomes == []
    assert "nothing to train" in capsys.readouterr().out


def test_priorities_start_the_longest_chains_first(tmp_path):
    """A job's priority is the cost of the costliest chain that starts with it (itself, then
    the jobs that wait on it, and so on): every upstream run outranks the runs built on it, the
    pyramid k-WTA hemisphere outranks the plain one, and ensembles (no training) come last."""
    cfg = C.load(ROOT / "params" / "fashion_mnist.yaml", [f"out_dir={tmp_path}"])
    job_list, job_deps, runs_of = sweep.make_jobs(plan.plan(cfg, [0, 1]), set())
    assert all(len(rs) == 1 for rs in runs_of.values())  # pack: auto leaves CPU runs apart
    job_rank = execjobs.priorities(job_list, job_deps)
    run_of = {j: runs_of[j][0] for j in job_list}
    jobs = [run_of[j] for j in job_list]
    deps = {run_of[j]: [run_of[u] for u in job_deps[j]] for j in job_list}
    rank = {run_of[j]: r for j, r in job_rank.items()}

    def chains(j):  # every chain from j downstream, spelled out
        after = [k for k in jobs if j in deps[k]]
        return [[j]] if not after else [[j, *c] for k in after for c in chains(k)]
    for j in jobs:
        assert rank[j] == pytest.approx(max(sum(r.cost() for r in c) for c in chains(j))), j.key
        assert all(rank[u] > rank[j] for u in deps[j]), j.key
    by_name = {(r.name, r.seed): rank[r] for r in jobs if r.stage == "hemisphere"}
    assert by_name[("resnet9-D-left", 0)] > by_name[("resnet9-A-left", 0)]
    assert {r.stage for r in jobs if rank[r] == min(rank.values())} == {"ensemble"}


def test_local_sweep_trains_packed_groups_as_one_job(tmp_path):
    """pack=on: a hemisphere across the 2 seeds is one job, the 2 seeds' pools another; every
    run still gets its own verified record, and the dependants wait for the packed jobs."""
    code, outcomes = sweep.sweep(SMOKE, SEEDS, "local", overrides=reduced(tmp_path, "conditions=[A]", "pack=on"),
                                 log=lambda m: None)
    assert code == 0 and [o.status for o in outcomes] == ["ok"] * 12
    jobs = {}
    for o in outcomes:
        jobs.setdefault(o.log, []).append(o.run.key)
    assert sorted(map(len, jobs.values())) == [1, 1, 1, 1, 2, 2, 4]
    (pool,) = [log for log, keys in jobs.items() if len(keys) == 4]
    assert all(k.startswith("unilateral/") for k in jobs[pool]) and "[packed x4]" in Path(pool).read_text()
    runs_ = the_plan(tmp_path, SEEDS, "conditions=[A]", "pack=on")
    assert {r.status() for r in runs_} == {"finished"}
    for r in runs_:
        assert "model_sha256" in runs.verify(r.path) or r.stage == "ensemble"
        for u in r.upstream():
            assert (r.path / "config.json").stat().st_mtime >= (u.path / "metrics.json").stat().st_mtime


def corrupt_checkpoint(run):
    """An interrupted run whose checkpoint is garbage: resuming it fails."""
    runs.write_json(run.path / "config.json", {"config": runner.identity(run)})  # precision resolved
    (run.path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert run.status() == "in_progress"


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_a_failing_run_skips_its_dependants_only(executor, tmp_path, capsys, request):
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")
    runs_ = the_plan(tmp_path, [0], "conditions=[A]")
    left = next(r for r in runs_ if r.key == "hemisphere/resnet9-A-left/seed=0")
    corrupt_checkpoint(left)
    # local: in this process (the 2-worker pool is exercised above); slurm: jobs of the cluster
    code, outcomes = sweep.sweep(SMOKE, [0], executor, jobs=1, slurm={"cpus": 1},
                                 overrides=reduced(tmp_path, "conditions=[A]"))
    status = {o.run.key: o.status for o in outcomes}
    assert code == 1
    assert status.pop(left.key) == "failed" and status.pop("bilateral/resnet9-A/seed=0") == "skipped"
    assert set(status.values()) == {"ok"} and len(status) == 4  # right hemisphere, pool, ensemble
    text = capsys.readouterr().out
    summary = (tmp_path / "smoke" / "jobs" / "summary.txt").read_text()
    for t in (text, summary):
        assert "4 of 6 trainings ran; 1 failed, 1 skipped" in t
        assert "load" in t and "Error" in t  # the traceback's last lines: torch.load failed
        assert "upstream job hemisphere/resnet9-A-left/seed=0 did not finish" in t


def test_stale_runs_need_force(tmp_path):
    runs_ = the_plan(tmp_path, [0], "conditions=[A]", "baselines=[]")
    for r in runs_:
        r.train(log=lambda m: None)
    right = next(r for r in runs_ if r.key == "hemisphere/resnet9-A-right/seed=0")
    (right.path / "metrics.json").unlink()  # interrupted retrain: the bilateral run goes stale
    more = reduced(tmp_path, "conditions=[A]", "baselines=[]")
    with pytest.raises(C.ConfigError, match=r"(?s)bilateral/resnet9-A/seed=0 .*--force"):
        sweep.sweep(SMOKE, [0], "local", overrides=more)
    code, outcomes = sweep.sweep(SMOKE, [0], "local", overrides=more, force=True)
    assert code == 0 and [o.run.key for o in outcomes] == [right.key, "bilateral/resnet9-A/seed=0"]
    assert {r.status() for r in runs_} == {"finished"}


# ------------------------------------------------------------------------------- SLURM

def job_times(job_id) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return re.search(r"StartTime=(\S+)", out)[1], re.search(r"EndTime=(\S+)", out)[1]


def test_slurm_plan_waits_for_upstream_runs_and_equals_local(slurm_cluster, sequential, tmp_path):
    # condition A only (12 jobs; a job costs a Python start): the same runs as those of the
    # sequential path, whose conditions list is not part of a run's identity
    code, outcomes = sweep.sweep(SMOKE, SEEDS, "slurm", slurm={"cpus": 1, "max_parallel": 2},
                                 overrides=reduced(tmp_path, "conditions=[A]"))
    assert code == 0 and [o.status for o in outcomes] == ["ok"] * 12
    runs_ = the_plan(tmp_path, SEEDS, "conditions=[A]")
    assert metrics_of(runs_) == {r.key: sequential[r.key] for r in runs_}
    job = {o.run: o.job_id for o in outcomes}
    assert len({j.split("_")[0] for j in job.values()}) == 5  # 1 array + 2 bilateral + 2 ensembles
    for r in runs_:
        for u in r.upstream():
            # the dependant started (its record) after the upstream run finished (its metrics),
            # and SLURM started its job no earlier than the upstream job ended (ISO times)
            assert (r.path / "config.json").stat().st_mtime >= (u.path / "metrics.json").stat().st_mtime
            assert job_times(job[r])[0] >= job_times(job[u])[1], (r.key, u.key)
    logs = list((tmp_path / "smoke" / "jobs").glob("*/*_log.out"))
    assert len(logs) == 12


def test_slurm_job_signalled_mid_run_requeues_and_resumes(slurm_cluster, tmp_path):
    more = ["conditions=[A]", "baselines=[]", "epochs=6"]
    run = next(r for r in the_plan(tmp_path / "slurm", [0], *more) if r.stage == "hemisphere")
    todo, _ = sweep.to_train([run])
    job_list, deps, _ = sweep.make_jobs(todo, set(), "slurm")
    jobs = slurm.submit(job_list, deps, {"cpus": 1}, log=lambda m: None)
    job = jobs[job_list[0]]
    history = run.path / "history.csv"
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):  # epoch 1 done
        assert not job.paths.result_pickle.exists(), "the job ended before it was signalled"
        time.sleep(0.1)
    # what SLURM sends before a time limit (--signal=USR2@90) or on preemption
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    [outcome] = slurm.wait(jobs, deps, log=lambda m: None, poll=1)
    assert outcome.status == "ok", outcome.error
    info = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in info  # requeued once
    log = job.paths.stdout.read_text()
    resumed = re.search(r"resuming from epoch (\d+)", log)
    assert resumed and 1 <= int(resumed[1]) < 6, log[-2000:]
    assert [int(x.split(",")[0]) for x in history.read_text().splitlines()[1:]] == list(range(1, 7))
    # the same numbers as an uninterrupted run
    fresh = next(r for r in the_plan(tmp_path / "local", [0], *more) if r.stage == "hemisphere")
    fresh.train(log=lambda m: None)
    assert metrics_of([run])[run.key] == metrics_of([fresh])[fresh.key]


# ---------------------------------------------------------------------- grids and options

def test_grid_expands_into_named_experiments(tmp_path):
    points = sweep.expand_grid(SMOKE, reduced(tmp_path), ["width=0.03125,0.0625", "conditions=[A],[A,B]"])
    assert [c.experiment for c, _ in points] == [
        "smoke-width=0.03125-conditions=A", "smoke-width=0.03125-conditions=A,B",
        "smoke-width=0.0625-conditions=A", "smoke-width=0.0625-conditions=A,B"]
    assert points[3][0].width == 0.0625 and points[3][0].conditions == ["A", "B"]
    assert points[3][1] == {"width": 0.0625, "conditions": ["A", "B"]}
    for bad, msg in [("widht=1,2", "grid.widht: not a parameter"), ("width=a", "grid.width: expected float"),
                     ("width", "--grid expects key=v1,v2")]:
        with pytest.raises(C.ConfigError, match=msg):
            sweep.expand_grid(SMOKE, reduced(tmp_path), [bad])


def test_grid_sweep_writes_one_table_across_points(tmp_path):
    code, outcomes = sweep.sweep(SMOKE, [0], "local", grid=["width=0.03125,0.0625"],
                                 overrides=reduced(tmp_path, "conditions=[A]", "baselines=[]"))
    assert code == 0 and len(outcomes) == 6
    table = (tmp_path / "smoke-grid" / "results.csv").read_text().splitlines()
    assert table[0].startswith("width,model,")
    assert sum(line.startswith("0.0625,bilateral/resnet9-A") for line in table) == 1
    assert (tmp_path / "smoke-width=0.0625" / "results.md").exists()


def test_slurm_options_are_validated_and_translated():
    with pytest.raises(C.ConfigError, match="slurm.gpu: unknown option; allowed: partition"):
        C.load(SMOKE, ["slurm={gpu: 1}"])
    p = slurm.slurm_parameters({"partition": "gpu", "time": 90, "gpus": 1, "cpus": 8,
                                "mem_gb": 16, "max_parallel": 4}, n_jobs=10)
    assert p["partition"] == "gpu" and p["time"] == 90 and p["gpus_per_node"] == 1
    assert p["cpus_per_task"] == 8 and p["mem"] == "16384MB" and p["array_parallelism"] == 4
    assert p["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    assert sweep.mem_gb("512M") == 0.5 and sweep.mem_gb("16G") == 16
    assert "slurm" not in C.identity(C.load(SMOKE, ["slurm={partition: gpu}"]))


def test_estimate_names_the_cpu_preset_for_a_gpu_sized_one(tmp_path):
    import torch
    cfg = C.load(ROOT / "params" / "paper_resnet9.yaml", [f"out_dir={tmp_path}"])
    todo = plan.plan(cfg, [0])
    text = sweep.estimate(todo, cfg, device=torch.device("cpu"))
    assert f"{len(todo)} trainings to run" in text and "params/fashion_mnist.yaml" in text


def test_cli_stops_on_a_bad_option_before_any_work():
    p = subprocess.run([sys.executable, "-m", "bilateral", "sweep", str(SMOKE), "--executor", "slurm",
                        "--mem", "lots"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--mem: expected a size such as 16G or 512M, got 'lots'" in p.stderr
