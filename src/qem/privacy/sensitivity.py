"""Sensitivity of the clipped-gradient sum, with the assumptions it rests on (docs/theory.md §2).

The mechanism's mean is m_D = -(N lam A)^-1 sum_i gh_i, so two neighbouring datasets move it by
(N lam A)^-1 (gh_j - gh_j'), whose size in the metric of A is ||gh_j - gh_j'||_{A^-1}. This module
bounds that dual norm:

* dual-norm clipping (||gh||_{A^-1} <= C): sup ||gh_j - gh_j'||_{A^-1} <= s C
* Euclidean clipping (||gh||_2 <= C):       sup ||gh_j - gh_j'||_{A^-1} <= s C / sqrt(lambda_min(A))

with s = 2 for replace-one neighbours and s = 1 for add/remove (where N is a declared constant
that does not change when a record is added or removed). Both bounds are attained, so the
privacy statements built on them are tight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from qem.checks import check_positive, parse_option
from qem.errors import InvalidParameterError


class Adjacency(StrEnum):
    """Which datasets count as neighbours."""

    REPLACE_ONE = "replace_one"
    ADD_REMOVE = "add_remove"

    @property
    def multiplier(self) -> int:
        """s: how many clipped gradients differ in norm between neighbours (2 or 1)."""
        return 2 if self is Adjacency.REPLACE_ONE else 1


class ClipNorm(StrEnum):
    """The norm in which per-example subspace gradients are clipped."""

    DUAL = "dual"
    EUCLIDEAN = "euclidean"


@dataclass(frozen=True)
class Sensitivity:
    """Bound on ||gh_j - gh_j'||_{A^-1} between neighbouring datasets.

    ``lambda_min`` is the smallest eigenvalue of A; it is needed (and only used) for Euclidean
    clipping, where ||g||_{A^-1} <= ||g||_2 / sqrt(lambda_min(A)).
    """

    clip_norm: float
    adjacency: Adjacency = Adjacency.REPLACE_ONE
    clipping: ClipNorm = ClipNorm.DUAL
    lambda_min: float | None = None

    def __post_init__(self) -> None:
        check_positive("clip_norm C", self.clip_norm, "Use a clipping bound such as 1.0.")
        object.__setattr__(self, "adjacency", parse_option(Adjacency, self.adjacency, "adjacency"))
        object.__setattr__(self, "clipping", parse_option(ClipNorm, self.clipping, "clipping"))
        if self.clipping is ClipNorm.EUCLIDEAN and self.lambda_min is None:
            raise InvalidParameterError(
                "Euclidean clipping needs lambda_min(A) to bound the dual norm; "
                "pass lambda_min or use clipping='dual'."
            )
        if self.lambda_min is not None:
            check_positive("lambda_min(A)", self.lambda_min, "Increase the damping gamma.")

    @property
    def per_example_dual_bound(self) -> float:
        """Largest ||gh_i||_{A^-1} of one clipped gradient: C, or C / sqrt(lambda_min)."""
        if self.clipping is ClipNorm.DUAL:
            return float(self.clip_norm)
        return float(self.clip_norm) / math.sqrt(float(self.lambda_min))

    @property
    def dual_norm_bound(self) -> float:
        """sup over neighbours of ||gh_j - gh_j'||_{A^-1}: s times the per-example bound."""
        return self.adjacency.multiplier * self.per_example_dual_bound

    def to_dict(self) -> dict:
        """The bound and every assumption it rests on, for the privacy report."""
        return {
            "clip_norm": float(self.clip_norm),
            "adjacency": self.adjacency.value,
            "clipping": self.clipping.value,
            "lambda_min_A": None if self.lambda_min is None else float(self.lambda_min),
            "neighbour_multiplier": self.adjacency.multiplier,
            "dual_norm_bound": self.dual_norm_bound,
        }


def gdp_mu(beta: float, N: float, lam: float, sensitivity: Sensitivity) -> float:
    """mu = sqrt(beta / (N lam)) * sup ||gh_j - gh_j'||_{A^-1} (docs/theory.md §3)."""
    beta = check_positive("beta", beta)
    N = check_positive("N", N, "N is the public (declared) dataset size.")
    lam = check_positive("lam", lam)
    return math.sqrt(beta / (N * lam)) * sensitivity.dual_norm_bound


def gdp_beta(mu: float, N: float, lam: float, sensitivity: Sensitivity) -> float:
    """The inverse temperature that makes the release mu-GDP: beta = mu^2 N lam / bound^2."""
    mu = check_positive("mu", mu)
    N = check_positive("N", N, "N is the public (declared) dataset size.")
    lam = check_positive("lam", lam)
    return mu * mu * N * lam / sensitivity.dual_norm_bound**2
