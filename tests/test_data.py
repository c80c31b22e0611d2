"""Every data form qem reads (qem.data): tensors, dict inputs, dicts with "labels", Datasets of
pairs or dicts, DataLoaders read in dataset order through their collate_fn, streams for public
data, the addressability private data needs, and the errors for refused forms. Each batch is
compared with the rows it must hold, cut from the tensors by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from cases import make_task
from qem.data import (
    StoredBatches,
    as_batch,
    as_dataset,
    batch_size_of,
    batches,
    fingerprint,
    input_entries,
    inputs_from_entries,
    known_targets,
    num_examples,
    signature_of,
    take_rows,
    training_loader,
)
from qem.errors import DataError, ShapeError

X, Y = make_task(23, 0)
MASK = (X > 0).double()


def collected(data, batch_size: int = 5, **kwargs) -> tuple[object, torch.Tensor, list[int]]:
    """(inputs, targets) of every batch of ``data`` concatenated in order, and the batch sizes."""
    parts = list(batches(data, batch_size, **kwargs))
    sizes = [len(targets) for _, targets in parts]
    targets = torch.cat([t for _, t in parts])
    if isinstance(parts[0][0], dict):
        inputs = {key: torch.cat([x[key] for x, _ in parts]) for key in parts[0][0]}
    else:
        inputs = torch.cat([x for x, _ in parts])
    return inputs, targets, sizes


class Pairs(Dataset):
    """A map-style Dataset of (x_i, y_i) pairs (collated by torch's default_collate)."""

    def __len__(self) -> int:
        return len(Y)

    def __getitem__(self, i: int):
        return X[i], Y[i]


class Dicts(Dataset):
    """A map-style Dataset of dict examples with "labels", as tokenised datasets are."""

    def __len__(self) -> int:
        return len(Y)

    def __getitem__(self, i: int):
        return {"features": X[i], "mask": MASK[i], "labels": Y[i]}


class Stream(IterableDataset):
    """Examples one by one, without __len__ or __getitem__."""

    def __init__(self, inputs=X, targets=Y) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self):
        yield from zip(self.inputs, self.targets, strict=True)


class ChunkStream(IterableDataset):
    """Batches already made (of 10, 10 and 3 rows), as a DataLoader with batch_size=None
    passes them on."""

    def __iter__(self):
        for start in range(0, len(Y), 10):
            yield X[start : start + 10], Y[start : start + 10]


@pytest.mark.parametrize(
    "data",
    [(X, Y), TensorDataset(X, Y), Pairs(), [(X[i], Y[i]) for i in range(len(Y))],
     (X.numpy(), Y.numpy())],
    ids=["tensors", "TensorDataset", "Dataset", "list", "numpy"],
)  # fmt: skip
def test_every_tensor_form_gives_the_rows_in_order(data):
    inputs, targets, sizes = collected(data)
    assert torch.equal(inputs, X) and torch.equal(targets, Y)
    assert sizes == [5, 5, 5, 5, 3]
    assert num_examples(data) == 23


@pytest.mark.parametrize(
    "data",
    [({"features": X, "mask": MASK}, Y), {"features": X, "mask": MASK, "labels": Y}, Dicts()],
    ids=["dict-inputs", "dict-with-labels", "Dataset-of-dicts"],
)
def test_dict_forms_give_dict_inputs_without_the_labels(data):
    inputs, targets, _ = collected(data, batch_size=7)
    assert sorted(inputs) == ["features", "mask"]
    assert torch.equal(inputs["features"], X) and torch.equal(inputs["mask"], MASK)
    assert torch.equal(targets, Y)


def test_a_dataloader_is_read_in_dataset_order_through_its_collate_function():
    """The loader's shuffling, sampler and batch size are ignored; its collate_fn is used (here
    it doubles the features and adds a key, as dynamic padding adds an attention mask)."""

    def collate(items):
        return {
            "features": 2 * torch.stack([item["features"] for item in items]),
            "width": torch.full((len(items), 1), len(items)),
            "labels": torch.stack([item["labels"] for item in items]),
        }

    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        Dicts(), batch_size=4, shuffle=True, generator=generator, collate_fn=collate
    )
    parts = list(batches(loader, 6))
    assert [len(t) for _, t in parts] == [6, 6, 6, 5]  # qem's batch size, not the loader's
    for b, (inputs, targets) in enumerate(parts):
        rows = slice(6 * b, 6 * b + len(targets))  # the dataset's order
        assert torch.equal(inputs["features"], 2 * X[rows]) and torch.equal(targets, Y[rows])
        assert torch.equal(inputs["width"], torch.full((len(targets), 1), len(targets)))
        assert "mask" not in inputs  # what collate_fn returned, nothing else


