"""Generalised Gauss-Newton curvature (Schraudolph 2002; Martens 2020, §6).

    P^T G P = (1/n) sum_i (J_i P)^T H_L,i (J_i P),

J_i = d f(theta0; x_i) / d theta (output x d, spanned parameters only) and H_L,i the Hessian of
the one-example loss with respect to the model's output. Cross-entropy and squared error have
positive semi-definite H_L,i, so G is PSD; it is the Hessian with the term carrying the model's
own second derivatives dropped.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

from qem.curvature.base import DataCurvature, functional_model
from qem.subspace.base import LossFn, Subspace


class GaussNewton(DataCurvature):
    """GGN: per example, J_i by reverse mode (vmap over jacrev), projected, then H_L,i.

    Memory per batch is batch_size x outputs x d (the unprojected Jacobians), never d x d.
    """

    kind = "ggn"

    def batch_sum(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        subspace: Subspace,
        inputs: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """sum_i (J_i P)^T H_L,i (J_i P) over the batch, (k, k) float64."""
        theta, call = functional_model(model, subspace)

        def output(params: dict[str, torch.Tensor], x: torch.Tensor):
            out = call(params, x.unsqueeze(0)).squeeze(0)
            return out, out

        def one_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(out.unsqueeze(0), y.unsqueeze(0)).sum()

        jacobians, outputs = vmap(jacrev(output, has_aux=True), in_dims=(None, 0))(theta, inputs)
        size, m = inputs.shape[0], outputs[0].numel()
        jacobian = torch.cat([j.reshape(size, m, -1) for j in jacobians.values()], dim=-1)
        projected = subspace.project(jacobian)  # (B, m, k) float64
        loss_hessian = vmap(hessian(one_loss))(outputs, targets).reshape(size, m, m)
        return torch.einsum("bmk,bmn,bnl->kl", projected, loss_hessian.to(projected), projected)
