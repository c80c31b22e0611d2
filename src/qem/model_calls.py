"""How qem calls a user's model and reads what it returns.

A batch's inputs are a Tensor, passed as ``model(x)``, or a dict of Tensors (Hugging Face
style: input_ids, attention_mask, ...), passed as keyword arguments ``model(**inputs)``. The
model may return a Tensor, a dict with a "logits" entry, or an object with a ``logits``
attribute (a Hugging Face ``ModelOutput`` such as ``SequenceClassifierOutput``); qem uses the
logits as the outputs f(theta; x) that the loss and the curvature see. Every pass moves a
batch to the model's device first (``on_model_device``); passes that must not train run the
model under ``eval_mode``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

from qem.data import Inputs, map_inputs
from qem.errors import InvalidParameterError, UnsupportedModelError

ModelCall = Callable[[dict[str, torch.Tensor], Inputs], torch.Tensor]
"""outputs = call(theta, inputs): a model with some of its parameters replaced by ``theta``."""


def model_outputs(returned: object) -> torch.Tensor:
    """The outputs tensor of what a model returned: the Tensor itself, ``returned["logits"]``
    of a dict, or ``returned.logits`` (a Hugging Face ModelOutput)."""
    if isinstance(returned, torch.Tensor):
        return returned
    if isinstance(returned, Mapping):
        logits = returned.get("logits")
    else:
        logits = getattr(returned, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise UnsupportedModelError(
        f"the model returned a {type(returned).__name__}; qem needs a Tensor, a dict with a "
        "'logits' tensor, or an object with a .logits tensor (a Hugging Face ModelOutput; "
        "call the model with return_dict=True)."
    )


def call_model(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """f(x): ``model(x)`` for a Tensor, ``model(**inputs)`` for a dict, as outputs."""
    if isinstance(inputs, Mapping):
        return model_outputs(model(**inputs))
    return model_outputs(model(inputs))


def call_functional(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], inputs: Inputs
) -> torch.Tensor:
    """``call_model`` with the model's parameters and buffers replaced by ``tensors``
    (torch.func.functional_call), for torch.func transforms."""
    if isinstance(inputs, Mapping):
        returned = functional_call(model, dict(tensors), (), dict(inputs))
    else:
        returned = functional_call(model, dict(tensors), (inputs,))
    return model_outputs(returned)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration; restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.train(training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def on_model_device(
    model: nn.Module, inputs: Inputs, targets: torch.Tensor
) -> tuple[Inputs, torch.Tensor]:
    """The batch on the model's device (a no-op when it is there already)."""
    device = model_device(model)
    return map_inputs(lambda t: t.to(device), inputs), targets.to(device)


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """The device a run uses: the model's own for None, the GPU for "auto" when torch sees
    one (else the CPU), or the device named ("cpu", "cuda", "cuda:1")."""
    if device is None:
        return model_device(model)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError(
            f"device must be None, 'auto', 'cpu', 'cuda' or a torch device, got {device!r}."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(
            "device='cuda' but torch sees no GPU here; use device='cpu' (or 'auto')."
        )
    return resolved
