"""Hierarchical image data (fine + coarse labels) as plain uint8 tensors, and a device-side loader.

Every dataset comes out as 3x32x32 uint8 so one model definition serves all of them.
Splits: "train" and "val" partition the official training set (val stratified by fine class,
fixed by split_seed); "test" is the official test set, used only for reported figures.
"""
import functools, gzip, hashlib, math, os, pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from zlib import error as zlib_error

from .seeds import derive_seed

DATASETS = ("cifar100", "fashion_mnist", "synthetic")
SPLITS = ("train", "val", "test")

# (mean, std) per channel on the 0..1 scale, measured on each official train set as the model sees it.
STATS = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2190,) * 3, (0.3318,) * 3),  # after the 28->32 zero padding
    "synthetic": ((0.5092, 0.4990, 0.4950), (0.2471, 0.2484, 0.2467)),  # seed 0, 2000-image pool
}

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# md5 and image count of each published file (torchvision's CIFAR100 lists the same sums)
CIFAR100_FILES = {"train": ("16019d7e3df5f24257cddd939b257f8d", 50000),
                  "test": ("f0ef6b0ae62326f3e7ffdfab6717acfc", 10000),
                  "meta": ("7973b15100ade9c7d40fb424638fde48", None)}
# Official fine -> coarse map (fine ids in meta order). Pickles are checked against it, so a
# small file holding only some classes still gets the full 100/20 hierarchy.
CIFAR100_FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13)

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FINE = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_COARSE = ("Tops", "Bottoms", "Dresses", "Outers", "Shoes", "Accessories")  # Seo & Shin 2019
FMNIST_FINE_TO_COARSE = (0, 1, 0, 2, 3, 4, 0, 4, 5, 4)

# Synthetic: coarse = the big shape (global), fine = shape x stripe orientation (local texture).
SYN_SHAPES = ("disc", "square", "cross", "ring")
SYN_TEXTURES = ("horizontal", "vertical", "diagonal")
SYN_N_COARSE, SYN_N_FINE = len(SYN_SHAPES), len(SYN_SHAPES) * len(SYN_TEXTURES)
SYN_DEFAULT_SIZE = 2000  # train pool (train + val); the test split has size // 4 images


class DataError(ValueError):
    """A data file or split that cannot be used as it is (corrupt, truncated, too small)."""


@dataclass(frozen=True)
class Hierarchy:
    fine_names: tuple[str, ...]
    coarse_names: tuple[str, ...]
    fine_to_coarse: tuple[int, ...]  # coarse id of each fine id

    def __post_init__(self):
        # plain tuples (not lists or numpy ints) keep it hashable and comparable
        object.__setattr__(self, "fine_names", tuple(map(str, self.fine_names)))
        object.__setattr__(self, "coarse_names", tuple(map(str, self.coarse_names)))
        object.__setattr__(self, "fine_to_coarse", tuple(map(int, self.fine_to_coarse)))
        if len(self.fine_to_coarse) != len(self.fine_names):
            raise ValueError(f"fine_to_coarse has {len(self.fine_to_coarse)} entries "
                             f"but there are {len(self.fine_names)} fine classes")
        bad = [(i, c) for i, c in enumerate(self.fine_to_coarse) if not 0 <= c < self.n_coarse]
        if bad:
            raise ValueError(f"fine classes mapped outside range({self.n_coarse}) (fine, coarse): {bad}")
        empty = sorted(set(range(self.n_coarse)) - set(self.fine_to_coarse))
        if empty:
            raise ValueError(f"coarse classes with no fine class: {[self.coarse_names[c] for c in empty]}")

    @property
    def n_fine(self): return len(self.fine_names)

    @property
    def n_coarse(self): return len(self.coarse_names)

    def coarse_of(self, fine):
        return torch.tensor(self.fine_to_coarse, device=fine.device)[fine]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    fine: torch.Tensor    # int64 (N,)
    coarse: torch.Tensor  # int64 (N,)
    hierarchy: Hierarchy
    name: str

    def __len__(self): return len(self.fine)


