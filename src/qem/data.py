"""Data plumbing shared by every pass: a dataset is either a ``torch.utils.data.Dataset``
yielding (input, target) pairs or a tuple of two tensors (inputs, targets)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from qem.errors import DataError, ShapeError

DataLike = Dataset | tuple[torch.Tensor, torch.Tensor]


def as_dataset(data: DataLike, name: str = "data") -> Dataset:
    """Wrap (inputs, targets) tensors as a TensorDataset; check it is non-empty."""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ShapeError(f"{name} must be (inputs, targets), got a tuple of {len(data)}.")
        inputs, targets = (torch.as_tensor(t) for t in data)
        if inputs.shape[0] != targets.shape[0]:
            raise ShapeError(f"{name}: {inputs.shape[0]} inputs but {targets.shape[0]} targets.")
        data = TensorDataset(inputs, targets)
    if len(data) == 0:  # type: ignore[arg-type]
        raise DataError(f"{name} is empty: at least one example is needed.")
    return data


def batches(
    data: DataLike, batch_size: int, name: str = "data"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over (inputs, targets) batches in a fixed order (no shuffling)."""
    dataset = as_dataset(data, name)
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def num_examples(data: DataLike) -> int:
    """Number of examples in ``data``."""
    return len(as_dataset(data))
