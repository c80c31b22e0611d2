"""``check_data``: the data curator's pre-flight check of private records (docs/theory.md §12).

A private record whose gradient cannot be computed contributes zero to a release (the default
``invalid_records='zero'``), and the run only says how many there were. The person running qem
holds the data and may see more than any release may: this check lists every such record by
index and reason, on a copy of the model in eval mode, and releases nothing. Run it on the data
before fine-tuning, fix the pipeline, and only then spend the budget. Its output describes
private records: it is for the curator's eyes, never for publication.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from qem.data import DataLike, as_dataset, batches, input_entries, take_rows
from qem.labels import label_errors
from qem.losses import LossFn
from qem.model_calls import call_model, on_model_device
from qem.subspace.factory import make_subspace


@dataclass(frozen=True)
class InvalidRecord:
    """One private record the private pass would zero, and why."""

    index: int
    reason: str


def check_data(
    model: nn.Module, loss_fn: LossFn, data: DataLike, *, batch_size: int = 256
) -> list[InvalidRecord]:
    """Every record of ``data`` that qem's private pass would treat as invalid, with the first
    reason that applies: non-finite inputs, a label outside the model's outputs, a loss or
    gradient that raises (the error's message is shown: it is your data), a loss that is not
    finite, or a gradient that is not finite. The gradient is checked through a one-dimensional
    random projection of the trainable parameters' gradient (a non-finite gradient has a
    non-finite projection), so the check costs about one backward pass per batch."""
    dataset = as_dataset(data, "data", addressable=True)
    probe = copy.deepcopy(model).eval()
    direction = make_subspace("dense", probe, k=1, seed=0)
    found: list[InvalidRecord] = []
    offset = 0
    for batch in batches(dataset, batch_size, "data"):
        inputs, targets = on_model_device(probe, *batch)
        try:
            reasons = _batch_reasons(probe, loss_fn, direction, inputs, targets)
        except Exception:  # some record makes the batch raise: find it one record at a time
            reasons = [
                _record_reason(probe, loss_fn, direction, inputs, targets, row)
                for row in range(len(targets))
            ]
        found += [InvalidRecord(offset + row, r) for row, r in enumerate(reasons) if r]
        offset += len(targets)
    return found


def _batch_reasons(model, loss_fn, direction, inputs, targets) -> list[str | None]:
    """Why each record of a batch is invalid (None: valid); raises if the batch does."""
    rows = len(targets)
    bad_inputs = torch.zeros(rows, dtype=torch.bool, device=targets.device)
    for _, tensor in input_entries(inputs):
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor.reshape(rows, -1)).all(dim=1)
            bad_inputs |= ~finite.to(bad_inputs.device)
    with torch.no_grad():
        outputs = call_model(model, inputs)
        bad_labels = label_errors(outputs, targets)
        safe = torch.where(bad_labels, torch.zeros_like(targets), targets)
        losses = loss_fn(outputs, safe).double()
    gradients = direction.per_example_gradients(model, loss_fn, inputs, safe)
    reasons: list[str | None] = []
    for row in range(rows):
        if bad_inputs[row]:
            reasons.append("an input holds NaN or infinity")
        elif bad_labels[row]:
            reasons.append(
                f"label {targets[row].item()} lies outside the model's {outputs.shape[1]} outputs"
            )
        elif not math.isfinite(float(losses[row])):
            reasons.append(f"the loss is {float(losses[row])}")
        elif not torch.isfinite(gradients[row]).all():
            reasons.append("the gradient holds NaN or infinity")
        else:
            reasons.append(None)
    return reasons


def _record_reason(model, loss_fn, direction, inputs, targets, row: int) -> str | None:
    """Why record ``row`` of a batch is invalid (None: valid), with the message of an error
    it raises."""
    one = slice(row, row + 1)
    try:
        return _batch_reasons(model, loss_fn, direction, take_rows(inputs, one), targets[one])[0]
    except Exception as error:
        return f"the loss or its gradient raises {type(error).__name__}: {error}"