def load_dataset(name, split, data_dir=None, download=False, *, val_size=None, split_seed=0,
                 size=None, seed=0):
    """One split: "train"/"val" partition the official train set, "test" is the official test set.

    val_size: examples held out for val, val_size // n_fine from every fine class, chosen by split_seed
    (default 5000 for cifar100 and fashion_mnist, about 10% for synthetic; 0 gives an empty val).
    size, seed: synthetic only; size images in the train pool (default 2000) and size // 4 test
    images from a separate random stream, both generated from seed."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if size is not None and name != "synthetic":
        raise ValueError(f"size= only applies to synthetic; for {name} use DeviceLoader(subset_per_class=...)")
    official = "test" if split == "test" else "train"
    if name == "cifar100":
        images, fine, hier = _cifar100(official, data_dir, download)
        default_val = 5000
    elif name == "fashion_mnist":
        images, fine, hier = _fashion_mnist(official, data_dir)
        default_val = 5000
    else:
        size = SYN_DEFAULT_SIZE if size is None else size
        images, fine, hier = _synthetic(size if split != "test" else size // 4, seed, official)
        default_val = SYN_N_FINE * (size // (10 * SYN_N_FINE))  # about 10%, equal per class
    if split != "test":
        val = _val_mask(fine, hier.n_fine, default_val if val_size is None else val_size, split_seed)
        keep = val if split == "val" else ~val
        images, fine = images[keep], fine[keep]
    else:
        images, fine = images.clone(), fine.clone()  # never hand out the cached arrays
    return Split(images, fine, hier.coarse_of(fine), hier, name)


@functools.lru_cache(maxsize=4)
def _splits(dataset, data_dir, val_size, split_seed, synthetic_size):
    kw = dict(data_dir=data_dir, val_size=val_size, split_seed=split_seed)
    if dataset == "synthetic":  # the images themselves are drawn from the split seed
        kw.update(size=synthetic_size, seed=split_seed)
    return tuple(load_dataset(dataset, s, **kw) for s in ("train", "val", "test"))


def load_splits(cfg):
    """(train, val, test) of a config's dataset, read once per process."""
    return _splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.synthetic_size)


def check_available(cfg, download: bool = False):
    """Stop at once (FileNotFoundError with the loader's message) when the data is missing."""
    if download and cfg.dataset == "cifar100":
        load_dataset("cifar100", "test", data_dir=cfg.data_dir, download=True)
        return
    kw = dict(size=cfg.synthetic_size, seed=cfg.split_seed) if cfg.dataset == "synthetic" else {}
    load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=download, **kw)


def check_splits(splits):
    """Every split a run uses must hold images: val chooses the best epoch and the ensemble
    members, test gives the reported figures."""
    for s, role in zip(splits, ("train", "val", "test")):
        if len(s) == 0:
            n = s.hierarchy.n_fine
            hint = {"val": f"set val_size to at least {n} (one image per fine class)",
                    "test": "raise synthetic_size (the test split has synthetic_size // 4 images)"
                    }.get(role, "lower val_size")
            raise DataError(f"the {role} split of {s.name} is empty; {hint}")
    return splits


def _rank_in_class(labels):
    """Position of each example among the examples of its class, in the given order."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts
    return rank


def _val_mask(fine, n_fine, val_size, split_seed):
    """val_size // n_fine random examples of every fine class; a class needs one more to keep any for train."""
    if val_size < 0:
        raise DataError(f"val_size must be >= 0, got {val_size}")
    per = val_size // n_fine
    if per == 0:
        return torch.zeros(len(fine), dtype=torch.bool)
    counts = torch.bincount(fine, minlength=n_fine)
    short = (counts <= per).nonzero().flatten().tolist()
    if short:
        most = n_fine * (int(counts.min()) - 1)
        raise DataError(f"val_size={val_size} takes {per} per fine class, but fine classes {short[:10]}"
                        f"{'...' if len(short) > 10 else ''} have <= {per} training images; lower val_size "
                        f"(at most {most} here)")
    perm = torch.randperm(len(fine), generator=torch.Generator().manual_seed(derive_seed(split_seed, "val split")))
    mask = torch.zeros(len(fine), dtype=torch.bool)
    mask[perm[_rank_in_class(fine[perm]) < per]] = True
    return mask


