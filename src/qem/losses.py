"""Per-example losses. qem needs loss_fn(outputs (B, ...), targets (B, ...)) -> (B,): one value
per example, never a batch mean, since per-example gradients are clipped one by one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qem.errors import ShapeError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A loss returning one value per example: loss_fn(outputs (B, ...), targets (B, ...)) -> (B,)."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(outputs)[target], one value per example."""
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 ||outputs - targets||^2 summed over output dimensions, one value per example."""
    diff = (outputs - targets.reshape(outputs.shape)).reshape(outputs.shape[0], -1)
    return 0.5 * (diff * diff).sum(dim=1)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "squared_error": squared_error}


def check_per_example_loss(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ShapeError unless loss_fn returns one finite-shaped value per example."""
    value = loss_fn(outputs, targets)
    expected = (outputs.shape[0],)
    if tuple(value.shape) != expected:
        raise ShapeError(
            f"the loss returned shape {tuple(value.shape)} for a batch of {outputs.shape[0]}; "
            "qem needs one loss per example (for example reduction='none')."
        )
