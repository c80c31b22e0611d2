"""Flat views of a model's trainable parameters: the coordinates theta in R^d that a subspace
spans. The order is the order of ``model.named_parameters()`` restricted to the chosen names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from qem.errors import NonFiniteError, UnsupportedModelError


def select_parameters(
    model: nn.Module, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The trainable parameters called ``names`` (all of them when None), in model order."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
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
