"""Empirical Fisher curvature: P^T F P = (1/n) sum_i g_i g_i^T, g_i = P^T grad loss(theta0; z_i).

It uses the observed labels (not labels sampled from the model), so it is the outer product of
the per-example gradients the private pass also computes (Kunstner et al. 2019 discuss how it
differs from the true Fisher).
"""

from __future__ import annotations

import torch

from qem.curvature.base import DataCurvature, PublicBatch


class EmpiricalFisher(DataCurvature):
    """Empirical Fisher from ``subspace.per_example_gradients`` (PSD by construction)."""

    kind = "fisher"

    def batch_sum(self, batch: PublicBatch) -> torch.Tensor:
        """sum_i g_i g_i^T over the batch, (k, k) float64."""
        model, loss_fn, subspace, inputs, targets = batch
        grads = subspace.per_example_gradients(model, loss_fn, inputs, targets)
        return grads.T @ grads
