"""How qem calls a user's model and reads what it returns.

A batch's inputs are a Tensor, passed as ``model(x)``, or a dict of Tensors (Hugging Face
style: input_ids, attention_mask, ...), passed as keyword arguments ``model(**inputs)``. The
model may return a Tensor, a dict with a "logits" entry, or an object with a ``logits``
attribute (a Hugging Face ``ModelOutput`` such as ``SequenceClassifierOutput``); qem uses the
logits as the outputs f(theta; x) that the loss and the curvature see.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from qem.data import Inputs
from qem.errors import UnsupportedModelError


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
