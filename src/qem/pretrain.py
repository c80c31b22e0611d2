"""Non-private pretraining on public data, evaluation metrics, and a disk cache of pretrained
weights.

Pretraining minimises the mean per-example loss (1/n) sum_i loss(f(x_i; theta), y_i) with Adam
on PUBLIC data only; it has no privacy cost and must never see private data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from qem.data import DataLike, as_dataset, batches, fingerprint
from qem.errors import DataError, InvalidParameterError, NonFiniteError
from qem.losses import cross_entropy
from qem.subspace.base import LossFn

DEFAULT_CACHE_DIR = ".qem_cache"

MNIST_CNN_PRETRAIN = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "seed": 0}
"""The recipe (``pretrain`` keyword arguments) with which the demo and the benchmarks pretrain
the MNIST CNN on a scenario's public images: public data, so no privacy cost."""


def pretrain(
    model: nn.Module,
    train_data: DataLike,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int,
    weight_decay: float = 0.0,
    loss_fn: LossFn = cross_entropy,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with Adam on shuffled mini-batches (order from ``seed``) for
    ``epochs`` passes over the public ``train_data``; returns the model in eval mode."""
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise InvalidParameterError(
            f"pretrain needs epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; got "
            f"epochs={epochs}, batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}."
        )
    dataset = as_dataset(train_data, "pretraining data")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(dataset) // batch_size)
    model.train()
    with tqdm(total=steps, desc="pretrain", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            for inputs, targets in _batches(dataset, batch_size, model, generator):
                loss = loss_fn(model(inputs), targets).mean()
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"pretraining loss became {loss.item()}; lower lr (now {lr})."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module, data: DataLike, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs and targets over ``data``, in order, in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for inputs, batch_targets in _batches(as_dataset(data), batch_size, model):
            outputs.append(model(inputs))
            targets.append(batch_targets)
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)


def evaluate_accuracy(model: nn.Module, data: DataLike, batch_size: int = 1000) -> float:
    """Fraction of examples whose arg-max output equals the integer target."""
    outputs, targets = predict(model, data, batch_size)
    return (outputs.argmax(dim=1) == targets).double().mean().item()


def evaluate_loss(
    model: nn.Module, loss_fn: LossFn, data: DataLike, batch_size: int = 1000
) -> float:
    """Mean per-example loss (1/n) sum_i loss_fn(f(x_i), y_i), accumulated in float64."""
    outputs, targets = predict(model, data, batch_size)
    return loss_fn(outputs, targets).double().mean().item()


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


def auroc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney U) formula:

        AUROC = (sum of ranks of positives - n_pos (n_pos + 1) / 2) / (n_pos n_neg),

    ranks 1..n of the scores with ties given their average rank, which equals
    P(s_pos > s_neg) + P(s_pos = s_neg) / 2 over all positive-negative pairs.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise DataError(f"auroc: {s.size} scores but {y.size} labels.")
    if not np.isfinite(s).all():
        raise NonFiniteError("auroc: scores hold NaN or infinity.")
    if not np.isin(y, (0, 1)).all():
        raise DataError("auroc: labels must be 0 or 1.")
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"auroc needs both classes; got {n_pos} positives and {n_neg} negatives.")
    ranks = rankdata(s, method="average")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cached_pretrain(
    cache_dir: str | Path | None,
    key: str,
    factory: Callable[[], nn.Module],
    train_data: DataLike,
    **pretrain_kwargs: Any,
) -> nn.Module:
    """``pretrain(factory(), train_data, **pretrain_kwargs)``, stored on disk and reused.

    The file name is ``<key>-<hash>.pt`` in ``cache_dir`` (default ``.qem_cache/`` in the
    current directory), where the SHA-256 hash covers ``key``, the model's class and parameter
    shapes, the hyperparameters and the data (qem.data.fingerprint); so any change
    retrains. The state dict is written to a temporary file and moved into place with
    ``os.replace``, so a crash never leaves a partial file. ``factory`` must build the same
    initial weights every time (seed it) for the cache to mean anything.
    """
    model = factory()
    config = {
        "key": key,
        "model": type(model).__qualname__,
        "shapes": {name: list(t.shape) for name, t in model.state_dict().items()},
        "dtype": str(next(model.parameters()).dtype),
        "pretrain": {k: v for k, v in sorted(pretrain_kwargs.items()) if k != "progress"},
        "data": fingerprint(train_data),
    }
    text = json.dumps(config, sort_keys=True, default=_describe)
    digest = hashlib.sha256(text.encode()).hexdigest()
    directory = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    path = directory / f"{safe_key}-{digest[:16]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("digest") == digest:
            model.load_state_dict(stored["state_dict"])
            return model.eval()
    pretrain(model, train_data, **pretrain_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{safe_key}-", suffix=".tmp")
    os.close(handle)
    try:
        torch.save({"digest": digest, "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return model


def _describe(value: object) -> str:
    """A run-independent description of a hyperparameter JSON cannot encode (a loss function)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def _batches(
    dataset: Any,
    batch_size: int,
    model: nn.Module,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """qem.data.batches (shuffled when ``generator`` is given), floating inputs cast to the
    model's dtype."""
    dtype = next(model.parameters()).dtype
    for inputs, targets in batches(dataset, batch_size, generator=generator):
        yield (inputs.to(dtype) if inputs.is_floating_point() else inputs), targets
