"""The registry of layer types the per-example engine handles: one ``LayerType`` per module
class, registered with ``@register_layer(nn.Linear)`` (as Opacus' ``register_grad_sampler``).

A layer type says how one call of such a module factors its weight gradient over positions:
with W = [weight | bias] flattened to (out, in_features (+1)),

    grad_W loss_i = sum_t delta_{i,t} [a_{i,t}; 1]^T,

a_{i,t} (``inputs``) and delta_{i,t} (``backprops``) being the per-position input and output
backprop of example i (docs/theory.md §13). The Kronecker subspace projects both sides and
K-FAC sums their outer products; neither knows the layer types. A registered module has a
``weight`` whose first dimension is ``out`` and an optional ``bias`` of length ``out``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from qem.errors import UnsupportedModelError


class LayerType(ABC):
    """Per-position inputs and backprops of one module class (see the module docstring)."""

    def check(self, name: str, module: nn.Module) -> None:
        """Raise UnsupportedModelError for a configuration this type cannot factor (the
        default accepts every module of the type)."""
        return None

    @abstractmethod
    def inputs(self, module: nn.Module, activation: torch.Tensor) -> torch.Tensor:
        """a: (B, L, in_features), the input of each of the L positions (no bias column)."""

    @abstractmethod
    def backprops(self, module: nn.Module, backprop: torch.Tensor) -> torch.Tensor:
        """delta: (B, L, out), d loss / d output at each position, in the order of ``inputs``."""

    def projected_inputs(
        self, module: nn.Module, activation: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """a P_in: (B, L, k_in) for P_in (in_features, k_in); a type with a cheaper route than
        ``inputs`` then a product (Conv2d) overrides it."""
        return self.inputs(module, activation) @ basis

    def projected_backprops(
        self, module: nn.Module, backprop: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """delta P_out: (B, L, k_out) for P_out (out, k_out)."""
        return self.backprops(module, backprop) @ basis


_TYPES: dict[type[nn.Module], LayerType] = {}


def register_layer(*classes: type[nn.Module]) -> Callable[[type[LayerType]], type[LayerType]]:
    """Class decorator: register one instance of the LayerType for the module ``classes``."""

    def register(layer_type: type[LayerType]) -> type[LayerType]:
        for cls in classes:
            _TYPES[cls] = layer_type()
        return layer_type

    return register


def layer_type(module: nn.Module) -> LayerType | None:
    """The LayerType of ``module``'s class or of its nearest registered base class (a subclass
    of nn.Linear is a Linear), None when there is none."""
    for cls in type(module).__mro__:
        if cls in _TYPES:
            return _TYPES[cls]
    return None


def supported_names() -> str:
    """The registered module classes as text, e.g. "nn.Linear and nn.Conv2d"."""
    names = [f"nn.{cls.__name__}" for cls in _TYPES]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def check_layer(name: str, module: nn.Module) -> LayerType:
    """The module's LayerType after its own check; UnsupportedModelError when unregistered."""
    found = layer_type(module)
    if found is None:
        raise UnsupportedModelError(
            f"module {name!r} is a {type(module).__name__}; the per-example engine handles "
            f"{supported_names()} layers only."
        )
    found.check(name, module)
    return found
