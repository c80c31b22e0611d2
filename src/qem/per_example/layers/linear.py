"""nn.Linear on inputs (B, ..., in): every middle index is a position, a_{i,t} = x_{i,t}."""

from __future__ import annotations

import torch
from torch import nn

from qem.errors import UnsupportedModelError
from qem.per_example.layers.registry import LayerType, register_layer


@register_layer(nn.Linear)
class Linear(LayerType):
    """(B, ..., in) inputs and (B, ..., out) backprops as (B, L, in) and (B, L, out)."""

    def inputs(self, module: nn.Module, activation: torch.Tensor) -> torch.Tensor:
        if activation.dim() < 2:
            raise UnsupportedModelError(
                f"Linear input of shape {tuple(activation.shape)}: per-example gradients need "
                "a batch dimension."
            )
        return activation.reshape(activation.shape[0], -1, activation.shape[-1])

    def backprops(self, module: nn.Module, backprop: torch.Tensor) -> torch.Tensor:
        return backprop.reshape(backprop.shape[0], -1, backprop.shape[-1])
