"""Shared synthetic tasks for the tests (after curvlinops' test/cases.py): small float64 models
and data, so that tests compare qem with dense references and with each other in float64.

``make_task``/``make_model``/``make_linear``: three Gaussian blobs (6 dimensions by default), a
6-8-3 tanh MLP and a 6-3 linear model; ``make_images``/``make_cnn``: 1 x 6 x 6 images of three
classes and a Conv2d + Linear network (both layer types the Kronecker subspace and K-FAC span).
``blob_task``/``image_task`` bundle a model with its public, private and validation data, and
``run`` fine-tunes a task with the common arguments a test file gives it (``with_options``), so
that each test states only what it varies. A model built to make one test's point (a
BatchNorm, keyword arguments, a branch) stays in that test.

Every builder is seeded, and every number comes from numpy's PCG64 in float64
(``numpy.random.default_rng``), never from torch's samplers: torch's float32 ``randn`` and its
``nn.Linear`` initialisation run vectorised kernels whose rounding depends on the CPU
(ATEN_CPU_CAPABILITY=default gave inputs 1.3e-6 and weights 3e-8 away from the AVX-512 ones),
which moved the golden releases by 1e-7 relative. numpy's float64 draws are the same on any
machine up to the last bit of its libm calls, so two calls with the same arguments give the same
tensors on any machine to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
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
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = separation * np.eye(3, dim)[y] + rng.standard_normal((n, dim)) + shift
    return torch.from_numpy(x), torch.from_numpy(y)


def initialise(model: nn.Module, seed: int) -> nn.Module:
    """float64 parameters drawn from numpy: torch's default bound for Linear and Conv2d,
    Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases alike."""
    rng = np.random.default_rng(seed)
    model = model.double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for parameter in (module.weight, module.bias):
                    values = rng.uniform(-bound, bound, tuple(parameter.shape))
                    parameter.copy_(torch.from_numpy(values))
    return model


def make_model(seed: int = 0) -> nn.Module:
    """A 6-8-3 tanh MLP in float64."""
    return initialise(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), seed)


def make_linear(seed: int = 0) -> nn.Module:
    """A 6-3 linear model (softmax regression) in float64."""
    return initialise(nn.Linear(6, 3), seed)


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
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = 0.5 * rng.standard_normal((n, 1, 6, 6)) + shift
    x[np.arange(n), 0, 2 * y] += 1.5
    return torch.from_numpy(x), torch.from_numpy(y)


def make_cnn(seed: int = 0) -> nn.Module:
    """Conv2d(1, 3, 3) -> tanh -> flatten -> Linear(48, 3), float64."""
    return initialise(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), seed
    )


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
