"""Data plumbing shared by every pass: whatever form the data comes in, qem reads it as batches
(inputs, targets), where inputs is a Tensor or a dict of Tensors (the model's keyword
arguments, Hugging Face style) and targets is a Tensor.

Accepted forms (``DataLike``):

- a tuple (inputs, targets), inputs a Tensor or a dict of Tensors with one row per example
  (numpy arrays are read as tensors; a list [inputs, targets] of two arrays with as many rows
  is read as the tuple);
- a dict of Tensors with a "labels" entry: the targets; the other entries are the inputs;
- a map-style dataset (a ``torch.utils.data.Dataset``, or any object with ``__len__`` and
  ``__getitem__``, such as a Hugging Face ``datasets.Dataset`` in torch format) whose items are
  (input, target) pairs or dicts with "labels" (batched by torch's default collation);
- a ``DataLoader`` over such a Dataset: qem reads the loader's ``.dataset`` through the loader's
  ``collate_fn`` (dynamic padding keeps working), in dataset order and in batches of qem's own
  ``batch_size``. The loader's sampler, shuffling, batch size and workers are not used, so
  qem never reorders the private data by a sampler;
- public and validation data only: an ``IterableDataset`` or a DataLoader over one (a stream),
  read once into memory. Private data must be addressable by row (the schedules of
  qem.schedules select rows), so ``addressable=True`` refuses a stream.

A dict batch's targets are ``batch["labels"]`` and its inputs every other entry.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

from qem.errors import DataError, ShapeError

Inputs = torch.Tensor | dict[str, torch.Tensor]
"""A batch's inputs: one Tensor (``model(x)``) or a dict of Tensors (``model(**inputs)``)."""
Batch = tuple[Inputs, torch.Tensor]
DataLike = Dataset | DataLoader | tuple | Mapping
LABELS = "labels"
"""The key of the targets in a dict batch."""
STREAM_CHUNK = 256
"""Examples per stored batch when an IterableDataset is read into memory."""


def as_batch(batch: Any, name: str = "data") -> Batch:
    """(inputs, targets) of one collated batch: a pair, or a dict whose "labels" are the
    targets and whose other entries are the inputs."""
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise DataError(
                f"{name}: a dict batch needs a {LABELS!r} entry (the targets); it has "
                f"{sorted(batch)}. Rename the targets' key (for example 'label') to {LABELS!r}."
            )
        inputs = {key: value for key, value in batch.items() if key != LABELS}
        return _checked(inputs, batch[LABELS], name)
    if isinstance(batch, tuple | list) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, Mapping):
            inputs = dict(inputs)
        return _checked(inputs, targets, name)
    kind = f"a {type(batch).__name__}" + (
        f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
    )
    raise DataError(
        f"{name}: qem reads batches as (inputs, targets) pairs or dicts with a {LABELS!r} entry; "
        f"got {kind}. A dataset of three or more tensors (input_ids, attention_mask, labels) "
        "should yield dicts instead."
    )


def _checked(inputs: Any, targets: Any, name: str) -> Batch:
    """The batch with every entry a tensor and one row per example in each."""
    if isinstance(inputs, dict):
        if not inputs:
            raise DataError(f"{name}: a dict batch has no inputs besides {LABELS!r}.")
        inputs = {key: torch.as_tensor(value) for key, value in inputs.items()}
    else:
        inputs = torch.as_tensor(inputs)
    targets = torch.as_tensor(targets)
    sizes = {key: _rows(t) for key, t in input_entries(inputs)} | {LABELS: _rows(targets)}
    if len(set(sizes.values())) != 1:
        raise ShapeError(f"{name}: the inputs and targets differ in their numbers of rows {sizes}.")
    return inputs, targets


def _rows(tensor: torch.Tensor) -> int:
    if tensor.dim() == 0:
        raise ShapeError("a batch entry is a scalar; qem needs one row per example.")
    return tensor.shape[0]


