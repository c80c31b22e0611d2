"""Shared synthetic tasks for the tests (after curvlinops' test/cases.py): small float64 models
and data, so that tests compare qem with dense references and with each other in float64.

``make_task``/``make_model``: three Gaussian blobs in 6 dimensions and a 6-8-3 tanh MLP;
``make_images``/``make_cnn``: 1 x 6 x 6 images of three classes and a Conv2d + Linear network
(both layer types the Kronecker subspace and K-FAC span). Every builder is seeded, so two calls
with the same arguments give the same tensors on any machine.
"""

from __future__ import annotations

import torch
from torch import nn

from qem.losses import cross_entropy

loss_fn = cross_entropy


def make_task(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 6 dimensions (float64 inputs, int64 labels); ``shift`` moves the
    inputs (private data unlike the public data)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 6, generator=g) + shift
    return x.double(), y


def make_model(seed: int = 0) -> nn.Module:
    """A 6-8-3 tanh MLP in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def blob_task(seed: int = 0) -> dict:
    """Model, public, private and validation data of the blob task (the private and validation
    data shifted by 0.8)."""
    return {
        "model": make_model(seed),
        "public": make_task(200, 1),
        "private": make_task(400, 2, shift=0.8),
        "validation": make_task(200, 3, shift=0.8),
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