def _file_key(path):
    """(path, mtime, size): lets the in-process cache notice a file that was rewritten."""
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


# ---------------------------------------------------------------- CIFAR-100
def _cifar100(official, data_dir, download):
    root = Path("data" if data_dir is None else data_dir)
    folder = root / "cifar-100-python"
    if not all((folder / f).is_file() for f in ("train", "test", "meta")):
        msg = (f"CIFAR-100 not found: {folder} must hold train, test and meta. Get it with\n"
               f"    python -m bilateral download cifar100 --data-dir {root}\n"
               f"or run offline with dataset=fashion_mnist or dataset=synthetic.")
        if not download:
            raise FileNotFoundError(msg)
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(CIFAR100_URL, str(root), md5=CIFAR100_MD5)
        except Exception as e:
            raise FileNotFoundError(f"download of {CIFAR100_URL} failed ({e}).\n{msg}") from e
    meta = unpickle_cifar(folder / "meta")
    fine_names = tuple(_text(s) for s in meta.get("fine_label_names", ()))
    coarse_names = tuple(_text(s) for s in meta.get("coarse_label_names", ()))
    if (len(fine_names), len(coarse_names)) != (100, 20):
        raise DataError(f"{folder / 'meta'}: {len(fine_names)} fine and {len(coarse_names)} coarse label names, "
                        f"expected 100 and 20")
    hier = Hierarchy(fine_names, coarse_names, CIFAR100_FINE_TO_COARSE)
    data, fine = _cifar_arrays(*_file_key(folder / official))
    return torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(fine), hier


def _text(s): return s.decode() if isinstance(s, bytes) else str(s)


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-100 pickles hold (dicts, lists, bytes, ints and uint8 numpy
    arrays): a crafted file in data_dir cannot name a function to run."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-100 file holds "
                                         f"only lists, bytes, numbers and numpy arrays")
        found = super().find_class(module, name)
        return _empty_only(found) if name == "_reconstruct" else found


def _empty_only(reconstruct):
    """numpy pickles start every array empty (shape (0,)) and fill it from bytes the file holds;
    a crafted file asking for a large empty array would allocate gigabytes from a few bytes."""
    def guarded(cls, shape, dtype):
        dims = shape if isinstance(shape, tuple) else (shape,)
        if not all(isinstance(d, int) for d in dims) or math.prod(dims) > 1:
            raise pickle.UnpicklingError(f"refused an array of shape {str(shape)[:40]} made from "
                                         f"nothing (numpy writes arrays as shape (0,) + data)")
        return reconstruct(cls, shape, dtype)
    return guarded


MAX_CIFAR_BYTES = 512 * 2**20  # the published train file is 158 MB


