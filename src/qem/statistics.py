"""The private pass (docs/theory.md §0-§2: S_D): one streaming pass over the private data that
returns the sufficient statistic of the mechanism,

    sum_i gh_i,   gh_i = g_i min(1, C / ||g_i||),   g_i = P^T grad_theta loss(theta; z_i),

in float64, together with the count. Per-example gradients come from the subspace (torch.func
vmap over grad, or the Kronecker shortcut), batch by batch: memory is O(batch x k), never n x d.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from qem.curvature.base import eval_mode
from qem.data import DataLike, Inputs, as_dataset, batch_size_of, batches, take_rows
from qem.errors import DataError, InvalidParameterError
from qem.labels import label_errors
from qem.mechanism.clipping import clip_gradients
from qem.model_calls import call_model, on_model_device
from qem.privacy.sensitivity import ClipNorm
from qem.progress import progress_bar
from qem.subspace.base import LossFn, Subspace


class InvalidRecords(StrEnum):
    """What the private pass does with a record whose gradient cannot be computed.

    ``zero`` (default, docs/theory.md §12): a record whose loss or gradient is not finite, or
    whose label lies outside the model's outputs, contributes a zero gradient, and no count of
    such records is released; the release is what it would be for the dataset without that
    record's influence, so a neighbouring dataset cannot make the run abort. ``raise``: strict
    mode; the error says neither which record nor its values."""

    ZERO = "zero"
    RAISE = "raise"


Reducer = Callable[[Callable[[], np.ndarray], int], np.ndarray]
"""``all_reduce(compute, size)``: the sum over a process group's ranks of each rank's
``compute()`` (``size`` float64 values), e.g. qem.distributed.ProcessGroup.all_reduce_sum."""


@dataclass(frozen=True)
class GradientStatistics:
    """Result of the private pass. Every field is a private value: never report it."""

    gradient_sum: np.ndarray
    count: int
    clipped_count: int


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


def private_gradient_batches(
    model: nn.Module,
    loss_fn: LossFn,
    subspace: Subspace,
    data: Dataset,
    *,
    batch_size: int,
    invalid: InvalidRecords = InvalidRecords.ZERO,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield g per batch of PRIVATE data (float64 (B, k)), model in eval mode, with the
    invalid-record policy applied: under ``zero`` a record with an out-of-range label, a
    non-finite gradient, or a gradient that raises when computed gets a zero row; under
    ``raise`` the error names neither the record nor its values. An empty ``data`` yields
    nothing (a Poisson round may sample no record)."""
    with (
        eval_mode(model),
        progress_bar(total=len(data), desc="private data", unit="ex", enabled=progress) as bar,
    ):
        if len(data) == 0:
            return
        for batch in batches(data, batch_size, "private data"):
            inputs, targets = on_model_device(model, *batch)
            with torch.no_grad():
                bad = label_errors(call_model(model, take_rows(inputs, slice(0, 1))), targets)
            safe_targets = torch.where(bad, torch.zeros_like(targets), targets)
            try:
                grads = projected_gradients(subspace, model, loss_fn, inputs, safe_targets)
            except Exception as error:
                if invalid is InvalidRecords.RAISE:
                    raise DataError(_STRICT_MESSAGE) from _without_message(error)
                grads = _one_by_one(subspace, model, loss_fn, inputs, safe_targets)
            bad |= ~torch.isfinite(grads).all(dim=1).to(bad.device)
            if bad.any():
                if invalid is InvalidRecords.RAISE:
                    raise DataError(_STRICT_MESSAGE)
                grads[bad.to(grads.device)] = 0.0
            yield grads
            bar.update(len(grads))


_STRICT_MESSAGE = (
    "a private record's gradient could not be computed (a label outside the model's outputs, or "
    "a loss or gradient that is not finite) and invalid_records='raise' was set. qem does not "
    "say which record: that would leak it. Check the data and the loss on public data, or use "
    "the default invalid_records='zero', under which such a record contributes nothing."
)


def _without_message(error: Exception) -> Exception:
    """The error's type only: its message may quote private values."""
    return type(error)("(message withheld: it may quote a private record)")


def projected_gradients(
    subspace: Subspace,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: torch.Tensor,
) -> torch.Tensor:
    """g_i = P^T grad loss(theta; z_i) of one batch as a float64 (B, k) CPU tensor."""
    grads = subspace.per_example_gradients(model, loss_fn, inputs, targets)
    return grads.detach().to("cpu", torch.float64)


def _one_by_one(
    subspace: Subspace,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Per-record fallback after a batch failed: a record that still fails gets a NaN row
    (zeroed by the caller)."""
    rows = []
    for j in range(batch_size_of(inputs)):
        try:
            one = take_rows(inputs, slice(j, j + 1))
            rows.append(projected_gradients(subspace, model, loss_fn, one, targets[j : j + 1]))
        except Exception:
            rows.append(torch.full((1, subspace.k), math.nan, dtype=torch.float64))
    return torch.cat(rows)


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
    invalid_records: InvalidRecords | str = InvalidRecords.ZERO,
    progress: bool = False,
    all_reduce: Reducer | None = None,
) -> GradientStatistics:
    """Stream over ``private_data`` and return the float64 sum of clipped subspace gradients.

    ``cholesky`` is the lower Cholesky factor L of A (A = L L^T), required for dual-norm
    clipping ||g||_{A^-1} = ||L^-1 g||_2. ``private_data`` may be empty (sum zero).
    ``all_reduce`` (qem.distributed) sums the local statistic, the k + 2 float64 values
    (sum_i uh_i, count, clipped count) of this process's rows, over the ranks of a process
    group before gh = L uh is formed, so that every rank multiplies the same sum by L.
    """
    clipping = ClipNorm(clipping)
    invalid = InvalidRecords(invalid_records)
    data = (
        private_data
        if isinstance(private_data, Dataset)
        else as_dataset(private_data, "private data", addressable=True)
    )

    def local() -> np.ndarray:
        whiten = whitening(cholesky, clipping)
        whitened_total = np.zeros(subspace.k, dtype=np.float64)
        count = clipped = 0
        for grads in private_gradient_batches(
            model,
            loss_fn,
            subspace,
            data,
            batch_size=batch_size,
            invalid=invalid,
            progress=progress,
        ):
            # Clipping u = L^-1 g in the Euclidean norm is clipping g in ||.||_{A^-1}: the
            # factor min(1, C/||u||) is the same, and gh = L uh.
            clipped_batch, n_clipped = clip_gradients(whiten(grads).numpy(), clip_norm, "euclidean")
            whitened_total += clipped_batch.sum(axis=0)
            count += len(grads)
            clipped += n_clipped
        return np.concatenate([whitened_total, [count, clipped]])

    totals = local() if all_reduce is None else all_reduce(local, subspace.k + 2)
    whitened_total, count, clipped = totals[:-2], int(totals[-2]), int(totals[-1])
    total = whitened_total if clipping is ClipNorm.EUCLIDEAN else cholesky @ whitened_total
    return GradientStatistics(gradient_sum=total, count=count, clipped_count=clipped)
