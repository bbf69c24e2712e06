"""bilateral.data: file formats on real images, splits, synthetic data and the device loader."""
import gzip, hashlib, pickle, shutil, time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bilateral import data as D
from bilateral.data import STATS, DeviceLoader, Hierarchy, Split, load_dataset

# the 20 real CIFAR-100 test images travel with the repository (README and SHA256SUMS beside them)
SAMPLE = Path(__file__).resolve().parent / "data/cifar100-test-sample20/cifar100_test_first20.npz"
FMNIST = D.FMNIST_SYSTEM_DIR
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                  reason=f"Fashion-MNIST not installed in {FMNIST} (apt-get install dataset-fashion-mnist)")


# ---------------------------------------------------------------- CIFAR-100 format on 20 real images
@pytest.fixture(scope="module")
def sample():
    if not SAMPLE.is_file():
        pytest.fail(f"missing {SAMPLE}: the 20-image CIFAR-100 fixture belongs in tests/data")
    return dict(np.load(SAMPLE))


def write_cifar(root, s, coarse=None, data=None):
    """The official layout: pickled dicts with bytes keys, data rows of 3072 bytes in CHW order."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rows = s["images"].transpose(0, 3, 1, 2).reshape(len(s["images"]), 3072) if data is None else data
    batch = {b"filenames": [b"img_%d.png" % i for i in range(len(rows))], b"batch_label": b"fixture",
             b"fine_labels": s["fine_labels"].tolist(),
             b"coarse_labels": (s["coarse_labels"] if coarse is None else coarse).tolist(), b"data": rows}
    meta = {b"fine_label_names": [n.encode() for n in s["fine_label_names"]],
            b"coarse_label_names": [n.encode() for n in s["coarse_label_names"]]}
    for name, obj in (("train", batch), ("test", batch), ("meta", meta)):
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return root


def test_cifar_reads_official_format(sample, tmp_path):
    s = load_dataset("cifar100", "test", write_cifar(tmp_path, sample))
    assert s.name == "cifar100" and len(s) == 20
    assert s.images.dtype == torch.uint8 and s.images.shape == (20, 3, 32, 32)
    assert torch.equal(s.images, torch.from_numpy(sample["images"]).permute(0, 3, 1, 2))
    assert s.fine.tolist() == sample["fine_labels"].tolist()
    assert s.coarse.tolist() == sample["coarse_labels"].tolist()
    assert s.fine.dtype == s.coarse.dtype == torch.int64
    h = s.hierarchy
    assert (h.n_fine, h.n_coarse) == (100, 20)
    assert h.fine_names[49] == "mountain" and h.fine_names[0] == "apple"
    assert h.coarse_names[10] == "large_natural_outdoor_scenes"
    assert h.fine_to_coarse == tuple(sample["fine_to_coarse"].tolist())
    assert np.bincount(h.fine_to_coarse).tolist() == [5] * 20
    assert torch.equal(h.coarse_of(s.fine), s.coarse)


def test_cifar_train_val(sample, tmp_path):
    root = write_cifar(tmp_path, sample)
    train = load_dataset("cifar100", "train", root, val_size=0)
    assert torch.equal(train.images, load_dataset("cifar100", "test", root).images)
    assert len(load_dataset("cifar100", "val", root, val_size=0)) == 0
    # 1 image per fine class for val, but 86 classes are absent and some have a single image
    with pytest.raises(ValueError, match="val_size=100"):
        load_dataset("cifar100", "val", root, val_size=100)


def test_cifar_missing_names_folder_and_command(tmp_path, monkeypatch):
    where = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar100", "test", where)
    msg = str(e.value)
    assert str(where / "cifar-100-python") in msg
    assert f"python -m bilateral download cifar100 --data-dir {where}" in msg
    assert "fashion_mnist" in msg and "synthetic" in msg

    def offline(*a, **k): raise OSError("no network")
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="no network") as e:
        load_dataset("cifar100", "test", where, download=True)
    assert "python -m bilateral download cifar100" in str(e.value)


def test_cifar_truncated_pickle_names_file(sample, tmp_path):
    root = write_cifar(tmp_path, sample)
    path = root / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated") as e:
        load_dataset("cifar100", "test", root)
    assert str(path) in str(e.value)


def test_cifar_bad_contents_name_file(sample, tmp_path):
    coarse = sample["coarse_labels"].copy()
    coarse[3] = (coarse[3] + 1) % 20  # a fine label paired with the wrong superclass
    root = write_cifar(tmp_path / "a", sample, coarse=coarse)
    with pytest.raises(ValueError, match="row 3") as e:
        load_dataset("cifar100", "test", root)
    assert str(root / "cifar-100-python" / "test") in str(e.value)
    root = write_cifar(tmp_path / "b", sample, data=np.zeros((20, 3000), np.uint8))
    with pytest.raises(ValueError, match="3072") as e:
        load_dataset("cifar100", "train", root, val_size=0)
    assert str(root / "cifar-100-python" / "train") in str(e.value)


# ---------------------------------------------------------------- Fashion-MNIST (installed IDX files)
@needs_fmnist
def test_fashion_mnist_real():
    tr, va, te = (load_dataset("fashion_mnist", s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (55000, 5000, 10000)
    for s in (tr, va, te):
        assert s.images.shape[1:] == (3, 32, 32) and s.images.dtype == torch.uint8
        assert torch.equal(s.images[:, 0], s.images[:, 1]) and torch.equal(s.images[:, 0], s.images[:, 2])
        border = s.images.clone()
        border[:, :, 2:30, 2:30] = 0
        assert border.max() == 0  # 2 px of zero padding on every side
    assert torch.bincount(va.fine).tolist() == [500] * 10
    assert (torch.bincount(tr.fine) + torch.bincount(va.fine)).tolist() == [6000] * 10
    # pixels and labels as in the raw IDX files
    raw = np.frombuffer(gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    assert torch.equal(te.images[:, 0, 2:30, 2:30], torch.from_numpy(raw.reshape(-1, 28, 28).copy()))
    assert te.fine.tolist() == labels.tolist()
    h = te.hierarchy
    coarse_of = {f: h.coarse_names[c] for f, c in zip(h.fine_names, h.fine_to_coarse)}
    assert coarse_of["Sandal"] == coarse_of["Sneaker"] == coarse_of["Ankle boot"] == "Shoes"
    assert coarse_of["T-shirt/top"] == coarse_of["Pullover"] == coarse_of["Shirt"] == "Tops"
    assert coarse_of["Bag"] == "Accessories" and coarse_of["Coat"] == "Outers"
    assert torch.equal(te.coarse, h.coarse_of(te.fine))
    # the val split is fixed by split_seed alone
    assert torch.equal(load_dataset("fashion_mnist", "val", seed=5).images, va.images)
    assert not torch.equal(load_dataset("fashion_mnist", "val", split_seed=1).images, va.images)
    # STATS are the train-set statistics of the padded images the model sees
    hist = sum(torch.bincount(s.images[:, 0].flatten(), minlength=256).double() for s in (tr, va))
    v = torch.arange(256, dtype=torch.double) / 255
    mean = (hist * v).sum() / hist.sum()
    std = ((hist * (v - mean) ** 2).sum() / hist.sum()).sqrt()
    assert STATS["fashion_mnist"][0][0] == pytest.approx(mean.item(), abs=1e-4)
    assert STATS["fashion_mnist"][1][0] == pytest.approx(std.item(), abs=1e-4)


@needs_fmnist
def test_fashion_mnist_bad_files_name_file(tmp_path):
    shutil.copy(FMNIST / "train-labels-idx1-ubyte.gz", tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes((FMNIST / bad.name).read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated") as e:
        load_dataset("fashion_mnist", "train", tmp_path)
    assert str(bad) in str(e.value) and "sha256" in str(e.value)
    bad.write_bytes(gzip.compress((1234).to_bytes(4, "big") + bytes(100)))
    with pytest.raises(ValueError, match="magic") as e:
        load_dataset("fashion_mnist", "train", tmp_path)
    assert str(bad) in str(e.value) and "sha256" in str(e.value)
    bad.write_bytes(gzip.compress((2051).to_bytes(4, "big") + b"".join(
        v.to_bytes(4, "big") for v in (60000, 28, 28)) + bytes(1000)))
    with pytest.raises(ValueError, match="header says") as e:
        load_dataset("fashion_mnist", "train", tmp_path)
    assert str(bad) in str(e.value) and "sha256" in str(e.value)


def _copy_fmnist(folder, official="test"):
    folder.mkdir(parents=True)
    for name in D.FMNIST_FILES[official]:
        shutil.copy(FMNIST / name, folder / name)
    return folder


@needs_fmnist
def test_fashion_mnist_files_match_their_recorded_sha256():
    for name, (packed, raw) in D.FMNIST_SHA256.items():
        assert hashlib.sha256((FMNIST / name).read_bytes()).hexdigest() == packed, name
        assert hashlib.sha256(gzip.open(FMNIST / name).read()).hexdigest() == raw, name


@needs_fmnist
def test_fashion_mnist_with_one_byte_changed_stops_naming_both_sha256(tmp_path):
    images = D.FMNIST_FILES["test"][0]
    expected = D.FMNIST_SHA256[images][0]
    # one byte of the gzip stream (gzip's own CRC may notice, or not: the sha256 does)
    folder = _copy_fmnist(tmp_path / "packed")
    b = bytearray((folder / images).read_bytes())
    b[len(b) // 2] ^= 0x01
    (folder / images).write_bytes(bytes(b))
    # one pixel of the IDX bytes, gzipped again: a well-formed file, not the published one
    other = _copy_fmnist(tmp_path / "pixel")
    raw = bytearray(gzip.open(FMNIST / images).read())
    raw[-1] ^= 0x01
    (other / images).write_bytes(gzip.compress(bytes(raw)))
    for f in (folder, other):
        found = hashlib.sha256((f / images).read_bytes()).hexdigest()
        with pytest.raises(D.DataError) as e:
            load_dataset("fashion_mnist", "test", f)
        msg = str(e.value)
        assert str(f / images) in msg and expected in msg and found in msg and found != expected
        assert "apt-get install --reinstall dataset-fashion-mnist" in msg
    assert "not the published Fashion-MNIST file" in msg


@needs_fmnist
def test_fashion_mnist_gzipped_again_is_the_same_data_and_verified_once(tmp_path):
    folder = _copy_fmnist(tmp_path / "regzipped")
    images = D.FMNIST_FILES["test"][0]
    (folder / images).write_bytes(gzip.compress(gzip.open(FMNIST / images).read(), mtime=0))
    assert hashlib.sha256((folder / images).read_bytes()).hexdigest() != D.FMNIST_SHA256[images][0]
    te = load_dataset("fashion_mnist", "test", folder)
    assert torch.equal(te.images, load_dataset("fashion_mnist", "test").images)
    st = (folder / images).stat()  # verified once: not hashed again in this process
    assert (str(folder / images), st.st_mtime_ns, st.st_size) in D.FMNIST_VERIFIED


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FMNIST_SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion_mnist", "test", tmp_path / "mine")
    assert str(tmp_path / "mine") in str(e.value) and str(tmp_path / "system") in str(e.value)


# ---------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_fast():
    gen = D._synthetic.__wrapped__  # bypass the in-process cache
    t = time.perf_counter()
    a = gen(2000, 0, "train")
    elapsed = time.perf_counter() - t
    print(f"synthetic 2000 images: {elapsed:.3f} s")
    assert elapsed < 15  # about 0.2 s on 2 idle cores; only catches a lost vectorisation
    b = gen(2000, 0, "train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(gen(2000, 1, "train")[0], a[0])
    assert not torch.equal(gen(2000, 0, "test")[0], a[0])


def test_synthetic_splits():
    tr, va, te = (load_dataset("synthetic", s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (2000 - 192, 192, 500)
    for s in (tr, va, te):
        assert s.images.shape[1:] == (3, 32, 32) and s.images.dtype == torch.uint8
        assert s.fine.dtype == torch.int64 and 0 <= s.fine.min() and s.fine.max() < D.SYN_N_FINE
        assert torch.equal(s.coarse, s.fine // 3) and s.coarse.max() < D.SYN_N_COARSE
    assert torch.bincount(va.fine).tolist() == [16] * 12
    assert tr.hierarchy.n_fine == 12 and tr.hierarchy.n_coarse == 4
    rows = lambda s: {bytes(x.numpy()) for x in s.images}
    pool = D._synthetic(2000, 0, "train")[0]
    assert not rows(tr) & rows(va) and not rows(te) & (rows(tr) | rows(va))
    assert sorted(rows(tr) | rows(va)) == sorted({bytes(x.numpy()) for x in pool})
    assert not torch.equal(load_dataset("synthetic", "val", split_seed=1).images, va.images)
    other = load_dataset("synthetic", "train", size=240, seed=3, val_size=24)
    assert len(other) == 216 and not torch.equal(other.images[:5], tr.images[:5])
    x = pool.double() / 255  # STATS match the default pool
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(STATS["synthetic"][0], dtype=torch.double), atol=2e-3)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(STATS["synthetic"][1], dtype=torch.double), atol=2e-3)


# ---------------------------------------------------------------- errors and hierarchy
def test_unknown_names_list_allowed():
    with pytest.raises(ValueError, match="cifar100, fashion_mnist, synthetic"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="train, val, test"):
        load_dataset("synthetic", "dev")
    with pytest.raises(ValueError, match="size"):
        load_dataset("fashion_mnist", "train", size=100)


def test_hierarchy_validation():
    h = Hierarchy(["a", "b", "c"], ["X", "Y"], [0, 1, 1])
    assert (h.n_fine, h.n_coarse) == (3, 2) and hash(h) == hash(Hierarchy(("a", "b", "c"), ("X", "Y"), (0, 1, 1)))
    assert h.coarse_of(torch.tensor([2, 0, 1])).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="entries"):
        Hierarchy(["a", "b"], ["X"], [0])
    with pytest.raises(ValueError, match="outside"):
        Hierarchy(["a", "b"], ["X", "Y"], [0, 2])
    with pytest.raises(ValueError, match="no fine class.*'Y'"):
        Hierarchy(["a", "b"], ["X", "Y", "Z"], [0, 2])


# ---------------------------------------------------------------- DeviceLoader
def make_split(n=100, constant=False, seed=0):
    """Random images, or images filled with their own index so a batch tells which examples it holds."""
    g = torch.Generator().manual_seed(seed)
    if constant:
        images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    else:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    fine = torch.arange(n) % 12
    h = Hierarchy([str(i) for i in range(12)], ["a", "b", "c", "d"], [i // 3 for i in range(12)])
    return Split(images, fine, h.coarse_of(fine), h, "synthetic")


def ids(batches):
    """Example indices of batches from a constant-image split (pixel value = index)."""
    mean, std = (255 * torch.tensor(v).view(1, 3, 1, 1) for v in STATS["synthetic"])
    return torch.cat([(b["x"] * std + mean).round()[:, 0, 0, 0].long() for b in batches])


def test_loader_batches():
    s = make_split(100)
    dl = DeviceLoader(s, 32)
    batches = list(dl)
    assert dl.n == 100 and len(dl) == len(batches) == 4 and [len(b["x"]) for b in batches] == [32, 32, 32, 4]
    assert len(DeviceLoader(s, 32, drop_last=True)) == len(list(DeviceLoader(s, 32, drop_last=True))) == 3
    b = batches[0]
    assert b["x"].shape == (32, 3, 32, 32) and b["x"].dtype == torch.float32
    assert b["fine"].dtype == b["coarse"].dtype == torch.int64 and torch.equal(b["coarse"], b["fine"] // 3)
    cl = next(iter(DeviceLoader(s, 32, channels_last=True)))["x"]
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_loader_plain_is_normalised_original():
    s = make_split(50)
    b = next(iter(DeviceLoader(s, 50, shuffle=False, augment=False)))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in STATS["synthetic"])
    assert torch.allclose(b["x"], (s.images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(b["fine"], s.fine)
    b = next(iter(DeviceLoader(s, 50, shuffle=False, augment=False, mean=(0.5,) * 3, std=(0.25,) * 3)))
    assert torch.allclose(b["x"], (s.images.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_loader_reproducible_per_epoch():
    s = make_split(100)
    run = lambda dl: [b["x"] for b in dl]
    a, b = DeviceLoader(s, 32, seed=1), DeviceLoader(s, 32, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert all(torch.equal(x, y) for x, y in zip(run(a), run(b)))
    b.set_epoch(3)
    assert not torch.equal(run(b)[0], run(a)[0])  # a moved on to epoch 4
    c = DeviceLoader(s, 32, seed=1)  # without set_epoch each pass advances the epoch: 0, 1, ...
    first, second = run(c), run(c)
    c.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(second, run(c)))
    assert not torch.equal(first[0], second[0])
    assert not torch.equal(run(DeviceLoader(s, 32, seed=2))[0], first[0])


def test_loader_visits_every_example_once():
    s = make_split(100, constant=True)
    for shuffle in (True, False):
        dl = DeviceLoader(s, 32, shuffle=shuffle)
        for _ in range(2):
            batches = list(dl)
            seen = ids(batches)
            assert sorted(seen.tolist()) == list(range(100))
            assert torch.equal(torch.cat([b["fine"] for b in batches]), s.fine[seen])  # labels follow images
            assert (seen.tolist() == list(range(100))) == (not shuffle)


def test_loader_subset_per_class():
    s = make_split(100, constant=True)
    s.fine = s.fine[torch.randperm(100, generator=torch.Generator().manual_seed(0))]  # classes interleaved
    s.coarse = s.hierarchy.coarse_of(s.fine)
    dl = DeviceLoader(s, 64, shuffle=False, augment=False, subset_per_class=5)
    assert dl.n == 60
    first5 = [i for k in range(12) for i in (s.fine == k).nonzero().flatten()[:5].tolist()]
    assert sorted(ids(dl).tolist()) == sorted(first5)
    assert torch.bincount(DeviceLoader(s, 64, subset_per_class=9).fine).tolist() == [9] * 4 + [8] * 8


def test_loader_augment_crops_and_flips_reflect_padded_windows():
    s = make_split(64, seed=1)
    dl = DeviceLoader(s, 64, shuffle=False, mean=(0, 0, 0), std=(1 / 255,) * 3)  # x = raw pixel values
    x = next(iter(dl))["x"].round()
    padded = F.pad(s.images.float(), (4, 4, 4, 4), mode="reflect")
    flips = shifted = 0
    for i in range(64):
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(x[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert len(found) == 1, f"sample {i}: output is not a (flipped) window of the padded image"
        dy, dx, f = found[0]
        flips, shifted = flips + f, shifted + ((dy, dx) != (4, 4))
    assert 10 < flips < 54 and shifted > 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loader_cuda_matches_cpu():
    s = make_split(100)
    cpu, gpu = DeviceLoader(s, 32, seed=4), DeviceLoader(s, 32, seed=4, device="cuda")
    for a, b in zip(cpu, gpu):
        assert b["x"].is_cuda and torch.allclose(a["x"], b["x"].cpu()) and torch.equal(a["fine"], b["fine"].cpu())
