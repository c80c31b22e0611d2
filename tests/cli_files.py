"""Files for the command-line tests: a module with a model factory and NPZ files of three
Gaussian blobs in 4 dimensions (float32 inputs, int64 labels), seeded."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

TINY_FACTORY = textwrap.dedent("""
    import torch

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
""")
"""A module source whose ``build()`` is a seeded 4-6-3 tanh MLP."""


def write_blobs(directory: Path, sizes: dict[str, int]) -> dict[str, tuple[torch.Tensor, ...]]:
    """``directory/<name>.npz`` with arrays x (n, 4) and y (n,) for every name and size, drawn in
    order from one generator; returns the same data as tensors."""
    rng = np.random.default_rng(0)
    written = {}
    for name, n in sizes.items():
        y = rng.integers(0, 3, n)
        x = (rng.normal(size=(n, 4)) + 2 * np.eye(4)[y]).astype(np.float32)
        np.savez(directory / f"{name}.npz", x=x, y=y)
        written[name] = (torch.from_numpy(x), torch.from_numpy(y))
    return written
