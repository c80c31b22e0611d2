"""Evaluation of a model on a dataset: outputs, accuracy, mean loss and AUROC.

Evaluation runs in eval mode under ``torch.no_grad`` and never changes the model. Which data
it may read is the caller's business: the line search and the tuning of the experiments score
PUBLIC validation data only (docs/theory.md §9); test sets are scored once, after the release.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from qem.data import Batch, DataLike, as_dataset, batches, map_inputs
from qem.errors import DataError, InvalidParameterError, NonFiniteError
from qem.losses import LossFn
from qem.model_calls import call_model, on_model_device


def model_batches(
    data: DataLike,
    batch_size: int,
    model: nn.Module,
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """qem.data.batches (shuffled when ``generator`` is given) on the model's device, floating
    inputs (every floating entry of dict inputs) cast to the model's dtype."""
    dtype = next(model.parameters()).dtype

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    for batch in batches(data, batch_size, generator=generator):
        inputs, targets = on_model_device(model, *batch)
        yield map_inputs(cast, inputs), targets


@torch.no_grad()
def predict(
    model: nn.Module, data: DataLike, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs and targets over ``data``, in order, on the CPU, in eval mode (mode
    restored after)."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for inputs, batch_targets in model_batches(as_dataset(data), batch_size, model):
            outputs.append(call_model(model, inputs).cpu())
            targets.append(batch_targets.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)


def evaluate_accuracy(model: nn.Module, data: DataLike, batch_size: int = 1000) -> float:
    """Fraction of examples whose arg-max output equals the integer target."""
    outputs, targets = predict(model, data, batch_size)
    return (outputs.argmax(dim=1) == targets).double().mean().item()


def example_losses(
    model: nn.Module, loss_fn: LossFn, data: DataLike, batch_size: int = 1000
) -> torch.Tensor:
    """The per-example losses loss_fn(f(x_i), y_i) over ``data``, in order, float64 (n,)."""
    outputs, targets = predict(model, data, batch_size)
    return loss_fn(outputs, targets).double()


def evaluate_loss(
    model: nn.Module, loss_fn: LossFn, data: DataLike, batch_size: int = 1000
) -> float:
    """Mean per-example loss (1/n) sum_i loss_fn(f(x_i), y_i), accumulated in float64."""
    return example_losses(model, loss_fn, data, batch_size).mean().item()


def evaluate_auroc(model: nn.Module, data: DataLike, batch_size: int = 1000) -> float:
    """AUROC of a two-class model, scoring each example by the logit margin f_1(x) - f_0(x)."""
    outputs, targets = predict(model, data, batch_size)
    if outputs.ndim != 2 or outputs.shape[1] != 2:
        raise DataError(f"AUROC needs two output logits per example, got {tuple(outputs.shape)}.")
    return auroc(outputs[:, 1] - outputs[:, 0], targets)


def evaluate_metric(model: nn.Module, data: DataLike, metric: str) -> float:
    """``metric`` ("accuracy" or "auroc", as named by a Scenario) of ``model`` on ``data``."""
    metrics = {"accuracy": evaluate_accuracy, "auroc": evaluate_auroc}
    if metric not in metrics:
        raise InvalidParameterError(f"unknown metric {metric!r}; choose one of {sorted(metrics)}.")
    return metrics[metric](model, data)


def auroc(scores: torch.Tensor | ArrayLike, labels: torch.Tensor | ArrayLike) -> float:
    """Area under the ROC curve, P(s_pos > s_neg) + P(s_pos = s_neg) / 2 over all
    positive-negative pairs (the Mann-Whitney U statistic over n_pos n_neg), computed by
    ``sklearn.metrics.roc_auc_score`` after qem's checks: finite scores, 0/1 labels, both
    classes present."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise DataError(f"auroc: {s.size} scores but {y.size} labels.")
    if not np.isfinite(s).all():
        raise NonFiniteError("auroc: scores hold NaN or infinity.")
    if not np.isin(y, (0, 1)).all():
        raise DataError("auroc: labels must be 0 or 1.")
    n_pos = int((y == 1).sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"auroc needs both classes; got {n_pos} positives and {n_neg} negatives.")
    # imported here: scikit-learn takes about a second to import (and loads pandas if present)
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.astype(np.int64), s))
