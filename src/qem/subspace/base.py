"""The public basis P in R^{d x k} of the fine-tuning subspace: theta(w) = theta0 + P w.

A subspace spans the flattened trainable parameters named in ``parameter_names`` (see
``qem.parameters``); P has orthonormal columns (P^T P = I_k) and is a function of the model's
architecture and a public seed only, never of data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.parameters import flatten, select_parameters, unflatten

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A loss returning one value per example: loss_fn(outputs (B, ...), targets (B, ...)) -> (B,)."""


class Subspace(ABC):
    """P in R^{d x k} with orthonormal columns over the parameters ``parameter_names``.

    Subclasses implement ``project`` (g -> P^T g) and ``lift`` (w -> P w); everything else
    (materialising P for tests, per-example projected gradients, moving a model) follows.
    """

    kind: str = "abstract"

    def __init__(
        self,
        model: nn.Module,
        k: int,
        parameter_names: list[str] | None = None,
        seed: int | None = None,
    ) -> None:
        params = select_parameters(model, parameter_names)
        self.parameter_names: tuple[str, ...] = tuple(params)
        self.parameter_shapes: dict[str, torch.Size] = {n: p.shape for n, p in params.items()}
        self.d: int = sum(p.numel() for p in params.values())
        k = int(k)
        if not 1 <= k <= self.d:
            raise InvalidParameterError(
                f"subspace dimension k={k} must lie between 1 and d={self.d}, the number of "
                "parameters it spans."
            )
        self.k: int = k
        self.seed = seed

    @abstractmethod
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g for g of shape (..., d); returns (..., k)."""

    @abstractmethod
    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """P w for w of shape (..., k); returns (..., d)."""

    def materialize(self) -> torch.Tensor:
        """P as a dense (d, k) float64 tensor. For tests and small d only."""
        eye = torch.eye(self.k, dtype=torch.float64)
        return self.lift(eye).T.contiguous()

    def describe(self) -> dict:
        """Public description of P for the privacy report."""
        return {
            "type": self.kind,
            "k": self.k,
            "d": self.d,
            "seed": self.seed,
            "parameters": list(self.parameter_names),
        }

    def parameters_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors for ``parameter_names`` (detached), in the subspace's order."""
        params = dict(model.named_parameters())
        missing = [n for n in self.parameter_names if n not in params]
        if missing:
            raise UnsupportedModelError(f"the model has no parameters {missing} for this subspace.")
        return {n: params[n].detach() for n in self.parameter_names}

    def apply_step(self, model: nn.Module, w: torch.Tensor) -> None:
        """In place: theta <- theta + P w on the spanned parameters of ``model``."""
        like = self.parameters_of(model)
        delta = unflatten(self.lift(w.to(torch.float64)), like)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, step in delta.items():
                params[name].add_(step.to(params[name].dtype))

    def per_example_gradients(
        self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """g_i = P^T grad_theta loss(theta; z_i) for a batch, shape (B, k), float64.

        Generic path: ``torch.func.vmap`` over ``grad`` of the one-example loss (the other
        parameters and buffers are held fixed), flattened and projected. Subclasses with a
        cheaper structure (Kronecker) override this.
        """
        spanned = self.parameters_of(model)
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in spanned}
        fixed.update(dict(model.named_buffers()))

        def one_loss(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            out = functional_call(model, {**fixed, **theta}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0)).sum()

        grads = vmap(grad(one_loss), in_dims=(None, 0, 0))(spanned, inputs, targets)
        flat = flatten(grads, batch_dims=1).to(torch.float64)
        return self.project(flat)
