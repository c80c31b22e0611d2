"""The generic per-example gradient path: torch.func.vmap over grad of the one-example loss,
each example run as a batch of one (so it cannot mix examples), for any model torch.func can
trace; a model vmap cannot batch gets grad one example at a time (the same numbers, B calls)."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.func import grad, vmap

from qem.data import Inputs, batch_size_of, map_inputs, take_rows
from qem.errors import ShapeError
from qem.losses import LossFn
from qem.model_calls import ModelCall

_NOT_VMAPPABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Models whose forward pass torch.func.vmap cannot batch (data-dependent control flow, such as
Hugging Face's check whether an attention mask pads anything): their per-example gradients are
computed one example at a time. Whether vmap fails depends on the code, not on the values."""


def vmapped_gradients(
    model: nn.Module,
    call: ModelCall,
    theta: dict[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Inputs,
    targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """grad_theta loss(theta; z_i) for every example of the batch: name -> (B, *shape).

    ``call(theta, inputs)`` is the model with the parameters ``theta`` replaced (other
    parameters and buffers held fixed); dict inputs are mapped entry by entry. ``model`` keys
    the record of models vmap cannot batch."""

    def one_loss(params: dict[str, torch.Tensor], x: Inputs, y: torch.Tensor) -> torch.Tensor:
        batch_of_one = map_inputs(lambda t: t.unsqueeze(0), x)
        return loss_fn(call(params, batch_of_one), y.unsqueeze(0)).sum()

    one_grad = grad(one_loss)
    if model not in _NOT_VMAPPABLE:
        try:
            return vmap(one_grad, in_dims=(None, 0, 0))(theta, inputs, targets)
        except RuntimeError as error:
            if "data-dependent control flow" not in str(error):
                raise
            _NOT_VMAPPABLE.add(model)
    rows = [one_grad(theta, take_rows(inputs, i), targets[i]) for i in range(batch_size_of(inputs))]
    return {name: torch.stack([row[name] for row in rows]) for name in theta}


def per_example_losses(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor | None
) -> torch.Tensor:
    """(B,) losses, ``loss_fn`` applied to each example as a batch of one (torch.func.vmap, as
    the generic path does), so that a loss mixing the examples of a batch (a batch mean
    subtracted, weights normalised over the batch) cannot carry one example into another's
    gradient on the hooked path either."""

    def one(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        value = loss_fn(output.unsqueeze(0), None if target is None else target.unsqueeze(0))
        if value.shape != (1,):
            raise ShapeError(
                f"the loss returned shape {tuple(value.shape)} for a batch of 1; qem needs one "
                "loss per example."
            )
        return value[0]

    return vmap(one, in_dims=(0, None if targets is None else 0))(outputs, targets)