def test_a_shuffled_pass_follows_the_generator_and_only_it():
    """Tensors held in memory are ordered by torch.randperm(n, generator); any other dataset by
    a DataLoader's sampler on ``generator``: a permutation of every row, the same for two
    generators of the same seed, another for another seed."""
    order = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    for data in ((X, Y), Subset(TensorDataset(X, Y), range(23))):
        inputs, targets, _ = collected(data, 4, generator=torch.Generator().manual_seed(3))
        assert torch.equal(inputs, X[order]) and torch.equal(targets, Y[order])
    orders = []
    for seed in (3, 3, 4):
        inputs, _, _ = collected(Pairs(), 4, generator=torch.Generator().manual_seed(seed))
        rows = [int(torch.nonzero((row == X).all(dim=1))) for row in inputs]
        assert sorted(rows) == list(range(23))
        orders.append(rows)
    assert orders[0] == orders[1] != orders[2]


def test_subsets_read_their_rows_and_known_targets_read_the_whole_store():
    nested = Subset(Subset(TensorDataset(X, Y), [3, 1, 4, 15, 9, 2, 6]), [6, 0, 2])
    inputs, targets, _ = collected(nested, 2)
    assert torch.equal(inputs, X[[6, 3, 4]]) and torch.equal(targets, Y[[6, 3, 4]])
    assert torch.equal(known_targets(nested), Y)  # every stored target, for the label check
    assert torch.equal(known_targets(as_dataset((X, Y))), Y)
    assert known_targets(Pairs()) is None  # not held as tensors: nothing is read ahead


@pytest.mark.parametrize(
    "stream",
    [Stream(), DataLoader(Stream(), batch_size=6), DataLoader(ChunkStream(), batch_size=None)],
    ids=["IterableDataset", "DataLoader-of-stream", "DataLoader-batch_size-None"],
)
def test_public_streams_are_read_once_and_private_ones_refused(stream):
    dataset = as_dataset(stream, "public data")
    assert isinstance(dataset, StoredBatches) and len(dataset) == 23
    inputs, targets, _ = collected(dataset, 5)
    assert torch.equal(inputs, X) and torch.equal(targets, Y)
    with pytest.raises(DataError, match=r"private data is a stream.*map-style Dataset"):
        as_dataset(stream, "private data", addressable=True)
    with pytest.raises(DataError, match="stream"):
        training_loader(stream, 4)


def test_private_data_is_addressable_by_row_in_every_map_style_form():
    for data in ((X, Y), TensorDataset(X, Y), Pairs(), Dicts(), DataLoader(Pairs(), batch_size=3)):
        dataset = as_dataset(data, "private data", addressable=True)
        assert len(dataset) == 23
        inputs, targets, _ = collected(Subset(dataset, [22, 0, 7]), 3)
        features = inputs["features"] if isinstance(inputs, dict) else inputs
        assert torch.equal(features, X[[22, 0, 7]]) and torch.equal(targets, Y[[22, 0, 7]])


def test_stored_batches_of_different_forms_are_numbered_across_and_never_mixed():
    """Padded chunks of different widths: rows are numbered across the chunks; a batch never
    spans two chunks (their per-example shapes differ); equal forms are merged into one."""
    first = (torch.arange(12.0).reshape(4, 3), torch.arange(4))
    second = (torch.arange(10.0).reshape(2, 5), torch.arange(4, 6))
    stored = StoredBatches([first, second])
    assert len(stored) == 6 and len(stored.stored) == 2
    x, y = stored[4]
    assert torch.equal(x, second[0][0]) and int(y) == 4
    assert torch.equal(stored[-1][0], second[0][1])
    with pytest.raises(IndexError):
        stored[6]
    parts = list(batches(stored, 3))
    assert [tuple(x.shape) for x, _ in parts] == [(3, 3), (1, 3), (2, 5)]
    merged = StoredBatches([first, (first[0] + 1, first[1])])
    assert len(merged.stored) == 1 and len(merged) == 8


