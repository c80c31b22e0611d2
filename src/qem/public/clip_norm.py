"""The public clip norm (docs/theory.md §2, §13): a clipping bound chosen without private data,
the ``quantile`` of the per-example subspace-gradient norms on PUBLIC data, measured in the norm
clipping will use (||g||_{A^-1} = ||L^-1 g|| for the dual norm, ||g|| for the Euclidean one)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from qem.checks import check_in_interval
from qem.data import DataLike, as_dataset, batches, take_rows
from qem.errors import DataError, NonFiniteError
from qem.labels import check_targets
from qem.losses import LossFn
from qem.model_calls import call_model, eval_mode, on_model_device
from qem.privacy.sensitivity import ClipNorm
from qem.progress import progress_bar
from qem.statistics import projected_gradients, whitening
from qem.subspace.base import Subspace


def public_gradient_batches(
    model: nn.Module,
    loss_fn: LossFn,
    subspace: Subspace,
    data: DataLike,
    *,
    batch_size: int,
    name: str = "public data",
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset, g) per batch of PUBLIC data: g = P^T grad loss(theta; z_i), a float64
    (B, k) tensor, with the model in eval mode (restored afterwards). A bad label or a
    non-finite row raises an error naming the example's index in ``data`` (public, so it may).
    """
    dataset = as_dataset(data, name)
    with (
        eval_mode(model),
        progress_bar(total=len(dataset), desc=name, unit="ex", enabled=progress) as bar,
    ):
        offset = 0
        for batch in batches(dataset, batch_size, name):
            inputs, targets = on_model_device(model, *batch)
            with torch.no_grad():
                check_targets(call_model(model, take_rows(inputs, slice(0, 1))), targets, offset)
            grads = projected_gradients(subspace, model, loss_fn, inputs, targets)
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
    check_in_interval("clip quantile", quantile, 0.0, 1.0, closed="high")
    whiten = whitening(cholesky, ClipNorm(clipping))
    batches_of_gradients = public_gradient_batches(
        model, loss_fn, subspace, public_data, batch_size=batch_size, progress=progress
    )
    values = torch.cat(
        [torch.linalg.vector_norm(whiten(grads), dim=1) for _, grads in batches_of_gradients]
    ).numpy()
    if not np.any(values > 0):
        raise DataError("public per-example gradients are all zero: pass clip_norm.")
    return float(np.quantile(values, quantile))
