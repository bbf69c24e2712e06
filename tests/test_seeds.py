"""derive_seed: one stable seed per (seed, purpose, ...), the same in every process."""
import os
import subprocess
import sys

import pytest
import torch

from bilateral.seeds import derive_seed


def test_same_parts_same_seed_in_another_process():
    parts = (3, "run", "hemisphere", "A-left")
    code = f"from bilateral.seeds import derive_seed; print(derive_seed(*{parts!r}))"
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a hash()-based seed would move here
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert int(out) == derive_seed(*parts)


def test_every_part_moves_the_seed_and_it_fits_torch():
    base = derive_seed(0, "device loader", 0)
    others = [derive_seed(1, "device loader", 0), derive_seed(0, "feature loader", 0),
              derive_seed(0, "device loader", 1), derive_seed(0, "device loader", "0")]
    assert len({base, *others}) == 5
    for s in (base, *others):
        assert 0 <= s < 2 ** 63
        torch.Generator().manual_seed(s)


def test_no_parts_is_an_error():
    with pytest.raises(ValueError, match="seed and a purpose"):
        derive_seed()
