"""Shared synthetic tasks for the tests (after curvlinops' test/cases.py): small float64 models
and data, so that tests compare qem with dense references and with each other in float64.

``make_task``/``make_model``/``make_linear``: three Gaussian blobs (6 dimensions by default), a
6-8-3 tanh MLP and a 6-3 linear model; ``make_images``/``make_cnn``: 1 x 6 x 6 images of three
classes and a Conv2d + Linear network (both layer types the Kronecker subspace and K-FAC span).
``blob_task``/``image_task`` bundle a model with its public, private and validation data, and
``run`` fine-tunes a task with the common arguments a test file gives it (``with_options``), so
that each test states only what it varies. Every builder is seeded, so two calls with the same
arguments give the same tensors on any machine. A model built to make one test's point (a
BatchNorm, keyword arguments, a branch) stays in that test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qem.finetune import FineTuneResult, fine_tune
from qem.losses import cross_entropy

loss_fn = cross_entropy


def make_task(
    n: int, seed: int, shift: float = 0.0, *, dim: int = 6, separation: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in ``dim`` dimensions, centred at ``separation`` times the first
    three unit vectors (float64 inputs, int64 labels); ``shift`` moves the inputs (private data
    unlike the public data)."""
    g = torch.Generator().manual_seed(seed)
    centers = separation * torch.eye(3, dim)
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g) + shift
    return x.double(), y


def make_model(seed: int = 0) -> nn.Module:
    """A 6-8-3 tanh MLP in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_linear(seed: int = 0) -> nn.Module:
    """A 6-3 linear model (softmax regression) in float64."""
    torch.manual_seed(seed)
    return nn.Linear(6, 3).double()


def blob_task(
    seed: int = 0,
    *,
    sizes: tuple[int, int, int] = (200, 400, 200),
    shift: float = 0.8,
    model: Callable[[int], nn.Module] = make_model,
) -> dict:
    """Model (``model(seed)``), public, private and validation data of the blob task, of the
    given ``sizes``; the private and validation data shifted by ``shift``."""
    public, private, validation = sizes
    return {
        "model": model(seed),
        "public": make_task(public, 1),
        "private": make_task(private, 2, shift=shift),
        "validation": make_task(validation, 3, shift=shift),
    }


def make_images(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 6, 6) float64 images of three classes (a bright row per class plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64) + shift
    x[torch.arange(n), 0, 2 * y] += 1.5
    return x, y


def make_cnn(seed: int = 0) -> nn.Module:
    """Conv2d(1, 3, 3) -> tanh -> flatten -> Linear(48, 3), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def image_task(seed: int = 0) -> dict:
    """Model, public, private and validation data of the image task."""
    return {
        "model": make_cnn(seed),
        "public": make_images(150, 11),
        "private": make_images(240, 12, shift=0.3),
        "validation": make_images(120, 13, shift=0.3),
    }


def with_options(task: dict, **options) -> dict:
    """The task with ``options`` added to the fine_tune arguments ``run`` gives it."""
    return {**task, "options": {**task.get("options", {}), **options}}


def run(task: dict, **options) -> FineTuneResult:
    """fine_tune of the task's model on its public and private data, with its validation data
    and its options (``with_options``), then ``options``: fine_tune's keywords, or ``model=``,
    ``public=``, ``private=``, ``loss_fn=`` in place of the task's (``validation_data=None``:
    the held-out public split)."""
    options = {"validation_data": task["validation"], **task.get("options", {}), **options}
    model, loss, public, private = (
        options.pop(key, default)
        for key, default in (
            ("model", task["model"]),
            ("loss_fn", loss_fn),
            ("public", task["public"]),
            ("private", task["private"]),
        )
    )
    return fine_tune(model, loss, public, private, **options)
