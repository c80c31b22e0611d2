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
from tqdm.auto import tqdm

from qem.curvature.base import eval_mode
from qem.data import DataLike, Inputs, as_dataset, batch_size_of, batches, take_rows
from qem.errors import DataError, InvalidParameterError, NonFiniteError
from qem.mechanism.clipping import clip_gradients
from qem.model_calls import call_model, on_model_device
from qem.privacy.sensitivity import ClipNorm
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
    with eval_mode(model), _bar(len(dataset), name, progress) as bar:
        offset = 0
        for batch in batches(dataset, batch_size, name):
            inputs, targets = on_model_device(model, *batch)
            with torch.no_grad():
                check_targets(call_model(model, take_rows(inputs, slice(0, 1))), targets, offset)
            grads = _projected(subspace, model, loss_fn, inputs, targets)
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
    with eval_mode(model), _bar(len(data), "private data", progress) as bar:
        if len(data) == 0:
            return
        for batch in batches(data, batch_size, "private data"):
            inputs, targets = on_model_device(model, *batch)
            with torch.no_grad():
                bad = label_errors(call_model(model, take_rows(inputs, slice(0, 1))), targets)
            safe_targets = torch.where(bad, torch.zeros_like(targets), targets)
            try:
                grads = _projected(subspace, model, loss_fn, inputs, safe_targets)
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


def _projected(
    subspace: Subspace,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: torch.Tensor,
) -> torch.Tensor:
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
            rows.append(_projected(subspace, model, loss_fn, one, targets[j : j + 1]))
        except Exception:
            rows.append(torch.full((1, subspace.k), math.nan, dtype=torch.float64))
    return torch.cat(rows)


def _bar(total: int, name: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=name, unit="ex", disable=not progress, leave=False)


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
    batches_of_gradients = public_gradient_batches(
        model, loss_fn, subspace, public_data, batch_size=batch_size, progress=progress
    )
    values = torch.cat(
        [torch.linalg.vector_norm(whiten(grads), dim=1) for _, grads in batches_of_gradients]
    ).numpy()
    if not np.any(values > 0):
        raise DataError("public per-example gradients are all zero: pass clip_norm.")
    return float(np.quantile(values, quantile))
