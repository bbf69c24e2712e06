"""Every random stream of the study is seeded here, from (seed, purpose, ...).

Two streams with different purposes (a run's initial weights, a loader's epoch order, the
synthetic images) never share a torch seed by accident, and a stream does not move when another
purpose is added. sha256 of the parts' repr: stable across runs, processes and platforms,
unlike hash().
"""
import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from ints and strings, conventionally (seed, purpose, ...): e.g.
    derive_seed(seed, "run", stage, name) or derive_seed(seed, "device loader", epoch)."""
    if not parts:
        raise ValueError("derive_seed needs at least a seed and a purpose")
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
