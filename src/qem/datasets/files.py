"""Supervised data files for ``qem finetune``: an NPZ archive or an IDX pair
"IMAGES.idx[.gz],LABELS.idx[.gz]", read without unpickling anything.

An NPZ holds either one pair of arrays, (x, y), (inputs, targets) or (x_train, y_train), or the
model's named inputs with the targets under "labels" (Hugging Face style: input_ids,
attention_mask, token_type_ids, ..., labels), read as dict inputs that the model takes as
keyword arguments. Every array needs one row per example.

Conversions (each one applied is logged at INFO on the ``qem`` logger; ``qem finetune --help``
says the same):
integer inputs stay integers, as int64 (torch's index dtype, what tokenizers return and
``nn.Embedding`` takes), boolean inputs stay boolean; uint8 inputs are divided by 255 into the
floating dtype only when asked (``scale_uint8``: images stored as bytes); floating inputs take
the model's floating dtype (``float_dtype``); integer targets become int64 (class labels),
floating targets ``float_dtype`` (regression). IDX images are always scaled (they are images)
and gain a channel axis.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

from qem.datasets.mnist import read_idx
from qem.errors import DataError

logger = logging.getLogger(__name__)

NPZ_KEYS = (("x", "y"), ("inputs", "targets"), ("x_train", "y_train"))
LABELS = "labels"
"""The targets' key of an NPZ of named model inputs."""
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
"""How a zip archive (an NPZ) begins: a first member, or the end record of an empty one."""

Inputs = torch.Tensor | dict[str, torch.Tensor]


def load_supervised_file(
    spec: str, *, float_dtype: torch.dtype = torch.float32, scale_uint8: bool = False
) -> tuple[Inputs, torch.Tensor]:
    """(inputs, targets) from ``file.npz`` or ``images.idx,labels.idx`` (module docstring);
    inputs are a Tensor, or a dict of Tensors for an NPZ of named inputs."""
    if "," in spec:
        images_path, labels_path = spec.split(",", 1)
        images, labels = read_idx(images_path), read_idx(labels_path)
        x: Inputs = _as_inputs(
            images[:, None] if images.ndim == 3 else images, spec, float_dtype, scale=True
        )
        y = _as_targets(labels, spec, float_dtype)
    else:
        arrays = read_npz(spec)
        pair = next(((a, b) for a, b in NPZ_KEYS if a in arrays and b in arrays), None)
        if pair is not None:
            x = _as_inputs(arrays[pair[0]], f"{spec}[{pair[0]}]", float_dtype, scale_uint8)
            y = _as_targets(arrays[pair[1]], f"{spec}[{pair[1]}]", float_dtype)
        elif LABELS in arrays and len(arrays) > 1:
            x = {
                key: _as_inputs(value, f"{spec}[{key}]", float_dtype, scale_uint8)
                for key, value in sorted(arrays.items())
                if key != LABELS
            }
            y = _as_targets(arrays[LABELS], f"{spec}[{LABELS}]", float_dtype)
        else:
            raise DataError(
                f"{spec} has keys {sorted(arrays)}; expected one of the pairs {NPZ_KEYS}, or "
                f"named model inputs (input_ids, attention_mask, ...) with the targets under "
                f"{LABELS!r}."
            )
    _check_rows(spec, x, y)
    return x, y


def read_npz(spec: str) -> dict[str, np.ndarray]:
    """Every array of the NPZ archive ``spec``, without unpickling; a file that is not a
    readable NPZ of numeric arrays raises DataError naming it."""
    path = Path(spec)
    if path.suffix != ".npz":
        raise DataError(f"{spec}: expected a .npz file or an IDX pair 'images,labels'.")
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise DataError(f"cannot read {spec}: {error.strerror or error}.") from None
    if head not in ZIP_MAGIC:
        raise DataError(
            f"{spec} is not an NPZ archive (numpy.savez writes a zip of .npy arrays; this file "
            f"begins with {head!r})."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise DataError(f"{spec} is a damaged NPZ archive (truncated?): {error}") from None
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise DataError(
                f"{spec} holds an array of Python objects; qem reads numeric arrays only (save "
                "them with a numeric dtype) and never unpickles a data file."
            ) from None
        raise DataError(f"{spec} is a damaged NPZ archive: {error}") from None


def _as_inputs(x: np.ndarray, where: str, float_dtype: torch.dtype, scale: bool) -> torch.Tensor:
    """One input array as a tensor (module docstring: which dtypes are converted)."""
    _check_numeric(x, where)
    if x.dtype == np.uint8 and scale:
        _log_conversion(where, x.dtype, f"{float_dtype} divided by 255")
        return torch.from_numpy(np.ascontiguousarray(x)).to(float_dtype) / 255.0
    if np.issubdtype(x.dtype, np.integer):
        if x.dtype != np.int64:
            _log_conversion(where, x.dtype, "int64")
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.int64)))
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.is_floating_point() and tensor.dtype != float_dtype:
        _log_conversion(where, x.dtype, str(float_dtype))
        tensor = tensor.to(float_dtype)
    return tensor


def _as_targets(y: np.ndarray, where: str, float_dtype: torch.dtype) -> torch.Tensor:
    """Integer targets as int64 class labels, floating ones as ``float_dtype``."""
    _check_numeric(y, where)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        if y.dtype != np.int64:
            _log_conversion(where, y.dtype, "int64 (class labels)")
        return torch.from_numpy(np.ascontiguousarray(y.astype(np.int64)))
    tensor = torch.from_numpy(np.ascontiguousarray(y))
    if tensor.dtype != float_dtype:
        _log_conversion(where, y.dtype, str(float_dtype))
    return tensor.to(float_dtype)


def _check_numeric(array: np.ndarray, where: str) -> None:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"{where} has dtype {array.dtype}; qem reads numeric arrays only.")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{where} is complex; qem reads real numbers only.")
    if array.ndim == 0:
        raise DataError(f"{where} is a scalar; qem needs one row per example.")


def _log_conversion(where: str, source: np.dtype, target: str) -> None:
    logger.info("%s: %s converted to %s", where, source, target)


def _check_rows(spec: str, x: Inputs, y: torch.Tensor) -> None:
    rows = {key: len(value) for key, value in x.items()} if isinstance(x, dict) else {"x": len(x)}
    rows[LABELS if isinstance(x, dict) else "y"] = len(y)
    if len(set(rows.values())) != 1:
        raise DataError(f"{spec}: the arrays differ in their numbers of rows {rows}.")
    if len(y) == 0:
        raise DataError(f"{spec} holds no examples.")
