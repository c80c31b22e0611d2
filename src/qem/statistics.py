"""The private pass (DESIGN.md §2 `statistics`): one streaming pass over the private data that
returns the sufficient statistic of the mechanism,

    sum_i gh_i,   gh_i = g_i min(1, C / ||g_i||),   g_i = P^T grad_theta loss(theta; z_i),

in float64, together with the count. Per-example gradients come from the subspace (torch.func
vmap over grad, or the Kronecker shortcut), batch by batch: memory is O(batch x k), never n x d.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qem.data import DataLike, as_dataset, batches
from qem.errors import DataError, InvalidParameterError, NonFiniteError
from qem.mechanism.clipping import clip_gradients
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


def whitening(
    cholesky: np.ndarray | None, clipping: ClipNorm
) -> Callable[[torch.Tensor], torch.Tensor]:
    """g -> u with ||u||_2 = the clipping norm of g: u = L^-1 g for the dual norm (A = L L^T),
    u = g for the Euclidean norm. The triangular solve runs in torch (float64) on torch's own
    threads: scipy's OpenBLAS threads, interleaved with the model's torch threads, made the
    private pass 3.0x a plain epoch instead of 1.8x (k = 512, 2 cores)."""
    if clipping is ClipNorm.EUCLIDEAN:
        return lambda g: g
    if cholesky is None:
        raise InvalidParameterError(
            "dual-norm clipping needs the Cholesky factor of A (validate_curvature(A))."
        )
    factor = torch.from_numpy(np.ascontiguousarray(cholesky, dtype=np.float64))
    return lambda g: torch.linalg.solve_triangular(factor, g.T, upper=False).T


def projected_gradient_batches(
    model: nn.Module,
    loss_fn: LossFn,
    subspace: Subspace,
    data: DataLike,
    *,
    batch_size: int,
    name: str,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset, g) per batch: g = P^T grad loss(theta; z_i), a float64 (B, k) tensor, with the
    model in eval mode (restored afterwards) and labels checked against the model's outputs.
    A non-finite row raises NonFiniteError naming the example's index in ``data``."""
    dataset = as_dataset(data, name)
    was_training = model.training
    model.eval()
    offset = 0
    try:
        with tqdm(total=len(dataset), desc=name, unit="ex", disable=not progress) as bar:
            for inputs, targets in batches(dataset, batch_size, name):
                with torch.no_grad():
                    check_targets(model(inputs[:1]), targets, offset)
                grads = subspace.per_example_gradients(model, loss_fn, inputs, targets)
                grads = grads.detach().to("cpu", torch.float64)
                finite = torch.isfinite(grads).all(dim=1)
                if not finite.all():
                    index = offset + int((~finite).nonzero()[0, 0])
                    raise NonFiniteError(
                        f"the gradient of {name} example {index} is not finite (NaN or "
                        "infinity); check that example and the loss."
                    )
                yield offset, grads
                offset += len(grads)
                bar.update(len(grads))
    finally:
        model.train(was_training)


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
    clipping ||g||_{A^-1} = ||L^-1 g||_2.
    """
    clipping = ClipNorm(clipping)
    whiten = whitening(cholesky, clipping)
    whitened_total = np.zeros(subspace.k, dtype=np.float64)
    count = clipped = 0
    batches_of_gradients = projected_gradient_batches(
        model,
        loss_fn,
        subspace,
        private_data,
        batch_size=batch_size,
        name="private data",
        progress=progress,
    )
    for _, grads in batches_of_gradients:
        # Clipping u = L^-1 g in the Euclidean norm is clipping g in ||.||_{A^-1}: the factor
        # min(1, C/||u||) is the same, and gh = L uh.
        clipped_batch, n_clipped = clip_gradients(whiten(grads).numpy(), clip_norm, "euclidean")
        whitened_total += clipped_batch.sum(axis=0)
        count += len(grads)
        clipped += n_clipped
    total = whitened_total if clipping is ClipNorm.EUCLIDEAN else cholesky @ whitened_total
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
    progress: bool = False,
) -> float:
    """A clipping bound chosen without private data: the ``quantile`` of the per-example
    subspace-gradient norms (dual or Euclidean, as clipping will use) on PUBLIC data."""
    if not 0.0 < quantile <= 1.0:
        raise DataError(f"clip quantile must lie in (0, 1], got {quantile!r}.")
    whiten = whitening(cholesky, ClipNorm(clipping))
    batches_of_gradients = projected_gradient_batches(
        model,
        loss_fn,
        subspace,
        public_data,
        batch_size=batch_size,
        name="public data",
        progress=progress,
    )
    values = torch.cat(
        [torch.linalg.vector_norm(whiten(grads), dim=1) for _, grads in batches_of_gradients]
    ).numpy()
    if not np.any(values > 0):
        raise DataError("public per-example gradients are all zero: pass clip_norm.")
    return float(np.quantile(values, quantile))