def input_entries(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of the inputs: ("", x) for a Tensor, the items of a dict in key order
    (``inputs_from_entries`` inverts it)."""
    if isinstance(inputs, dict):
        return sorted(inputs.items())
    return [("", inputs)]


def inputs_from_entries(entries: Mapping[str, torch.Tensor]) -> Inputs:
    """The Tensor of the key "", or the dict of the entries (the inverse of input_entries)."""
    return entries[""] if "" in entries else dict(entries)


def map_inputs(function: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    """``function`` applied to the Tensor, or to every entry of the dict."""
    if isinstance(inputs, dict):
        return {key: function(value) for key, value in inputs.items()}
    return function(inputs)


def batch_size_of(inputs: Inputs) -> int:
    """Number of examples (rows) in a batch's inputs."""
    return input_entries(inputs)[0][1].shape[0]


def take_rows(inputs: Inputs, rows: slice | torch.Tensor | int) -> Inputs:
    """The inputs of the given rows (an int selects one example without its batch dimension)."""
    return map_inputs(lambda t: t[rows], inputs)


def signature_of(inputs: Inputs) -> tuple:
    """(key, per-example shape, dtype, device) of every input entry: what a data-independent
    check on synthetic inputs of the same form depends on."""
    return tuple((key, tuple(t.shape[1:]), t.dtype, t.device) for key, t in input_entries(inputs))


class StoredBatches(Dataset):
    """Batches held in memory: tensors given as (inputs, targets) or a dict, or a stream read
    once. Rows are numbered across the batches in order; a batch of ``batches`` never spans
    two stored batches (their per-example shapes may differ, e.g. padded to different
    lengths)."""

    def __init__(self, stored: list[Batch]) -> None:
        self.stored = _merged(stored)
        sizes = torch.tensor([len(targets) for _, targets in self.stored], dtype=torch.long)
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.n = int(sizes.sum())

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> tuple[Inputs, torch.Tensor]:
        if not -self.n <= row < self.n:
            raise IndexError(f"row {row} of {self.n}")
        row %= self.n
        which = int(torch.searchsorted(self.starts, row, right=True)) - 1
        inputs, targets = self.stored[which]
        local = row - int(self.starts[which])
        return take_rows(inputs, local), targets[local]


def _merged(stored: list[Batch]) -> list[Batch]:
    """One concatenated batch when every stored batch has the same form, else ``stored``."""
    if len(stored) <= 1:
        return stored
    forms = {(signature_of(x), targets.shape[1:], targets.dtype) for x, targets in stored}
    if len(forms) != 1:
        return stored
    inputs = [x for x, _ in stored]
    if isinstance(inputs[0], dict):
        merged: Inputs = {key: torch.cat([x[key] for x in inputs]) for key in inputs[0]}
    else:
        merged = torch.cat(inputs)
    return [(merged, torch.cat([targets for _, targets in stored]))]


class CollatedDataset(Dataset):
    """A map-style dataset read through a DataLoader's ``collate_fn``."""

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list], Any]) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, row: int) -> Any:
        return self.dataset[row]


