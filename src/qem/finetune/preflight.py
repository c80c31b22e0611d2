"""Everything a run can check without a release, checked before the first draw (docs/theory.md
§12, "fail before spending"), on qem's eval-mode copy of the model:

* public and validation data (public: an error may name the example): one forward pass, labels
  inside the model's outputs, a per-example loss, and a finite loss over the whole validation
  split at theta0 (a NaN there would make every step length 0 for the full cost);
* the private data's STRUCTURE only: its first rows' per-example shapes and dtypes against the
  public data's, and one forward pass and loss on them, with out-of-range labels replaced first,
  so that whether the run starts depends on the data's schema (public by convention) and never
  on a private value; errors name shapes and dtypes, never a value or a message that could
  quote one. A private record with bad values is the invalid-record policy's (qem.statistics).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from qem.data import batches, input_entries, known_targets
from qem.errors import DataError, ShapeError
from qem.finetune.inputs import RunData
from qem.labels import check_targets, label_errors
from qem.losses import LossFn, check_per_example_loss
from qem.metrics import evaluate_loss
from qem.model_calls import call_model, on_model_device

PROBE_ROWS = 2
"""Rows of each data set the structural checks read."""


def preflight(model: nn.Module, loss_fn: LossFn, data: RunData) -> None:
    """Raise a qem error for anything checkable without a release (module docstring)."""
    with torch.no_grad():
        public_x, public_y = _first_rows(data.public)
        outputs = _public_forward(model, public_x, public_y, "public data")
        for part in (data.public, data.validation, data.confirmation):
            targets = None if part is None else known_targets(part)
            if targets is not None:
                check_targets(outputs, targets)
        _check_loss(loss_fn, outputs, public_y, "public data")
        for part in (data.validation, data.confirmation):
            if part is not None:
                _check_validation(model, loss_fn, part, public_x, public_y)
        _check_private_structure(model, loss_fn, data.private, public_x, public_y)


def _first_rows(dataset: Dataset) -> tuple:
    inputs, targets = next(iter(batches(dataset, PROBE_ROWS)))
    return inputs, targets


def _public_forward(model: nn.Module, x, y: torch.Tensor, name: str) -> torch.Tensor:
    """The model's outputs on PUBLIC rows; its error, if any, as one line naming the data."""
    try:
        return call_model(model, on_model_device(model, x, y)[0])
    except Exception as error:
        raise DataError(
            f"the model fails on the {name} (examples of {_describe(_structure(x, y))}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _check_loss(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    """The loss gives one value per example of PUBLIC rows; its error as one line."""
    try:
        check_per_example_loss(loss_fn, outputs, targets)
    except ShapeError:
        raise
    except Exception as error:
        raise ShapeError(
            f"the loss fails on the {name}'s targets of shape {tuple(targets.shape)} "
            f"({str(targets.dtype).removeprefix('torch.')}) against the model's outputs of shape "
            f"{tuple(outputs.shape)}: {type(error).__name__}: {error}. Classification targets "
            "are integer labels of shape (n,)."
        ) from error


def _structure(inputs, targets: torch.Tensor) -> dict[str, tuple]:
    """Per-example shape and dtype of every input entry and of the targets."""
    entries = {key: (tuple(t.shape[1:]), t.dtype) for key, t in input_entries(inputs)}
    return {**entries, "targets": (tuple(targets.shape[1:]), targets.dtype)}


def _kinds(structure: dict[str, tuple]) -> dict[str, tuple]:
    """What two data sets of one form share: each input's dtype and number of dimensions (its
    sizes may differ: texts padded to other lengths), the targets' shape and dtype."""
    return {
        key: (shape if key == "targets" else len(shape), dtype)
        for key, (shape, dtype) in structure.items()
    }


def _describe(structure: dict[str, tuple]) -> str:
    return ", ".join(
        f"{key or 'inputs'} {('(n, ' + ', '.join(map(str, shape)) + ')') if shape else '(n,)'} "
        f"{str(dtype).removeprefix('torch.')}"
        for key, (shape, dtype) in structure.items()
    )


def _check_validation(
    model: nn.Module, loss_fn: LossFn, validation: Dataset, public_x, public_y
) -> None:
    """Validation data (public) has the public data's structure and a finite loss at theta0."""
    x, y = _first_rows(validation)
    _public_forward(model, x, y, "validation data")
    expected, found = _structure(public_x, public_y), _structure(x, y)
    if _kinds(found) != _kinds(expected):
        raise ShapeError(
            f"the validation data has examples of {_describe(found)}, but the public data "
            f"{_describe(expected)}: give validation data of the same form."
        )
    loss = evaluate_loss(model, loss_fn, validation)
    if not math.isfinite(loss):
        raise DataError(
            f"the loss of the model on the validation data is {loss} (NaN or infinity) before "
            "any step: the line search could never accept a step, and every round's budget "
            "would be spent for nothing. Check the validation data for NaN or infinite values."
        )


def _check_private_structure(
    model: nn.Module, loss_fn: LossFn, private: Dataset, public_x, public_y
) -> None:
    """The private data's first rows have the public data's per-example shapes and dtypes, and
    the model and the loss run on them (labels outside the outputs replaced by 0 first)."""
    if len(private) == 0:
        return
    x, y = _first_rows(private)
    expected, found = _structure(public_x, public_y), _structure(x, y)
    if _kinds(found) != _kinds(expected):
        raise ShapeError(
            f"the private data has examples of {_describe(found)}, but the public data "
            f"{_describe(expected)}: the private data must have the public data's form (the "
            "curvature and the clip norm are computed on the public data)."
        )
    x, y = on_model_device(model, x, y)
    try:
        outputs = call_model(model, x)
        safe = torch.where(label_errors(outputs, y), torch.zeros_like(y), y)
        losses = loss_fn(outputs, safe)
    except Exception as error:
        raise DataError(
            f"the model or the loss fails on private examples of {_describe(found)} "
            f"({type(error).__name__}; its message is withheld: it may quote a private value). "
            "The public data of the same form works: check how the private data was prepared."
        ) from None
    if tuple(losses.shape) != (len(y),):
        raise ShapeError(
            f"the loss returned shape {tuple(losses.shape)} for {len(y)} private examples of "
            f"{_describe(found)}; qem needs one loss per example."
        )
