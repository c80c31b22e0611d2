"""The "no curvature" ablation: A = gamma I_k, so the quadratic is a plain ridge penalty."""

from __future__ import annotations

import numpy as np
from torch import nn

from qem.curvature.base import Curvature
from qem.data import DataLike
from qem.losses import LossFn
from qem.subspace.base import Subspace


class IdentityCurvature(Curvature):
    """A = gamma I_k; reads no public data (its description has no data fingerprint)."""

    kind = "identity"

    def matrix(
        self,
        model: nn.Module | None,
        loss_fn: LossFn | None,
        subspace: Subspace,
        public_data: DataLike | None = None,
        *,
        refresh: bool = True,
    ) -> np.ndarray:
        """gamma I_k without a pass over data; only ``subspace.k`` is used."""
        return self.damping * np.eye(subspace.k)