def as_dataset(data: DataLike, name: str = "data", *, addressable: bool = False) -> Dataset:
    """``data`` as a non-empty map-style Dataset (module docstring for the accepted forms).
    ``addressable`` (private data) refuses a stream, whose rows cannot be selected."""
    if isinstance(data, DataLoader):
        stream = isinstance(data.dataset, IterableDataset) or (
            data.batch_size is None and data.batch_sampler is None
        )
        if not stream:
            dataset: Dataset = CollatedDataset(data.dataset, data.collate_fn)
        else:
            dataset = _read_stream(data, name, addressable)
    elif isinstance(data, IterableDataset):
        dataset = _read_stream(DataLoader(data, batch_size=STREAM_CHUNK), name, addressable)
    elif isinstance(data, tuple):
        if len(data) != 2:
            raise ShapeError(f"{name} must be (inputs, targets), got a tuple of {len(data)}.")
        dataset = StoredBatches([as_batch(data, name)])
    elif isinstance(data, Mapping):
        dataset = StoredBatches([as_batch(data, name)])
    elif _is_array_pair(data):  # [inputs, targets]: the pair as a list, read as the tuple
        dataset = StoredBatches([as_batch(tuple(data), name)])
    elif isinstance(data, Dataset):
        dataset = data
    elif (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not torch.is_tensor(data)
        and not isinstance(data, str | bytes | os.PathLike)
    ):
        dataset = CollatedDataset(data, default_collate)  # map-style, e.g. a Hugging Face Dataset
    else:
        raise DataError(
            f"{name}: unsupported type {type(data).__name__}; pass (inputs, targets) tensors, a "
            f"dict of tensors with {LABELS!r}, a torch Dataset or a DataLoader"
            + (
                " (a file path is not data: read it first, for example with "
                "qem.datasets.files.load_supervised_file)"
                if isinstance(data, str | bytes | os.PathLike)
                else ""
            )
            + "."
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"{name} is empty: at least one example is needed.")
    return dataset


def _is_array_pair(data: object) -> bool:
    """A list [inputs, targets] of two arrays (tensors or numpy arrays) with the same number
    of rows: the pair form, not a dataset of two examples."""
    if not (isinstance(data, list) and len(data) == 2):
        return False
    arrays = [item for item in data if torch.is_tensor(item) or isinstance(item, np.ndarray)]
    return (
        len(arrays) == 2 and all(a.ndim >= 1 for a in arrays) and len(arrays[0]) == len(arrays[1])
    )


def _read_stream(loader: DataLoader, name: str, addressable: bool) -> StoredBatches:
    """A stream of batches read once into memory (public and validation data only)."""
    if addressable:
        raise DataError(
            f"{name} is a stream (an IterableDataset, or a DataLoader without batch_size): qem "
            "selects private records by row (each round of a schedule reads chosen rows, and N "
            "is the number of rows), so it needs a map-style Dataset (with __len__ and "
            "__getitem__), a DataLoader over one, or tensors."
        )
    return StoredBatches([as_batch(batch, name) for batch in loader])


