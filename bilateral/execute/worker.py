"""One job in its own process: `python -m bilateral.execute.worker JOB RESULT`.

JOB is a pickle of the job's callable, written by the local executor; RESULT receives a pickle
of ("ok", value) or ("failed", traceback text). The process asks the kernel to kill it when its
parent dies (PR_SET_PDEATHSIG), so a sweep stopped by any signal leaves no worker behind.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import traceback


def die_with_parent(parent: int):
    """SIGKILL this process when the parent does (Linux); then check it has not died already."""
    if sys.platform.startswith("linux"):
        try:
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def main(job_file: str, result_file: str, parent: int) -> int:
    die_with_parent(parent)
    try:
        with open(job_file, "rb") as f:
            fn = pickle.load(f)  # written by this sweep's own process, never by a user
        result = ("ok", fn())
    except BaseException:  # noqa: BLE001 - the parent reports it
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        result = ("failed", text)
    tmp = result_file + ".tmp"
    with open(tmp, "wb") as f:
        try:
            pickle.dump(result, f)
        except Exception as e:  # noqa: BLE001 - an unpicklable return value
            f.seek(0)
            f.truncate()
            pickle.dump(("ok", repr(e)), f)
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
