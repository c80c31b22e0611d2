"""Generic supervised data files for ``qem finetune``: an NPZ with inputs and targets, or an
IDX pair "IMAGES.idx[.gz],LABELS.idx[.gz]". Any shapes; integer targets stay int64 (class
labels), floating targets become float32 (regression)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qem.datasets.mnist import read_idx
from qem.errors import DataError

NPZ_KEYS = (("x", "y"), ("inputs", "targets"), ("x_train", "y_train"))


def _as_inputs(x: np.ndarray) -> torch.Tensor:
    """uint8 pixels are scaled to [0, 1]; IDX images (n, h, w) gain a channel axis."""
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled))


def _as_targets(y: np.ndarray) -> torch.Tensor:
    if np.issubdtype(y.dtype, np.integer):
        return torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(y.astype(np.float32))


def load_supervised_file(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) tensors from ``file.npz`` or ``images.idx,labels.idx``."""
    if "," in spec:
        images_path, labels_path = spec.split(",", 1)
        images, labels = read_idx(images_path), read_idx(labels_path)
        x = _as_inputs(images[:, None] if images.ndim == 3 else images)
        y = _as_targets(labels)
    else:
        path = Path(spec)
        if path.suffix != ".npz":
            raise DataError(f"{spec}: expected a .npz file or an IDX pair 'images,labels'.")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {spec}: {error}") from error
        keys = next(((a, b) for a, b in NPZ_KEYS if a in arrays and b in arrays), None)
        if keys is None:
            raise DataError(
                f"{spec} has keys {sorted(arrays)}; expected one of the pairs {NPZ_KEYS}."
            )
        x, y = _as_inputs(arrays[keys[0]]), _as_targets(arrays[keys[1]])
    if len(x) != len(y):
        raise DataError(f"{spec}: {len(x)} inputs but {len(y)} targets.")
    if len(x) == 0:
        raise DataError(f"{spec} holds no examples.")
    return x, y
