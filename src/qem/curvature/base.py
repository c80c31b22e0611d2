"""The public quadratic A = P^T H0 P + gamma I_k (docs/theory.md §1, §13).

H0 is the curvature of the MEAN per-example loss over the public data at theta0, so that

    (1/n) sum_i loss(theta0 + P w; z_i) ~ const + g^T w + 1/2 w^T (P^T H0 P) w .

Each curvature type (one class per file) supplies the sum over one batch of its per-example
k x k contribution; this base class runs the pass over the public data (model in eval mode,
computed in the model's dtype, accumulated in float64), averages, symmetrises, damps and checks
the result, and fingerprints the public data it used for the privacy report.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from qem.checks import check_count, check_positive
from qem.data import (
    Batch,
    DataHasher,
    DataLike,
    Inputs,
    batches,
    map_inputs,
    num_examples,
    take_rows,
)
from qem.errors import CurvatureError, NonFiniteError
from qem.losses import LossFn, check_per_example_loss
from qem.model_calls import call_model, eval_mode
from qem.parameters import check_finite_parameters
from qem.progress import progress_bar
from qem.quadratic import PublicQuadratic
from qem.subspace.base import Subspace


class Curvature(ABC):
    """A = P^T H0 P + gamma I_k, float64 (k, k); gamma (``damping``) must be > 0."""

    kind: str = "abstract"
    reprojects: bool = False
    """Whether a stored public estimate can be projected into a new subspace without a data
    pass (``quadratic(..., refresh=False)``); otherwise every call estimates on the data."""

    def __init__(self, damping: float, batch_size: int = 64, progress: bool = True) -> None:
        self.damping = check_positive(
            "damping gamma", damping, "Pass a positive damping so that A is positive definite."
        )
        self.batch_size = check_count("batch_size", batch_size)
        self.progress = bool(progress)
        self.n_public: int | None = None
        self.public_data_fingerprint: str | None = None

    @abstractmethod
    def matrix(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        subspace: Subspace,
        public_data: DataLike,
        *,
        refresh: bool = True,
    ) -> np.ndarray:
        """A = P^T H0 P + gamma I_k as a symmetric float64 (k, k) array (``quadratic`` checks
        that it is positive definite and factors it). ``refresh=False`` (only where
        ``reprojects``) projects the stored estimate instead of estimating on the data."""

    def quadratic(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        subspace: Subspace,
        public_data: DataLike,
        *,
        refresh: bool = True,
    ) -> PublicQuadratic:
        """``matrix`` checked and factored once (PublicQuadratic): the object every later stage
        of a round uses. Raises CurvatureError when A is not positive definite."""
        A = self.matrix(model, loss_fn, subspace, public_data, refresh=refresh)
        try:
            return PublicQuadratic.from_matrix(A)
        except CurvatureError as error:
            raise CurvatureError(
                f"{error} ('ggn' needs a loss that is convex in the model's outputs; 'hessian' "
                "clamps negative eigenvalues instead.)"
            ) from None

    def describe(self) -> dict:
        """Public description of A for the privacy report (data fields filled in by ``matrix``)."""
        return {
            "type": self.kind,
            "damping": self.damping,
            "n_public": self.n_public,
            "public_data_fingerprint": self.public_data_fingerprint,
        }

    def public_batches(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        reference: torch.Tensor,
        public_data: DataLike,
        hasher: DataHasher,
    ) -> Iterator[Batch]:
        """The public data in batches of ``batch_size``, each hashed into ``hasher`` and moved
        to the reference tensor's device (floating tensors also to its dtype); the loss is
        checked to be per-example on the first batch. Call it with the model in eval mode."""
        n_batches = math.ceil(num_examples(public_data) / self.batch_size)
        stream = batches(public_data, self.batch_size, name="public data")
        bar = progress_bar(
            stream,
            total=n_batches,
            desc=f"curvature ({self.kind})",
            unit="batch",
            enabled=self.progress,
        )
        for index, (inputs, targets) in enumerate(bar):
            hasher.update(inputs, targets)
            inputs = map_inputs(lambda t: _like(t, reference), inputs)
            targets = _like(targets, reference)
            if index == 0:
                with torch.no_grad():
                    outputs = call_model(model, take_rows(inputs, slice(0, 2)))
                    check_per_example_loss(loss_fn, outputs, targets[:2])
            yield inputs, targets


class PublicBatch(NamedTuple):
    """One batch of public data at the expansion point theta0: the model (in eval mode), the
    per-example loss, the subspace P and the batch's inputs and targets."""

    model: nn.Module
    loss_fn: LossFn
    subspace: Subspace
    inputs: Inputs
    targets: torch.Tensor


class DataCurvature(Curvature):
    """A curvature estimated by one pass over the public data.

    Subclasses implement ``batch_sum``: sum over the examples of one batch of P^T H_i P, where
    H_i is the example's curvature (GGN, empirical Fisher, exact Hessian), as a (k, k) tensor.
    """

    @abstractmethod
    def batch_sum(self, batch: PublicBatch) -> torch.Tensor:
        """sum_{i in batch} P^T H_i P as a (k, k) tensor (float64)."""

    def postprocess(self, curvature: np.ndarray) -> np.ndarray:
        """Hook on the averaged, symmetrised P^T H0 P before damping (identity by default)."""
        return curvature

    def matrix(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        subspace: Subspace,
        public_data: DataLike,
        *,
        refresh: bool = True,
    ) -> np.ndarray:
        """A = P^T H0 P + gamma I_k, float64 (k, k), symmetric (every call estimates).

        H0 = (1/n) sum_i H_i over the n public examples. The model is used in eval mode and is
        left exactly as it was passed.
        """
        check_finite_parameters(model)
        hasher = DataHasher()
        total = torch.zeros(subspace.k, subspace.k, dtype=torch.float64)
        reference = next(iter(subspace.parameters_of(model).values()))
        with eval_mode(model):
            for inputs, targets in self.public_batches(
                model, loss_fn, reference, public_data, hasher
            ):
                batch = PublicBatch(model, loss_fn, subspace, inputs, targets)
                total += self.batch_sum(batch).detach().to("cpu", torch.float64)
        check_finite(total, self.kind)
        curvature = (total / hasher.n).numpy()
        A = damped(self.postprocess(0.5 * (curvature + curvature.T)), self.damping)
        self.n_public = hasher.n
        self.public_data_fingerprint = hasher.hexdigest()
        return A


def check_finite(curvature: torch.Tensor, kind: str) -> None:
    """Raise NonFiniteError if a curvature estimate holds NaN or infinity."""
    if not torch.isfinite(curvature).all():
        raise NonFiniteError(
            f"the {kind} curvature holds NaN or infinity: check the public data and the "
            "model's outputs and loss on it."
        )


def damped(curvature: np.ndarray, damping: float) -> np.ndarray:
    """A = sym(curvature) + gamma I, float64 (positive definiteness is checked once, when
    ``Curvature.quadratic`` factors it)."""
    return 0.5 * (curvature + curvature.T) + damping * np.eye(len(curvature))


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Move to the reference's device; floating tensors also take its dtype."""
    dtype = reference.dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=reference.device, dtype=dtype)