def unpickle_cifar(path):
    """A CIFAR-100 pickle, through the restricted unpickler; a file that claims to be the
    published one (its name, and the published image count) must also match the published md5."""
    path = Path(path)
    md5, count = CIFAR100_FILES.get(path.name, (None, None))
    official = md5 is not None and _md5(path) == md5
    if path.stat().st_size > MAX_CIFAR_BYTES:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes, larger than any CIFAR-100 file "
                        f"(at most {MAX_CIFAR_BYTES:,}); delete {path.parent} and download it again")
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError... all mean a bad file
        raise DataError(f"{path}: not a readable CIFAR-100 pickle, corrupt, truncated or crafted "
                        f"({e}); delete {path.parent} and download it again") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, got {type(d).__name__}; delete {path.parent} "
                        f"and download it again")
    d = {_text(k): v for k, v in d.items()}
    if count is not None and not official and len(d.get("fine_labels", ())) == count:
        raise DataError(f"{path}: {count} images like the published file, but not its md5 {md5} "
                        f"(corrupt); delete {path.parent} and download it again")
    return d


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _cifar_arrays(path, mtime, nbytes):
    d = unpickle_cifar(path)
    try:
        data = np.asarray(d["data"], dtype=np.uint8)
        fine = np.asarray(d["fine_labels"], dtype=np.int64)
        coarse = np.asarray(d["coarse_labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-100 batch ({e!r}); delete {path.parent} and "
                        f"download it again") from e
    if data.ndim != 2 or data.shape[1] != 3072 or not len(data) == len(fine) == len(coarse):
        raise DataError(f"{path}: data {data.shape}, {len(fine)} fine and {len(coarse)} coarse labels; "
                        f"expected (N, 3072) and N of each")
    if len(fine) and (fine.min() < 0 or fine.max() >= 100):
        raise DataError(f"{path}: fine labels outside 0..99")
    wrong = np.nonzero(np.asarray(CIFAR100_FINE_TO_COARSE)[fine] != coarse)[0]
    if len(wrong):  # labels are taken from the pairs in the file, so a mismatch is a bad file
        i = wrong[0]
        raise DataError(f"{path}: {len(wrong)} images pair fine and coarse labels unlike the official map, "
                        f"first at row {i}: fine {fine[i]} with coarse {coarse[i]}")
    return data, fine


# ---------------------------------------------------------------- Fashion-MNIST
FMNIST_REINSTALL = "apt-get install --reinstall dataset-fashion-mnist"
FMNIST_FIX = ("; replace it with a good copy, or remove it to use the system copy "
              f"({FMNIST_REINSTALL})")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# sha256 of each file as Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 installs it
# in /usr/share/datasets/fashion-mnist, and of the IDX bytes inside it: the same data gzipped
# by another tool (a gzip header holds a time and a name) differs in the first, not the second.
FMNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte.gz": (
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte.gz": (
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
# (path, mtime_ns, size) of the files whose sha256 matched in this process: not hashed again
FMNIST_VERIFIED: set = set()


def _fashion_mnist(official, data_dir):  # no download: offline use is its point, Debian packages it
    files = FMNIST_FILES[official]
    root = Path("data" if data_dir is None else data_dir)
    dirs = [root, root / "fashion-mnist", FMNIST_SYSTEM_DIR]  # the data dir first, then Debian's package
    found = [d for d in dirs if all((d / f).is_file() for f in files)]
    if not found:
        raise FileNotFoundError(f"Fashion-MNIST files {files} not found in {', '.join(map(str, dirs))}. "
                                f"Install them with: apt-get install dataset-fashion-mnist")
    x, labels = _fmnist_arrays(_file_key(found[0] / files[0]), _file_key(found[0] / files[1]))
    return x, labels, Hierarchy(FMNIST_FINE, FMNIST_COARSE, FMNIST_FINE_TO_COARSE)


@functools.lru_cache(maxsize=2)  # padded once per process: train, val and test loads then only index
def _fmnist_arrays(images_key, labels_key):
    images, labels = _idx_array(images_key[0]), _idx_array(labels_key[0])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels) or (len(labels) and labels.max() > 9):
        raise DataError(f"{images_key[0]}, {labels_key[0]}: images {images.shape} and labels {labels.shape} "
                        f"(max {labels.max()}) do not form a Fashion-MNIST split")
    x = np.zeros((len(images), 3, 32, 32), dtype=np.uint8)  # 2 px of zeros each side: 28 -> 32
    x[:, :, 2:30, 2:30] = images[:, None]                     # grey repeated to 3 channels
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _idx_shape(raw: bytes):
    """(shape, None) of an IDX file's bytes, or (None, what is wrong with them)."""
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic not in (2049, 2051):
        return None, f"IDX magic number {magic}, expected 2049 (labels) or 2051 (images)"
    ndim = 1 if magic == 2049 else 3
    if len(raw) < 4 + 4 * ndim:
        return None, "truncated IDX header"
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - 4 - 4 * ndim != math.prod(shape):
        return None, (f"header says {shape} = {math.prod(shape)} bytes, file holds "
                      f"{len(raw) - 4 - 4 * ndim}")
    return shape, None


