"""Dense orthonormal Gaussian basis: P = Q from the QR decomposition of a d x k Gaussian."""

from __future__ import annotations

import torch
from torch import nn

from qem.errors import InvalidParameterError
from qem.parameters import Layers
from qem.subspace.base import Subspace

DEFAULT_MAX_BYTES = 2 * 1024**3


def orthonormal_gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Q of G = QR, G a (rows, cols) standard Gaussian in float64, columns sign-fixed so that
    diag(R) > 0; Q is then Haar-distributed on the Stiefel manifold (Mezzadri 2007)."""
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


class DenseGaussian(Subspace):
    """P in R^{d x k}, Haar-random orthonormal columns, stored densely (d k float64 entries).

    Refused when d * k * 8 bytes exceed ``max_bytes`` (default 2 GiB): use SRHT or Kronecker,
    which never store P.
    """

    kind = "dense"

    def __init__(
        self,
        model: nn.Module,
        k: int | None = None,
        seed: int | None = None,
        parameter_names: list[str] | None = None,
        *,
        layers: Layers | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(model, k, parameter_names=parameter_names, seed=seed, layers=layers)
        needed = self.d * self.k * 8
        if needed > max_bytes:
            raise InvalidParameterError(
                f"a dense basis with d={self.d}, k={self.k} needs {needed / 1024**3:.2f} GiB "
                f"({needed} bytes), above max_bytes={max_bytes}; use the implicit 'srht' or "
                "'kronecker' subspace, a smaller k, or raise max_bytes."
            )
        self.basis = orthonormal_gaussian(self.d, self.k, self._generator()).to(self.device)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g."""
        return self._vectors(g, self.d) @ self.basis

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """P w."""
        return self._vectors(w, self.k) @ self.basis.T
