"""Exact Hessian curvature, projected: P^T H P with H = Hessian of the mean public loss at theta0.

Column j of P^T H P is P^T (H p_j), p_j = P e_j: a Hessian-vector product by forward-over-reverse
differentiation (``jvp`` of ``grad``; Pearlmutter 1994), vmapped over chunks of lifted basis
vectors and summed over batches. Away from a minimum H can be indefinite, so the symmetrised
P^T H P is replaced by V max(Lambda, 0) V^T (eigendecomposition in float64) before damping.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from qem.checks import check_count
from qem.curvature.base import DataCurvature, PublicBatch
from qem.parameters import flatten


class Hessian(DataCurvature):
    """Exact projected Hessian with negative eigenvalues clamped to 0.

    ``basis_chunk`` lifted basis vectors are pushed through one vmapped Hessian-vector product;
    memory per step is about basis_chunk x (d + one batch's activations), never d x d.
    """

    kind = "hessian"

    def __init__(
        self, damping: float, batch_size: int = 64, progress: bool = True, basis_chunk: int = 16
    ) -> None:
        super().__init__(damping, batch_size, progress)
        self.basis_chunk = check_count("basis_chunk", basis_chunk)
        self.clamped_eigenvalues: int | None = None
        self.most_negative_eigenvalue: float | None = None

    def batch_sum(self, batch: PublicBatch) -> torch.Tensor:
        """P^T (Hessian of sum_{i in batch} loss_i) P, (k, k) float64."""
        model, loss_fn, subspace, inputs, targets = batch
        theta, call = subspace.functional(model)
        reference = next(iter(theta.values()))
        sizes = [p.numel() for p in theta.values()]

        def batch_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(call(params, inputs), targets).sum()

        def hvp(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return jvp(grad(batch_loss), (theta,), (tangent,))[1]

        eye = torch.eye(subspace.k, dtype=torch.float64)
        columns = []
        for start in range(0, subspace.k, self.basis_chunk):
            basis = subspace.lift(eye[start : start + self.basis_chunk])
            basis = basis.to(device=reference.device, dtype=reference.dtype)
            tangents = {
                name: part.reshape(basis.shape[0], *p.shape)
                for (name, p), part in zip(theta.items(), basis.split(sizes, dim=1), strict=True)
            }
            products = flatten(vmap(hvp)(tangents), batch_dims=1)
            columns.append(subspace.project(products))
        return torch.cat(columns)

    def postprocess(self, curvature: np.ndarray) -> np.ndarray:
        """V max(Lambda, 0) V^T; records how many eigenvalues were clamped and the lowest."""
        eigenvalues, vectors = np.linalg.eigh(curvature)
        negative = eigenvalues < 0
        self.clamped_eigenvalues = int(negative.sum())
        self.most_negative_eigenvalue = float(eigenvalues[0]) if negative.any() else None
        return (vectors * np.maximum(eigenvalues, 0.0)) @ vectors.T

    def describe(self) -> dict:
        """The base description plus the clamping record."""
        return {
            **super().describe(),
            "clamped_eigenvalues": self.clamped_eigenvalues,
            "most_negative_eigenvalue": self.most_negative_eigenvalue,
        }
