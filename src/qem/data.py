"""Data plumbing shared by every pass: a dataset is either a ``torch.utils.data.Dataset``
yielding (input, target) pairs or a tuple of two tensors (inputs, targets)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

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
    data: DataLike,
    batch_size: int,
    name: str = "data",
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over (inputs, targets) batches: in a fixed order, or shuffled by ``generator``.
    Tensor datasets are indexed directly (much faster than item-by-item collation)."""
    dataset = as_dataset(data, name)
    shuffle = generator is not None
    tensors, index = _tensor_view(dataset)
    if tensors is not None:
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if index is not None:
            order = index[order]
        inputs, targets = tensors
        for rows in order.split(batch_size):
            yield inputs[rows], targets[rows]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _tensor_view(
    dataset: Dataset,
) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
    """(tensors, rows) when ``dataset`` is a TensorDataset or a (nested) Subset of one, so that
    batches can be gathered by indexing; (None, None) otherwise."""
    index = None
    while isinstance(dataset, Subset):
        rows = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        index = rows if index is None else rows[index]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        return dataset.tensors, index
    return None, None


def num_examples(data: DataLike) -> int:
    """Number of examples in ``data``."""
    return len(as_dataset(data))


class DataHasher:
    """Incremental sha256 over a dataset's tensors: bytes, dtypes and per-example shapes.

    Inputs and targets are hashed in separate streams, so the digest does not depend on how the
    data is cut into batches.
    """

    def __init__(self) -> None:
        self._streams = (hashlib.sha256(), hashlib.sha256())
        self._layout: list[list] = []  # runs of [input dtype/shape, target dtype/shape, count]
        self.n = 0

    def update(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        layout = [f"{t.dtype}{tuple(t.shape[1:])}" for t in (inputs, targets)]
        if self._layout and self._layout[-1][:2] == layout:
            self._layout[-1][2] += inputs.shape[0]
        else:
            self._layout.append([*layout, inputs.shape[0]])
        for stream, t in zip(self._streams, (inputs, targets), strict=True):
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            stream.update(raw.numpy().tobytes())
        self.n += inputs.shape[0]

    def hexdigest(self) -> str:
        final = hashlib.sha256(b"qem-public-data-v1")
        final.update(repr(self._layout).encode())
        for stream in self._streams:
            final.update(stream.digest())
        return final.hexdigest()


def fingerprint(data: DataLike, batch_size: int = 256) -> str:
    """sha256 hex digest of a dataset's tensors (bytes, shapes and dtypes), batch-independent."""
    hasher = DataHasher()
    for inputs, targets in batches(data, batch_size, name="public data"):
        hasher.update(inputs, targets)
    return hasher.hexdigest()
