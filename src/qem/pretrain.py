"""Non-private pretraining on public data, and a disk cache of pretrained weights (the
evaluation functions are in :mod:`qem.metrics`).

Pretraining minimises the mean per-example loss (1/n) sum_i loss(f(x_i; theta), y_i) with Adam
on PUBLIC data only; it has no privacy cost and must never see private data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import platformdirs
import torch
from torch import nn

from qem.data import DataLike, as_dataset, fingerprint
from qem.errors import DataError, InvalidParameterError, NonFiniteError
from qem.io import read_state_dict, state_dict_bytes, write_atomically
from qem.losses import LossFn, cross_entropy
from qem.metrics import model_batches
from qem.model_calls import call_model
from qem.progress import progress_bar

CACHE_DIR_VARIABLE = "QEM_CACHE_DIR"
"""The environment variable that, when set, names the default cache directory."""

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
    with progress_bar(total=steps, desc="pretrain", enabled=progress) as bar:
        for _ in range(epochs):
            for inputs, targets in model_batches(dataset, batch_size, model, generator):
                loss = loss_fn(call_model(model, inputs), targets).mean()
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


def cached_pretrain(
    cache_dir: str | Path | None,
    key: str,
    factory: Callable[[], nn.Module],
    train_data: DataLike,
    **pretrain_kwargs: Any,
) -> nn.Module:
    """``pretrain(factory(), train_data, **pretrain_kwargs)``, stored on disk and reused.

    The file name is ``<key>-<hash>.safetensors`` in ``cache_dir`` (None means
    :func:`default_cache_dir`), where the SHA-256 hash covers ``key``, the model's class and
    parameter shapes, the hyperparameters and the data (qem.data.fingerprint); so any change
    retrains. The file holds the state dict and the full hash (checked on reading; a file that
    does not match or cannot be read is retrained and replaced), is read without pickle, and is
    written atomically (:func:`qem.io.write_atomically`), so a crash never leaves a partial
    file. ``factory`` must build the same initial weights every time (seed it) for the cache to
    mean anything.
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
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    path = directory / f"{safe_key}-{digest[:16]}.safetensors"
    if path.is_file():
        try:
            state_dict, metadata = read_state_dict(path)
        except DataError:
            metadata = {}
        if metadata.get("digest") == digest:
            model.load_state_dict(state_dict)
            return model.eval()
    pretrain(model, train_data, **pretrain_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(path, state_dict_bytes(model.state_dict(), {"digest": digest}))
    return model


def pretrained_mnist_cnn(scenario: Any, cache_dir: str | Path | None = None) -> nn.Module:
    """The benchmarks' MNIST CNN (``build_model("cnn", seed=0)``) pretrained on
    ``scenario.public_train`` with :data:`MNIST_CNN_PRETRAIN`, through :func:`cached_pretrain`."""
    from qem.models import build_model

    return cached_pretrain(
        cache_dir,
        f"{scenario.name}-cnn",
        lambda: build_model("cnn", seed=0),
        scenario.public_train,
        progress=False,
        **MNIST_CNN_PRETRAIN,
    )


def default_cache_dir() -> Path:
    """The directory of :func:`cached_pretrain` when none is given: ``$QEM_CACHE_DIR`` when that
    variable is set, otherwise the user cache directory of "qem" (platformdirs; on Linux
    ``$XDG_CACHE_HOME/qem``, by default ``~/.cache/qem``)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("qem"))


def _describe(value: object) -> str:
    """A run-independent description of a hyperparameter JSON cannot encode (a loss function)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)
