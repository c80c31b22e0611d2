"""Integer targets against a classifier's outputs: which labels lie outside [0, C) for a
model with C outputs (private records: a mask, handled by the invalid-record policy) and the
error naming the first one (public data only, where naming an example is allowed)."""

from __future__ import annotations

import torch

from qem.errors import DataError


def label_errors(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For classification outputs (B, C) with integer targets, the mask of targets outside
    [0, C); all False otherwise."""
    if outputs.ndim == 2 and not torch.is_floating_point(targets):
        return (targets < 0) | (targets >= outputs.shape[1])
    return torch.zeros(targets.shape[:1], dtype=torch.bool, device=targets.device)


def check_targets(outputs: torch.Tensor, targets: torch.Tensor, offset: int = 0) -> None:
    """For classification outputs (B, C) with integer targets, require 0 <= y < C (PUBLIC
    data: the message names the example).

    ``offset`` is the index of ``targets[0]`` in its dataset, so the message names the example.
    """
    bad = label_errors(outputs, targets)
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        raise DataError(
            f"label {int(targets[position])} of example {offset + position} is outside "
            f"[0, {outputs.shape[1]}): the model has {outputs.shape[1]} outputs."
        )
