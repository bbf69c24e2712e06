"""Fixtures more than one test module needs."""
import fcntl
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node cluster of scripts/slurm-up.sh, started when it is not up yet (a real
    cluster, not a mock; the script installs SLURM as root where it is missing). Every SLURM
    test asks for it, so none depends on another module having started it first."""
    # one start at a time: under pytest-xdist two workers may both find the cluster down
    lock = open(Path(tempfile.gettempdir()) / "bilateral-slurm-up.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = subprocess.run([str(ROOT / "scripts" / "slurm-up.sh")], capture_output=True,
                           text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SLURM could not be started: {e}")
    finally:
        lock.close()  # releases the lock
    if p.returncode != 0:
        pytest.skip(f"SLURM could not be started: {(p.stderr or p.stdout).strip()}")
