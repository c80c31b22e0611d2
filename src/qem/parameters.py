"""Flat views of a model's trainable parameters: the coordinates theta in R^d that a subspace
spans. The order is the order of ``model.named_parameters()`` restricted to the chosen names.

Only trainable parameters (``requires_grad=True``) are ever chosen: a frozen parameter is left
alone by every subspace. ``layers`` chooses parameters by module: module names
(``named_modules``) and ``nn.Module`` subclasses, a class meaning every module of that type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from qem.errors import InvalidParameterError, NonFiniteError, UnsupportedModelError

LayerSpec = str | type[nn.Module]
"""A module name, or an nn.Module subclass meaning every module of that type."""
Layers = LayerSpec | Sequence[LayerSpec]


def layer_list(layers: Layers) -> list[LayerSpec]:
    """``layers`` as a list, each entry checked to be a name or an nn.Module subclass."""
    specs = [layers] if isinstance(layers, str | type) else list(layers)
    for spec in specs:
        if not (isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, nn.Module))):
            raise InvalidParameterError(
                f"layers takes module names and nn.Module subclasses (e.g. nn.Linear), got "
                f"{spec!r}."
            )
    if not specs:
        raise InvalidParameterError("layers is empty: name at least one module or module type.")
    return specs


def describe_layers(layers: Layers | None) -> list[str] | None:
    """``layers`` as strings for a report: names as given, types by their qualified name."""
    if layers is None:
        return None
    return [
        spec if isinstance(spec, str) else f"{spec.__module__}.{spec.__qualname__}"
        for spec in layer_list(layers)
    ]


def select_modules(model: nn.Module, layers: Layers) -> list[str]:
    """Names of the modules ``layers`` chooses, in ``named_modules`` order."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for spec in layer_list(layers):
        if isinstance(spec, str):
            if spec not in modules:
                raise UnsupportedModelError(
                    f"the model has no modules [{spec!r}]; available: {[n for n in modules if n]}"
                )
            chosen.add(spec)
            continue
        found = [name for name, module in modules.items() if isinstance(module, spec)]
        if not found:
            raise UnsupportedModelError(f"the model has no {spec.__name__} module (layers=).")
        chosen.update(found)
    return [name for name in modules if name in chosen]


def modules_within(model: nn.Module, layers: Layers) -> list[str]:
    """Names of the modules ``layers`` chooses and of all their submodules, in module order."""
    modules = dict(model.named_modules())
    inside = {
        sub
        for name in select_modules(model, layers)
        for sub, _ in modules[name].named_modules(prefix=name)
    }
    return [name for name in modules if name in inside]


def layer_parameter_names(model: nn.Module, layers: Layers) -> list[str]:
    """The trainable parameters of the modules ``layers`` chooses and of their submodules, by
    their names in ``model.named_parameters()``, in model order."""
    modules = dict(model.named_modules())
    name_of = {id(p): n for n, p in model.named_parameters()}
    wanted = {
        name_of[id(p)]
        for name in select_modules(model, layers)
        for p in modules[name].parameters()
        if p.requires_grad
    }
    found = [n for n, p in model.named_parameters() if n in wanted]
    if not found:
        raise UnsupportedModelError(
            f"the layers {describe_layers(layers)} have no trainable parameters "
            "(requires_grad=True): nothing to fine-tune."
        )
    return found


def select_parameters(
    model: nn.Module, names: Iterable[str] | None = None, layers: Layers | None = None
) -> dict[str, torch.Tensor]:
    """The trainable parameters called ``names``, or those of the modules ``layers`` chooses,
    or all of them when both are None; in model order."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if layers is not None:
        if names is not None:
            raise InvalidParameterError("give parameter names or layers, not both.")
        names = layer_parameter_names(model, layers)
    if names is None:
        chosen = dict(params)
    else:
        wanted = list(names)
        unknown = [n for n in wanted if n not in params]
        if unknown:
            raise UnsupportedModelError(
                f"the model has no trainable parameters named {unknown}; available: {list(params)}"
            )
        chosen = {n: p for n, p in params.items() if n in set(wanted)}
    if not chosen:
        raise UnsupportedModelError("no trainable parameters selected: nothing to fine-tune.")
    return chosen


def flatten(tensors: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate tensors into one vector per batch entry: (*batch, d)."""
    parts = [t.reshape(*t.shape[:batch_dims], -1) for t in tensors.values()]
    return torch.cat(parts, dim=-1)


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a (d,) vector into tensors shaped like ``like`` (the inverse of ``flatten``)."""
    out, start = {}, 0
    for name, ref in like.items():
        size = ref.numel()
        out[name] = vector[start : start + size].reshape(ref.shape)
        start += size
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters need {start}.")
    return out


def check_finite_parameters(model: nn.Module) -> None:
    """Raise NonFiniteError naming the first parameter holding NaN or infinity."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"parameter {name!r} of the model holds NaN or infinity.")
