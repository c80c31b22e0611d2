"""Hooks that record, for one forward pass, each chosen layer's input activations and (after a
backward pass) the backprops d total / d output of each of its calls.

For a layer whose output at position t is s_{i,t} = W a_{i,t} (+ b), the gradient of a sum of
per-example losses sum_i loss_i in W is sum_i sum_t delta_{i,t} a_{i,t}^T with
delta_{i,t} = d loss_i / d s_{i,t}, when examples do not interact (qem.per_example.independence):
so one forward and one backward pass give every example's gradient of every recorded layer.
The backward pass differentiates only down to the recorded outputs (no parameter gradient is
formed), and it reads the gradient edge each output had when its layer returned it, so an
in-place operation after the layer (ReLU(inplace=True)) does not change what is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from qem.errors import UnsupportedModelError


@dataclass
class LayerCall:
    """One call of a recorded layer: its input (detached), the gradient edge of its output
    (None when the output does not require grad) and, after ``backpropagate``, the backprop
    d total / d output (None when the output does not reach ``total``)."""

    activation: torch.Tensor
    edge: GradientEdge | None
    backprop: torch.Tensor | None = None


Recording = dict[str, list[LayerCall]]
"""Layer name -> its calls in the forward pass, in call order."""


@contextmanager
def record_calls(model: nn.Module, names: list[str]) -> Iterator[Recording]:
    """Forward hooks on the modules ``names`` of ``model`` for the duration of the block; the
    yielded Recording fills up with each call (a module called twice has two LayerCalls)."""
    modules = dict(model.named_modules())
    recording: Recording = {name: [] for name in names}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            edge = get_gradient_edge(output) if output.requires_grad else None
            recording[name].append(LayerCall(args[0].detach(), edge))

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


def check_recording(recording: Recording, batch: int, remedy: str) -> None:
    """Raise UnsupportedModelError unless every layer was called through its forward() and
    every call's input has the batch as its first dimension (``remedy`` ends the message)."""
    for name, calls in recording.items():
        if not calls:
            raise UnsupportedModelError(
                f"layer {name!r} was not called through its forward() (its parent may use its "
                f"weights directly); {remedy}"
            )
        for call in calls:
            if call.activation.shape[0] != batch:
                raise UnsupportedModelError(
                    f"layer {name!r} received a tensor of shape {tuple(call.activation.shape)} "
                    f"whose first dimension is not the batch ({batch}); the per-example "
                    f"engine needs layers applied per example. {remedy}"
                )


def backpropagate(total: torch.Tensor, recording: Recording, retain_graph: bool = False) -> None:
    """Set each call's ``backprop`` to d total / d (its output), by one backward pass that stops
    at the recorded outputs."""
    calls = [call for layer_calls in recording.values() for call in layer_calls]
    tracked = [call for call in calls if call.edge is not None]
    for call in calls:
        call.backprop = None
    if not tracked:
        return
    grads = torch.autograd.grad(
        total, [call.edge for call in tracked], retain_graph=retain_graph, allow_unused=True
    )
    for call, grad in zip(tracked, grads, strict=True):
        call.backprop = grad
