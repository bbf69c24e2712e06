"""`python -m bilateral bench`: the project's fast path against the conventional pipeline.

Every comparison runs in one process, on the same model, batch size and device, back to back,
so the ratios stay fair on a machine whose load changes while it runs (the load average is
recorded with every section). Sections, one module each or a few per module:

1. throughput (sections.py)  hemisphere training images/s: DeviceLoader against a torchvision
   Dataset of PIL images in a DataLoader with worker processes (conventional.py).
2. bilateral (sections.py)   one epoch of head training on cached frozen features against
   recomputing the hemispheres, the one-off cost of the cache, and the cached epoch with all
   threads or one, on an idle machine and beside one busy loop per core.
3. time_to_accuracy (accuracy.py)  the `fast` recipe against the CONVERGED `original` one.
4. cuda (sections.py)        AMP and channels_last on/off, torch.compile on/off (CUDA only).
5. memory (memory.py)        peak resident memory of hemisphere training, in a child process.
6. packing (packing.py)      packed against separate training, N = 2, 5, 10 members.
7. cpu (packing.py)          torch.compile, channels_last and threads per worker on CPU; for the
   pyramid k-WTA hemisphere, k-WTA selecting with numpy against torch's kthvalue, and glibc
   keeping freed memory (train.keep_freed_memory) against not.
8. precision (precision.py)  float32 against bf16 autocast per model of the study, and what
   `precision: auto` picks here; section 6 also prints the measurement `pack: auto` decides by.

Every training step is train.train_step, the step of every run. No timing is asserted
anywhere; the figures are written to outputs/bench/bench-<device>.json.
"""
from .report import SECTIONS, main, run, table  # noqa: F401
