"""What a calibrated mechanism promises before it sees any data (docs/theory.md §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preview:
    """Privacy and noise of a calibrated release; every field is public.

    noise_scale = 1/sqrt(beta N lam): std of each coordinate of L^T w, i.e. in the metric of A.
    max_euclidean_std = 1/sqrt(beta N lam lambda_min(A)): largest std of any direction of w.
    expected_excess_loss = k / (2 beta N) = E[F_D(w)] - F_D(m_D) for the surrogate
    F_D(w) = (1/N) sum_i gh_i^T w + (lam/2) w^T A w. It is exact in Gaussian-DP mode; in
    pure mode it is the value of the untruncated Normal, since the sampler's law is truncated to
    ||w||_A <= R (neither exact nor a bound there; docs/theory.md §11 b3).
    """

    k: int
    N: float
    lam: float
    mode: str
    adjacency: str
    clipping: str
    clip_norm: float
    epsilon: float | None
    delta: float | None
    mu: float | None
    beta: float
    noise_scale: float
    max_euclidean_std: float
    expected_excess_loss: float
    radius: float | None
    worst_case_acceptance: float | None

    def to_dict(self) -> dict:
        """The fields as plain Python values (JSON-serialisable)."""
        return asdict(self)
