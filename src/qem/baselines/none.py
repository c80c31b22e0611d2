"""No fine-tuning: the pretrained model, unchanged. It reads no private data, so it is
trivially (0, 0)-DP; it is the floor every fine-tuning method must beat."""

from __future__ import annotations

import copy

from torch import nn

from qem.baselines import (
    baseline_result,
    check_requested_budget,
)
from qem.checks import parse_option
from qem.data import DataLike, as_dataset
from qem.finetune import FineTuneResult
from qem.losses import LossFn
from qem.privacy.sensitivity import Adjacency
from qem.timing import PhaseTimer


def none(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    adjacency: str = "replace_one",
    validation_data: DataLike | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> FineTuneResult:
    """Return an unchanged copy of ``model``; the budget, checked when given, is unused."""
    requested = check_requested_budget(epsilon, delta)
    adjacency = parse_option(Adjacency, adjacency, "adjacency")
    n = len(as_dataset(private_data, "private data", addressable=True))
    timer = PhaseTimer()
    with timer.phase("copy"):
        unchanged = copy.deepcopy(model)
    return baseline_result(
        unchanged,
        "none",
        privacy="(0, 0)-DP: the pretrained model, no private data used",
        epsilon=0.0,
        delta=0.0,
        adjacency=adjacency.value,
        N=n,
        accountant=None,
        hyperparameters={},
        seed=seed,
        seconds=timer.seconds,
        requested_budget=requested,
    )
