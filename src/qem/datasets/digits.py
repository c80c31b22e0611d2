"""A small image task that ships with scikit-learn (nothing is downloaded): the 1,797 8x8
handwritten digits of ``sklearn.datasets.load_digits`` (UCI optdigits test set; 64 pixel
intensities 0..16, ten classes), cut by one seeded permutation into public training, public
validation, private training and test rows (:func:`qem.datasets.scenarios.seeded_split`).

Inputs are the intensities divided by 16, the format's fixed maximum (a constant of the data
format, not a statistic of any rows), as float32 of shape (n, 64); targets int64 0..9.
Public validation rows are neither pretraining nor private rows.
"""

from __future__ import annotations

import torch

from qem.datasets.scenarios import Scenario, seeded_split

DIGITS_ROWS = 1_797
PIXEL_MAX = 16.0


def digits_scenario(
    seed: int = 0,
    *,
    public_size: int = 200,
    valid_size: int = 200,
    private_size: int = 400,
    test_size: int | None = None,
) -> Scenario:
    """scikit-learn's digits: pretrain on ``public_size`` rows, choose on ``valid_size`` public
    validation rows, fine-tune privately on ``private_size`` rows, test on ``test_size`` (None:
    every row left, 997 with the defaults). Same distribution on every side (as MNIST S1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / PIXEL_MAX
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    sizes = {
        "public_train": public_size,
        "public_valid": valid_size,
        "private_train": private_size,
        "test": test_size,
    }
    idx = seeded_split(len(y), seed, sizes)
    return Scenario(
        name="digits",
        description=(
            f"scikit-learn digits (8x8): pretrain on {len(idx['public_train'])} public images, "
            f"validate on {len(idx['public_valid'])} public images, fine-tune privately on "
            f"{len(idx['private_train'])}, test on {len(idx['test'])}."
        ),
        **{side: (x[rows], y[rows]) for side, rows in idx.items()},
        indices=idx,
    )