def batches(
    data: DataLike,
    batch_size: int,
    name: str = "data",
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Iterate over (inputs, targets) batches: in a fixed order, or shuffled by ``generator``.
    Tensors held in memory are indexed directly (much faster than item-by-item collation);
    other datasets go through their collate function (a DataLoader's, or torch's default)."""
    dataset = as_dataset(data, name)
    stored, index = _stored_view(dataset)
    if stored is not None:
        yield from _stored_batches(stored, index, batch_size, generator)
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        collate_fn=_collate_of(dataset),
    )
    for batch in loader:
        yield as_batch(batch, name)


def training_loader(
    data: DataLike,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader over ``data`` yielding (inputs, targets) batches through the data's own
    collate function, for training loops and for libraries that re-sample a loader (Opacus'
    Poisson loader keeps its collate function and ``generator``)."""
    dataset = as_dataset(data, addressable=True)
    collate = _collate_of(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda items: as_batch(collate(items)),
    )


def _collate_of(dataset: Dataset) -> Callable[[list], Any]:
    """The collate function of a (Subset of a) CollatedDataset, else torch's default."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, CollatedDataset):
        return dataset.collate_fn
    return default_collate


def _stored_view(dataset: Dataset) -> tuple[list[Batch] | None, torch.Tensor | None]:
    """(stored batches, rows) when ``dataset`` is a TensorDataset of two tensors or
    StoredBatches, or a (nested) Subset of one, so that batches can be gathered by indexing;
    (None, None) otherwise."""
    index = None
    while isinstance(dataset, Subset):
        rows = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        index = rows if index is None else rows[index]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return [tuple(dataset.tensors)], index  # type: ignore[list-item]
    if isinstance(dataset, StoredBatches):
        return dataset.stored, index
    return None, None


def _stored_batches(
    stored: list[Batch],
    index: torch.Tensor | None,
    batch_size: int,
    generator: torch.Generator | None,
) -> Iterator[Batch]:
    """Batches of the rows ``index`` (all when None) of ``stored``, shuffled by ``generator``;
    rows of different stored batches go to different batches, in order of first appearance."""
    sizes = torch.tensor([len(targets) for _, targets in stored], dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    count = int(sizes.sum()) if index is None else len(index)
    order = torch.randperm(count, generator=generator) if generator is not None else None
    rows = torch.arange(count) if order is None else order
    if index is not None:
        rows = index[rows]
    which = torch.searchsorted(starts, rows, right=True) - 1
    if len(stored) > 1:  # group the rows by stored batch, in order of first appearance
        groups, inverse = torch.unique(which, return_inverse=True)
        first = torch.full((len(groups),), count, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(count), "amin"
        )
        rank = torch.argsort(torch.argsort(first))
        regroup = torch.argsort(rank[inverse], stable=True)
        rows, which = rows[regroup], which[regroup]
    groups, counts = torch.unique_consecutive(which, return_counts=True)
    for group, segment in zip(groups.tolist(), rows.split(counts.tolist()), strict=True):
        inputs, targets = stored[group]
        for chunk in (segment - starts[group]).split(batch_size):
            yield take_rows(inputs, chunk), targets[chunk]


def known_targets(dataset: Dataset) -> torch.Tensor | None:
    """Every target of the tensors held in memory behind ``dataset`` (the whole store, also
    rows a Subset leaves out), or None when the dataset is not held as tensors."""
    stored, _ = _stored_view(dataset)
    if stored is None:
        return None
    return torch.cat([targets for _, targets in stored])


def num_examples(data: DataLike) -> int:
    """Number of examples in ``data``."""
    return len(as_dataset(data))


class DataHasher:
    """Incremental sha256 over a dataset's tensors: bytes, dtypes and per-example shapes.

    Each input tensor (each entry of dict inputs, by key) and the targets are hashed in
    separate streams, so the digest does not depend on how the data is cut into batches (dict
    inputs padded per batch, by a DataLoader's collate function, depend on it through the
    padded lengths).
    """

    def __init__(self) -> None:
        self._streams: dict[str, Any] = {}
        self._layout: list[list] = []  # runs of [input form, target dtype/shape, count]
        self.n = 0

    def update(self, inputs: Inputs, targets: torch.Tensor) -> None:
        entries = [*input_entries(inputs), (LABELS, targets)]
        layout = [
            "".join(f"{key}:{_form(t)};" if key else _form(t) for key, t in entries[:-1]),
            _form(targets),
        ]
        rows = targets.shape[0]
        if self._layout and self._layout[-1][:2] == layout:
            self._layout[-1][2] += rows
        else:
            self._layout.append([*layout, rows])
        for key, t in entries:
            stream = self._streams.setdefault(key, hashlib.sha256())
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            stream.update(raw.numpy().tobytes())
        self.n += rows

    def hexdigest(self) -> str:
        final = hashlib.sha256(b"qem-public-data-v1")
        final.update(repr(self._layout).encode())
        for key in sorted(self._streams, key=lambda k: (k == LABELS, k)):
            if key not in ("", LABELS):
                final.update(key.encode())
            final.update(self._streams[key].digest())
        return final.hexdigest()


def _form(tensor: torch.Tensor) -> str:
    return f"{tensor.dtype}{tuple(tensor.shape[1:])}"


def fingerprint(data: DataLike, batch_size: int = 256) -> str:
    """sha256 hex digest of a dataset's tensors (bytes, shapes and dtypes), batch-independent."""
    hasher = DataHasher()
    for inputs, targets in batches(data, batch_size, name="public data"):
        hasher.update(inputs, targets)
    return hasher.hexdigest()
