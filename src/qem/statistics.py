"""The private pass (DESIGN.md §2 `statistics`): one streaming pass over the private data that
returns the sufficient statistic of the mechanism,

    sum_i gh_i,   gh_i = g_i min(1, C / ||g_i||),   g_i = P^T grad_theta loss(theta; z_i),

in float64, together with the count. Per-example gradients come from the subspace (torch.func
vmap over grad, or the Kronecker shortcut), batch by batch: memory is O(batch x k), never n x d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qem.data import DataLike, as_dataset, batches
from qem.errors import DataError, NonFiniteError
from qem.mechanism.clipping import clip_gradients, dual_norms
from qem.privacy.sensitivity import ClipNorm
from qem.subspace.base import LossFn, Subspace


@dataclass(frozen=True)
class GradientStatistics:
    """Result of the private pass. ``gradient_sum`` and ``count`` are private values."""

    gradient_sum: np.ndarray
    count: int
    clipped_count: int


def check_targets(outputs: torch.Tensor, targets: torch.Tensor, offset: int = 0) -> None:
    """For classification outputs (B, C) with integer targets, require 0 <= y < C.

    ``offset`` is the index of ``targets[0]`` in its dataset, so the message names the example.
    """
    if outputs.ndim == 2 and not torch.is_floating_point(targets):
        bad = (targets < 0) | (targets >= outputs.shape[1])
        if bad.any():
            position = int(bad.nonzero()[0, 0])
            raise DataError(
                f"label {int(targets[position])} of example {offset + position} is outside "
                f"[0, {outputs.shape[1]}): the model has {outputs.shape[1]} outputs."
            )


def private_gradient_sum(
    model: nn.Module,
    loss_fn: LossFn,
    subspace: Subspace,
    private_data: DataLike,
    *,
    clip_norm: float,
    clipping: ClipNorm | str = ClipNorm.DUAL,
    cholesky: np.ndarray | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> GradientStatistics:
    """Stream over ``private_data`` and return the float64 sum of clipped subspace gradients.

    ``cholesky`` is the lower Cholesky factor L of A (A = L L^T), required for dual-norm
    clipping ||g||_{A^-1} = ||L^-1 g||_2. A non-finite per-example gradient raises
    NonFiniteError naming the example's index in ``private_data``.
    """
    dataset = as_dataset(private_data, "private data")
    clipping = ClipNorm(clipping)
    total = np.zeros(subspace.k, dtype=np.float64)
    count = clipped = 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(dataset), desc="private pass", unit="ex", disable=not progress)
        for inputs, targets in batches(dataset, batch_size):
            with torch.no_grad():
                check_targets(model(inputs[:1]), targets, count)
            grads = subspace.per_example_gradients(model, loss_fn, inputs, targets)
            grads = grads.detach().cpu().numpy().astype(np.float64, copy=False)
            finite = np.isfinite(grads).all(axis=1)
            if not finite.all():
                index = count + int(np.flatnonzero(~finite)[0])
                raise NonFiniteError(
                    f"the gradient of private example {index} is not finite (NaN or infinity); "
                    "check that example's input and the loss."
                )
            clipped_batch, n_clipped = clip_gradients(grads, clip_norm, clipping, cholesky)
            total += clipped_batch.sum(axis=0)
            count += grads.shape[0]
            clipped += n_clipped
            bar.update(grads.shape[0])
        bar.close()
    finally:
        model.train(was_training)
    return GradientStatistics(gradient_sum=total, count=count, clipped_count=clipped)


def public_clip_norm(
    model: nn.Module,
    loss_fn: LossFn,
    subspace: Subspace,
    public_data: DataLike,
    *,
    quantile: float,
    clipping: ClipNorm | str = ClipNorm.DUAL,
    cholesky: np.ndarray | None = None,
    batch_size: int = 256,
) -> float:
    """A clipping bound chosen without private data: the ``quantile`` of the per-example
    subspace-gradient norms (dual or Euclidean, as clipping will use) on PUBLIC data."""
    if not 0.0 < quantile <= 1.0:
        raise DataError(f"clip quantile must lie in (0, 1], got {quantile!r}.")
    clipping = ClipNorm(clipping)
    norms = []
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches(public_data, batch_size, "public data"):
            grads = subspace.per_example_gradients(model, loss_fn, inputs, targets)
            grads = grads.detach().cpu().numpy().astype(np.float64, copy=False)
            if clipping is ClipNorm.DUAL:
                norms.append(dual_norms(grads, cholesky))
            else:
                norms.append(np.linalg.norm(grads, axis=1))
    finally:
        model.train(was_training)
    values = np.concatenate(norms)
    values = values[np.isfinite(values)]
    if values.size == 0 or not np.any(values > 0):
        raise DataError("public per-example gradients are all zero or non-finite: pass clip_norm.")
    return float(np.quantile(values, quantile))
