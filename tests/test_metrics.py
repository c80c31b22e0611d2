"""AUROC (scikit-learn behind qem's checks) against a brute-force count over all pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qem.errors import DataError, NonFiniteError
from qem.metrics import auroc, evaluate_auroc


def pair_count_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(s_pos > s_neg) + P(s_pos = s_neg) / 2 over every positive-negative pair."""
    diff = scores[labels == 1][:, None] - scores[labels == 0][None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("n", [2, 7, 60, 301])
def test_auroc_matches_pair_count(n: int) -> None:
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    tied = rng.integers(0, 4, n).astype(float)  # many ties
    continuous = rng.standard_normal(n) + 0.7 * labels
    for scores in (tied, continuous, -continuous):
        brute = pair_count_auroc(scores, labels)
        assert auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
            brute, abs=1e-12
        )


def test_auroc_extremes_and_refusals() -> None:
    assert auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0 and auroc([0.9, 0.2], [0, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    with pytest.raises(DataError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(NonFiniteError):
        auroc([np.nan, 0.2], [0, 1])
    with pytest.raises(DataError, match="0 or 1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(DataError, match="3 scores but 2 labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])


def test_evaluate_auroc_scores_by_the_logit_margin() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g)
    y[:2] = torch.tensor([0, 1])
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        logits = model(x.double())
    margin = (logits[:, 1] - logits[:, 0]).numpy()
    assert evaluate_auroc(model, (x, y), batch_size=7) == pytest.approx(
        pair_count_auroc(margin, y.numpy()), abs=1e-12
    )
    with pytest.raises(DataError, match="two output logits"):
        evaluate_auroc(torch.nn.Linear(3, 3), (x, y))
