"""Generalised Gauss-Newton curvature (Schraudolph 2002; Martens 2020, §6).

    P^T G P = (1/n) sum_i (J_i P)^T H_L,i (J_i P),

J_i = d f(theta0; x_i) / d theta (output x d, spanned parameters only) and H_L,i the Hessian of
the one-example loss with respect to the model's output. Cross-entropy and squared error have
positive semi-definite H_L,i, so G is PSD; it is the Hessian with the term carrying the model's
own second derivatives dropped.
"""

from __future__ import annotations

import torch
from torch.func import hessian, vmap

from qem.curvature.base import DataCurvature, PublicBatch
from qem.data import batch_size_of
from qem.losses import LossFn
from qem.model_calls import call_model


class GaussNewton(DataCurvature):
    """GGN: per example, the rows of J_i P are the projected per-example gradients of each output
    coordinate, ``subspace.per_example_gradients`` with the "loss" f_c(x_i); so the Kronecker
    subspace's cheap path serves here too. H_L,i comes from torch.func.hessian of the one-example
    loss. Memory per batch is batch_size x outputs x k, never d x d.
    """

    kind = "ggn"

    def batch_sum(self, batch: PublicBatch) -> torch.Tensor:
        """sum_i (J_i P)^T H_L,i (J_i P) over the batch, (k, k) float64."""
        model, loss_fn, subspace, inputs, targets = batch
        with torch.no_grad():
            outputs = call_model(model, inputs)
        size = batch_size_of(inputs)
        m = outputs[0].numel()

        def coordinate(c: int) -> LossFn:
            return lambda out, _targets: out.reshape(out.shape[0], -1)[:, c]

        projected = torch.stack(
            [
                subspace.per_example_gradients(model, coordinate(c), inputs, targets)
                for c in range(m)
            ],
            dim=1,
        )  # (B, m, k) float64: J_i P

        def one_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(out.unsqueeze(0), y.unsqueeze(0)).sum()

        loss_hessian = vmap(hessian(one_loss))(outputs, targets).reshape(size, m, m)
        return torch.einsum("bmk,bmn,bnl->kl", projected, loss_hessian.to(projected), projected)
