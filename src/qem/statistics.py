"""The private pass (docs/theory.md §0-§2: S_D): one streaming pass over the private data that
returns the sufficient statistic of the mechanism,

    sum_i gh_i,   gh_i = g_i min(1, C / ||g_i||),   g_i = P^T grad_theta loss(theta; z_i),

in float64, together with the count. Per-example gradients come from the subspace (torch.func
vmap over grad, or the Kronecker shortcut), batch by batch: memory is O(batch x k), never n x d.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from qem.data import DataLike, Inputs, as_dataset, batch_size_of, batches, take_rows
from qem.errors import DataError, InvalidParameterError
from qem.labels import label_errors
from qem.losses import LossFn
from qem.mechanism.clipping import clip_gradients
from qem.model_calls import call_model, eval_mode, on_model_device
from qem.privacy.sensitivity import ClipNorm
from qem.progress import progress_bar
from qem.subspace.base import Subspace


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
    """Result of the private pass. Every field is a private value: never put it in a privacy
    report (the counts may be shown to the person running qem, who holds the data)."""

    gradient_sum: np.ndarray
    count: int
    clipped_count: int
    invalid_count: int


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
) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield (g, invalid count) per batch of PRIVATE data (g float64 (B, k)), model in eval
    mode, with the invalid-record policy applied: under ``zero`` a record with an out-of-range
    label, a non-finite gradient, or a gradient that raises when computed gets a zero row;
    under ``raise`` the error names neither the record nor its values. An empty ``data`` yields
    nothing (a Poisson round may sample no record).

    Timing (docs/theory.md, sharp edges): every batch takes the same path whatever its records
    hold: the gradients of all rows are computed, then the invalid rows are masked to zero by
    one ``torch.where`` (no branch on the mask), and subnormal floats are flushed to zero during
    the pass (arithmetic on them is slow on x86). Only a batch whose computation raises falls
    back to one record at a time, which is slower and visible."""
    with (
        eval_mode(model),
        _flushed_denormals(),
        progress_bar(total=len(data), desc="private data", unit="ex", enabled=progress) as bar,
    ):
        if len(data) == 0:
            return
        gradients = functools.partial(projected_gradients, subspace, model, loss_fn)
        for batch in batches(data, batch_size, "private data"):
            inputs, targets = on_model_device(model, *batch)
            with torch.no_grad():
                bad = label_errors(call_model(model, take_rows(inputs, slice(0, 1))), targets)
            safe_targets = torch.where(bad, torch.zeros_like(targets), targets)
            try:
                grads = gradients(inputs, safe_targets)
            except Exception as error:
                if invalid is InvalidRecords.RAISE:
                    raise DataError(_STRICT_MESSAGE) from _without_message(error)
                grads = _one_by_one(gradients, subspace.k, inputs, safe_targets)
            bad = bad.to(grads.device) | ~torch.isfinite(grads).all(dim=1)
            if invalid is InvalidRecords.RAISE and bad.any():
                raise DataError(_STRICT_MESSAGE)
            grads = torch.where(bad.unsqueeze(1), torch.zeros((), dtype=grads.dtype), grads)
            yield grads, int(bad.sum())
            bar.update(len(grads))


@contextlib.contextmanager
def _flushed_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero for the duration (where the CPU supports it), restoring
    the previous setting afterwards."""
    smallest = torch.tensor([5e-324], dtype=torch.float64)
    previous = bool((smallest * 1.0)[0] == 0.0)  # already flushed (torch has no getter)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


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
    gradients: Callable[[Inputs, torch.Tensor], torch.Tensor],
    k: int,
    inputs: Inputs,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Per-record fallback after a batch failed: ``gradients`` (the batch's projected gradients,
    (B, k)) record by record; a record that still fails gets a NaN row (zeroed by the caller)."""
    rows = []
    for j in range(batch_size_of(inputs)):
        try:
            rows.append(gradients(take_rows(inputs, slice(j, j + 1)), targets[j : j + 1]))
        except Exception:
            rows.append(torch.full((1, k), math.nan, dtype=torch.float64))
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
    ``all_reduce`` (qem.distributed) sums the local statistic, the k + 3 float64 values
    (sum_i uh_i, count, clipped count, invalid count) of this process's rows, over the ranks of
    a process group before gh = L uh is formed, so that every rank multiplies the same sum by L.
    """
    clipping = ClipNorm(clipping)
    policy = InvalidRecords(invalid_records)
    data = (
        private_data
        if isinstance(private_data, Dataset)
        else as_dataset(private_data, "private data", addressable=True)
    )

    def local() -> np.ndarray:
        whiten = whitening(cholesky, clipping)
        whitened_total = np.zeros(subspace.k, dtype=np.float64)
        count = clipped = invalid = 0
        for grads, n_invalid in private_gradient_batches(
            model,
            loss_fn,
            subspace,
            data,
            batch_size=batch_size,
            invalid=policy,
            progress=progress,
        ):
            # Clipping u = L^-1 g in the Euclidean norm is clipping g in ||.||_{A^-1}: the
            # factor min(1, C/||u||) is the same, and gh = L uh.
            clipped_batch, n_clipped = clip_gradients(whiten(grads).numpy(), clip_norm, "euclidean")
            whitened_total += clipped_batch.sum(axis=0)
            count += len(grads)
            clipped += n_clipped
            invalid += n_invalid
        return np.concatenate([whitened_total, [count, clipped, invalid]])

    totals = local() if all_reduce is None else all_reduce(local, subspace.k + 3)
    whitened_total, (count, clipped, invalid) = totals[:-3], totals[-3:].astype(int)
    total = whitened_total if clipping is ClipNorm.EUCLIDEAN else cholesky @ whitened_total
    return GradientStatistics(
        gradient_sum=total, count=int(count), clipped_count=int(clipped), invalid_count=int(invalid)
    )
