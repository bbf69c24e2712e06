"""Executors: where jobs run. Each is `run(jobs, deps, options, log) -> [Outcome]` over the
vocabulary of jobs.py, and imports nothing of its callers; this is the one place that names them."""
from . import local, slurm
from .jobs import Job, Outcome  # noqa: F401

EXECUTORS = {"local": local.run, "slurm": slurm.run}
