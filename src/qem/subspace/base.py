"""The public basis P in R^{d x k} of the fine-tuning subspace: theta(w) = theta0 + P w.

A subspace spans the flattened trainable parameters named in ``parameter_names``, or those of
the modules ``layers`` chooses (names or module types; see ``qem.parameters``); P has
orthonormal columns (P^T P = I_k) and is a function of the model's architecture and a public
seed only, never of data.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from qem.data import Inputs
from qem.defaults import SUBSPACE_K
from qem.errors import InvalidParameterError, ShapeError, UnsupportedModelError
from qem.losses import LossFn
from qem.model_calls import ModelCall, call_functional
from qem.parameters import Layers, describe_layers, flatten, select_parameters, unflatten
from qem.per_example import check_examples_independent, shared_machine_threads, vmapped_gradients


class Subspace(ABC):
    """P in R^{d x k} with orthonormal columns over the parameters ``parameter_names`` (or those
    of the modules ``layers`` chooses; all trainable parameters when both are None).

    Subclasses implement ``project`` (g -> P^T g) and ``lift`` (w -> P w), both in float64 on
    ``self.device`` (the spanned parameters' device at construction). Everything else
    (materialising P for tests, per-example projected gradients, moving a model) follows.
    Random bases are drawn from a CPU ``torch.Generator`` seeded with the public ``seed`` (when
    None, a fresh seed is drawn and recorded, so ``describe()`` always reproduces P).
    """

    kind: str = "abstract"

    def __init__(
        self,
        model: nn.Module,
        k: int | None,
        parameter_names: list[str] | None = None,
        seed: int | None = None,
        layers: Layers | None = None,
    ) -> None:
        params = select_parameters(model, parameter_names, layers)
        self.layer_selection: list[str] | None = describe_layers(layers)
        self.parameter_names: tuple[str, ...] = tuple(params)
        self.parameter_shapes: dict[str, torch.Size] = {n: p.shape for n, p in params.items()}
        self.d: int = sum(p.numel() for p in params.values())
        self.device: torch.device = next(iter(params.values())).device
        if k is None:
            k = min(self.d, SUBSPACE_K)
        if isinstance(k, bool) or int(k) != k:
            raise InvalidParameterError(f"subspace dimension k={k!r} must be an integer.")
        k = int(k)
        if not 1 <= k <= self.d:
            raise InvalidParameterError(
                f"subspace dimension k={k} must lie between 1 and d={self.d}, the number of "
                "parameters it spans."
            )
        self.k: int = k
        self.seed = seed

    def _generator(self) -> torch.Generator:
        """A CPU generator seeded with the public seed (drawn and recorded when None)."""
        if self.seed is None:
            self.seed = secrets.randbits(63)
        return torch.Generator(device="cpu").manual_seed(int(self.seed))

    def _vectors(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """``x`` as float64 on ``self.device`` after checking its last dimension is ``length``.

        Subclasses call this at the top of ``project`` (length d) and ``lift`` (length k).
        """
        if x.shape[-1:] != (length,):
            raise ShapeError(
                f"expected vectors of length {length} (d={self.d}, k={self.k}), got shape "
                f"{tuple(x.shape)}."
            )
        return x.to(device=self.device, dtype=torch.float64)

    @abstractmethod
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g for g of shape (..., d); returns (..., k) in float64 on ``self.device``."""

    @abstractmethod
    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """P w for w of shape (..., k); returns (..., d) in float64 on ``self.device``."""

    def project_parameter_dict(
        self, tensors: Mapping[str, torch.Tensor], batch_dims: int = 0
    ) -> torch.Tensor:
        """P^T g where g is given per parameter (name -> (*batch, *shape)); returns (*batch, k).

        The tensors are flattened in the subspace's parameter order, so a gradient dict from
        ``torch.autograd.grad`` or ``torch.func.grad`` can be passed whatever its key order.
        """
        missing = [n for n in self.parameter_names if n not in tensors]
        if missing:
            raise ShapeError(f"no tensors for the spanned parameters {missing}.")
        ordered = {n: tensors[n] for n in self.parameter_names}
        return self.project(flatten(ordered, batch_dims=batch_dims))

    def materialize(self) -> torch.Tensor:
        """P as a dense (d, k) float64 tensor. For tests and small d only."""
        eye = torch.eye(self.k, dtype=torch.float64, device=self.device)
        return self.lift(eye).T.contiguous()

    def describe(self) -> dict:
        """Public description of P for the privacy report (with the ``layers`` selection, as
        strings, when one was made)."""
        selection = (
            {} if self.layer_selection is None else {"layer_selection": self.layer_selection}
        )
        return {
            "type": self.kind,
            "k": self.k,
            "d": self.d,
            "seed": self.seed,
            "parameters": list(self.parameter_names),
            **selection,
        }

    def parameters_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors for ``parameter_names`` (detached), in the subspace's order."""
        params = dict(model.named_parameters())
        missing = [n for n in self.parameter_names if n not in params]
        if missing:
            raise UnsupportedModelError(f"the model has no parameters {missing} for this subspace.")
        return {n: params[n].detach() for n in self.parameter_names}

    def direction(self, model: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """P w as float64 tensors shaped like the spanned parameters of ``model``."""
        return unflatten(self.lift(w), self.parameters_of(model))

    def apply_step(self, model: nn.Module, w: torch.Tensor) -> None:
        """In place: theta <- theta + P w on the spanned parameters of ``model``."""
        add_to_parameters(model, self.direction(model, w))

    def functional(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], ModelCall]:
        """theta0 (the spanned parameters, detached) and a pure call ``call(theta, inputs)`` of
        the model with the other parameters and buffers held fixed (for torch.func)."""
        theta = self.parameters_of(model)
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in theta}
        fixed.update(dict(model.named_buffers()))

        def call(params: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
            return call_functional(model, {**fixed, **params}, inputs)

        return theta, call

    def per_example_gradients(
        self, model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor
    ) -> torch.Tensor:
        """g_i = P^T grad_theta loss(theta; z_i) for a batch, shape (B, k), float64.

        Generic path (qem.per_example.vmapped_gradients): ``torch.func.vmap`` over ``grad``
        of the one-example loss, the other parameters and buffers held fixed, or ``grad`` one
        example at a time for a model vmap cannot batch; flattened and projected, on the
        threads other processes leave free (qem.per_example.shared_machine_threads).
        Subclasses with a cheaper structure (Kronecker) override this.
        """
        check_examples_independent(model)
        theta, call = self.functional(model)
        with shared_machine_threads():
            grads = vmapped_gradients(model, call, theta, loss_fn, inputs, targets)
            return self.project_parameter_dict(grads, batch_dims=1)


def add_to_parameters(
    model: nn.Module, step: Mapping[str, torch.Tensor], scale: float = 1.0
) -> None:
    """In place: each named parameter of ``model`` += scale * step[name] (in its dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in step.items():
            target = params[name]
            target.add_((scale * value).to(device=target.device, dtype=target.dtype))