def _idx_array(path):
    """A gzipped IDX file (magic 2051 = uint8 images N x rows x cols, 2049 = uint8 labels N).

    A file named like a published one is checked against FMNIST_SHA256 the first time this
    process reads it (FMNIST_VERIFIED, by path, mtime and size): the gzip file's sha256, or
    else that of the IDX bytes inside; a mismatch stops with both sums and how to get a good
    copy, and with what is wrong with the file where that can be told."""
    path = Path(path)
    key = _file_key(path)
    with open(path, "rb") as f:
        packed = f.read()
    expected = FMNIST_SHA256.get(path.name)
    trusted = expected is None or key in FMNIST_VERIFIED or _sha256(packed) == expected[0]
    try:
        raw, problem = gzip.decompress(packed), None
    except (OSError, EOFError, zlib_error) as e:
        raw, problem = b"", f"corrupt or truncated gzip ({e})"
    shape, problem = (None, problem) if problem else _idx_shape(raw)
    if not trusted and (problem or _sha256(raw) != expected[1]):
        fix = (f"reinstall it: {FMNIST_REINSTALL}" if path.parent == FMNIST_SYSTEM_DIR else
               f"replace it with a good copy ({FMNIST_REINSTALL} puts one in {FMNIST_SYSTEM_DIR}), "
               f"or remove it to use the system copy")
        raise DataError(f"{path}: {problem or 'not the published Fashion-MNIST file'}; its "
                        f"sha256 is {_sha256(packed)}, expected {expected[0]} (Debian's "
                        f"dataset-fashion-mnist; a gzip of the same data made by another tool "
                        f"must hold IDX bytes of sha256 {expected[1]}); {fix}")
    if problem:
        raise DataError(f"{path}: {problem}{FMNIST_FIX}")
    if expected is not None:
        FMNIST_VERIFIED.add(key)
    return np.frombuffer(raw, dtype=np.uint8, offset=len(raw) - math.prod(shape)).reshape(shape)


