"""Reference models for the evaluation scenarios (no BatchNorm, no dropout: per-example
gradients and curvature are well defined, and a model is a plain function of its parameters).

The small models are ``nn.Sequential`` with named layers, so parameter names are stable
(``fc2.weight``) and ``model[-1]`` is the output layer. "minilm_classifier" is a pretrained
sentence encoder with a linear head (:mod:`qem.text_models`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from qem.errors import InvalidParameterError


class SmallCNN(nn.Sequential):
    """conv(1->16, 5x5)-ReLU-maxpool2-conv(16->32, 5x5)-ReLU-maxpool2-fc(512->64)-ReLU-fc(64->10).

    Input (n, 1, 28, 28); 46,730 parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 16, 5)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(16, 32, 5)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(32 * 4 * 4, 64)),
                    ("relu3", nn.ReLU()),
                    ("fc2", nn.Linear(64, num_classes)),
                ]
            )
        )


class MLP(nn.Sequential):
    """Flatten, then fully connected layers ``fc1..fcL`` with ReLU between them.

    Accepts (n, 1, 28, 28) or already flat (n, in_features) inputs.
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (128,), out_features: int = 10
    ) -> None:
        widths = [in_features, *hidden, out_features]
        if any(int(w) < 1 for w in widths):
            raise InvalidParameterError(f"MLP layer widths must be positive, got {widths}.")
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), 1):
            if i > 1:
                layers.append((f"relu{i - 1}", nn.ReLU()))
            layers.append((f"fc{i}", nn.Linear(int(fan_in), int(fan_out))))
        super().__init__(OrderedDict(layers))


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression: logits = W flatten(x) + b (softmax in the loss)."""

    def __init__(self, in_features: int = 784, out_features: int = 10) -> None:
        if in_features < 1 or out_features < 1:
            raise InvalidParameterError(
                "LogisticRegression needs positive sizes, got "
                f"in_features={in_features}, out_features={out_features}."
            )
        super().__init__(
            OrderedDict(
                [("flatten", nn.Flatten()), ("linear", nn.Linear(in_features, out_features))]
            )
        )


def _minilm_classifier(**kwargs: object) -> nn.Module:
    """all-MiniLM-L6-v2 + mean pooling + linear head (:mod:`qem.text_models`, extra 'text')."""
    from qem.text_models import minilm_classifier

    return minilm_classifier(**kwargs)  # type: ignore[arg-type]


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "logreg": LogisticRegression,
    "minilm_classifier": _minilm_classifier,
}


def build_model(
    name: str, *, seed: int | None = None, dtype: torch.dtype | None = None, **kwargs: object
) -> nn.Module:
    """Instantiate ``MODELS[name](**kwargs)``; with ``seed``, the initial weights depend on the
    seed only (the global torch RNG is left untouched)."""
    if name not in MODELS:
        raise InvalidParameterError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    if seed is None:
        model = MODELS[name](**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODELS[name](**kwargs)
    return model if dtype is None else model.to(dtype)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters (d when every parameter is fine-tuned)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