def test_training_loader_batches_through_the_collate_function_in_its_own_order():
    loader = training_loader(Dicts(), 8)
    inputs, targets = next(iter(loader))
    assert torch.equal(inputs["features"], X[:8]) and torch.equal(targets, Y[:8])
    shuffled = training_loader((X, Y), 23, shuffle=True, generator=torch.Generator().manual_seed(1))
    _, targets = next(iter(shuffled))
    assert sorted(targets.tolist()) == sorted(Y.tolist()) and not torch.equal(targets, Y)


def test_the_inputs_helpers_invert_each_other():
    inputs = {"mask": MASK, "features": X}
    entries = input_entries(inputs)
    assert [key for key, _ in entries] == ["features", "mask"]  # key order
    assert inputs_from_entries(dict(entries)) == inputs
    assert inputs_from_entries(dict(input_entries(X))) is X
    assert torch.equal(take_rows(inputs, 3)["features"], X[3])  # one example: no batch dimension
    assert batch_size_of(take_rows(inputs, slice(2, 9))) == 7
    assert signature_of(inputs) == (
        ("features", (6,), torch.float64, torch.device("cpu")),
        ("mask", (6,), torch.float64, torch.device("cpu")),
    )


def test_the_fingerprint_depends_on_the_data_not_on_its_form_or_batches():
    reference = fingerprint((X, Y))
    for data in (TensorDataset(X, Y), Pairs(), DataLoader(Pairs(), batch_size=4), Stream()):
        assert fingerprint(data) == reference
    assert fingerprint((X, Y), batch_size=7) == reference
    changed = X.clone()
    changed[11, 4] += 1e-12
    assert fingerprint((changed, Y)) != reference
    assert fingerprint((X.float(), Y)) != reference  # dtype is part of the data
    assert fingerprint((X[:-1], Y[:-1])) != reference
    assert fingerprint(({"features": X}, Y)) != reference  # a named input is another form


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"features": X, "label": Y}, DataError, r"'labels' entry.*\['features', 'label'\]"),
        ({"labels": Y}, DataError, "no inputs besides 'labels'"),
        ((X, Y, Y), ShapeError, "must be \\(inputs, targets\\), got a tuple of 3"),
        ((X, Y[:-1]), ShapeError, "differ in their numbers of rows"),
        (({"features": X, "mask": MASK[:5]}, Y), ShapeError, "numbers of rows"),
        ((X[0, 0], Y[0]), ShapeError, "scalar"),
        ((X[:0], Y[:0]), DataError, "empty"),
        (X, DataError, "unsupported type Tensor"),
        (3, DataError, "unsupported type int"),
        (TensorDataset(X, MASK, Y), DataError, "(tuple|list) of 3.*should yield dicts"),
    ],
    ids=["no-labels", "only-labels", "triple", "rows", "dict-rows", "scalar", "empty", "tensor",
         "int", "three-tensor-dataset"],
)  # fmt: skip
def test_refused_forms_get_a_one_line_error(data, error, match):
    with pytest.raises(error, match=match) as info:
        list(batches(data, 4, name="public data"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("public data") or "scalar" in message  # names the data it reads


def test_a_batch_is_a_pair_or_a_dict_with_labels():
    inputs, targets = as_batch([X, Y])  # a collated list pair
    assert inputs is not None and torch.equal(targets, Y)
    inputs, targets = as_batch({"features": X, "labels": Y})
    assert list(inputs) == ["features"] and torch.equal(targets, Y)
    with pytest.raises(DataError, match="got a Tensor"):
        as_batch(X)


@pytest.mark.parametrize("path", ["public.npz", b"public.npz"], ids=["str", "bytes"])
def test_a_path_where_data_belongs_is_refused_clearly(path):
    with pytest.raises(DataError, match="unsupported type"):
        as_dataset(path, "public data")


def test_numpy_arrays_are_read_as_tensors_without_copying_their_values():
    inputs, targets, _ = collected((X.numpy(), Y.numpy()), 23)
    np.testing.assert_array_equal(inputs.numpy(), X.numpy())
    assert inputs.dtype == torch.float64 and targets.dtype == torch.int64