# ---------------------------------------------------------------- synthetic
@functools.lru_cache(maxsize=4)
def _synthetic(n, seed, stream):
    """n images whose coarse class is a big shape and fine class the stripe orientation inside it.
    Colours, position, size, stripe period/phase/angle, background gradient and noise are random
    and independent of the labels, so neither level can be read off a single pixel statistic."""
    g = torch.Generator().manual_seed(derive_seed(seed, stream))  # purpose: the official split, "train" or "test"
    u = lambda *shape: torch.rand(*shape, generator=g)
    fine = (torch.arange(n) % SYN_N_FINE)[torch.randperm(n, generator=g)]  # balanced classes
    shape_id, tex_id = fine // len(SYN_TEXTURES), fine % len(SYN_TEXTURES)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    col = lambda: u(n, 1, 1)
    cx, cy, r = 15.5 + 8 * (col() - 0.5), 15.5 + 8 * (col() - 0.5), 7 + 6 * col()
    # shapes are rotated (+-25 deg) and stretched (aspect 0.75-1.33) so only their overall form tells them apart
    rot, aspect = (col() - 0.5) * 50 * math.pi / 180, torch.exp((col() - 0.5) * 0.58)
    ex, ey = xx - cx, yy - cy
    dx = ((ex * torch.cos(rot) + ey * torch.sin(rot)) * aspect).abs()
    dy = ((ey * torch.cos(rot) - ex * torch.sin(rot)) / aspect).abs()
    dist = (dx ** 2 + dy ** 2).sqrt()
    arm = 0.4 * r
    masks = torch.stack([dist < r,                                                 # disc
                         torch.maximum(dx, dy) < 0.85 * r,                         # square
                         ((dx < arm) & (dy < r)) | ((dy < arm) & (dx < r)),        # cross
                         (dist < r) & (dist > 0.5 * r)], 1)                        # ring
    mask = masks[torch.arange(n), shape_id]
    # stripes at 0, 90 or 45 degrees (+-20), period 3.5-4.5 px: readable from any 5x5 patch
    angle = (torch.tensor([0.0, 90.0, 45.0])[tex_id].view(n, 1, 1) + 40 * (col() - 0.5)) * math.pi / 180
    period, phase = 3.5 + col(), 2 * math.pi * col()
    stripes = torch.sin(2 * math.pi * (xx * torch.sin(angle) + yy * torch.cos(angle)) / period + phase)
    fg = 0.25 + 0.5 * u(n, 3, 1, 1) + (0.06 + 0.12 * col()).unsqueeze(1) * stripes.unsqueeze(1)
    tilt = 2 * math.pi * col()
    ramp = ((xx - 15.5) * torch.cos(tilt) + (yy - 15.5) * torch.sin(tilt)) / 16
    bg = 0.1 + 0.8 * u(n, 3, 1, 1) + (0.3 * col() * ramp).unsqueeze(1)
    img = torch.where(mask.unsqueeze(1), fg, bg) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    names = tuple(f"{s}_{t}" for s in SYN_SHAPES for t in SYN_TEXTURES)
    f2c = tuple(i // len(SYN_TEXTURES) for i in range(SYN_N_FINE))
    return images, fine, Hierarchy(names, SYN_SHAPES, f2c)


# ---------------------------------------------------------------- loader
class DeviceLoader:
    """Whole split as one uint8 tensor on `device`; batches are cropped, flipped and normalised there.
    The order and augmentation of epoch e are a pure function of (seed, e), identical on CPU and CUDA.
    Each pass uses self.epoch and then increments it, so set_epoch(e) is optional.
    subset_per_class=k keeps the first k examples of each fine class (all of a class with fewer)."""

    def __init__(self, split, batch_size=256, *, device="cpu", shuffle=True, augment=True, drop_last=False,
                 seed=0, subset_per_class=None, mean=None, std=None, channels_last=False):
        keep = slice(None) if subset_per_class is None else _rank_in_class(split.fine) < subset_per_class
        self.images = split.images[keep].to(device)
        self.fine, self.coarse = split.fine[keep].to(device), split.coarse[keep].to(device)
        self.hierarchy, self.name, self.device = split.hierarchy, split.name, torch.device(device)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.channels_last, self.epoch = seed, channels_last, 0
        mean = STATS[split.name][0] if mean is None else mean
        std = STATS[split.name][1] if std is None else std
        # normalise straight from 0..255 values: x = (pixel - 255 mean) / (255 std)
        self.mean = 255 * torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # row/column source for padded position p in -4..35: reflect padding without materialising it
        self._reflect = torch.tensor([abs(p) if p < 32 else 62 - p for p in range(-4, 36)], device=device)

    @property
    def n(self): return len(self.fine)

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch): self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, "device loader", self.epoch))
        self.epoch += 1
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        shifts = torch.randint(0, 9, (self.n, 2), generator=g)  # crop offsets in the 40x40 padded image
        flips = torch.rand(self.n, generator=g) < 0.5
        order, shifts, flips = order.to(self.device), shifts.to(self.device), flips.to(self.device)
        for i in range(len(self)):
            b = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[b]
            x = self._crop_flip(idx, shifts[b], flips[b]) if self.augment else self.images[idx]
            x = x.float().sub_(self.mean).div_(self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"x": x, "fine": self.fine[idx], "coarse": self.coarse[idx]}

    def _crop_flip(self, idx, shifts, flips):
        """One gather: out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + (31 - j if flipped else j)]."""
        ar = torch.arange(32, device=self.device)
        rows = self._reflect[shifts[:, :1] + ar]                       # (B, 32)
        cols = self._reflect[shifts[:, 1:] + ar]
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        c = torch.arange(3, device=self.device)[None, :, None, None]
        return self.images[idx[:, None, None, None], c, rows[:, None, :, None], cols[:, None, None, :]]
