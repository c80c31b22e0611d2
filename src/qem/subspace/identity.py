"""The identity basis P = I_d: fine-tune every spanned parameter directly (k = d)."""

from __future__ import annotations

import torch
from torch import nn

from qem.parameters import Layers, select_parameters
from qem.subspace.base import Subspace


class Identity(Subspace):
    """P = I_d over ``parameter_names`` or the parameters of the modules ``layers`` chooses (all
    trainable parameters when both are None), so k = d.

    No randomness: the seed is None. ``project`` and ``lift`` return float64 copies of their
    input only when a cast or a device move is needed; otherwise the input itself.
    """

    kind = "identity"

    def __init__(
        self,
        model: nn.Module,
        parameter_names: list[str] | None = None,
        *,
        layers: Layers | None = None,
    ) -> None:
        d = sum(p.numel() for p in select_parameters(model, parameter_names, layers).values())
        super().__init__(model, d, parameter_names=parameter_names, seed=None, layers=layers)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g = g."""
        return self._vectors(g, self.d)

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """P w = w."""
        return self._vectors(w, self.k)
