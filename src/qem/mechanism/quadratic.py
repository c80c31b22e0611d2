"""The quadratic exponential mechanism and its exact sampler (docs/theory.md §1, §3, §6).

With utility u(w; D) = -(sum_i gh_i^T w + (N lam/2) w^T A w), the density proportional to
exp(beta u(w; D)) is exactly

    w ~ Normal(m_D, Sigma),  m_D = -(N lam A)^-1 sum_i gh_i,  Sigma = (beta N lam A)^-1,

drawn as w = m_D + L^-T z / sqrt(beta N lam) with A = L L^T (float64) and z ~ Normal(0, I_k).

* mode "gdp": beta = mu^2 N lam / (s b)^2 makes the release mu-GDP, with mu calibrated to the
  target (eps, delta) and b the per-example dual-norm bound (C, or C / sqrt(lambda_min(A)) under
  Euclidean clipping); s = 2 (replace-one) or 1 (add/remove).
* mode "pure": the same Normal restricted to W_R = {w : ||w||_A <= R} with beta = eps / (2 R s b)
  is eps-DP; it is sampled by rejection.

Everything here is numpy/scipy float64 on k x k matrices; nothing knows about models or data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy import linalg

from qem.checks import check_delta, check_epsilon, check_positive, parse_option
from qem.errors import InvalidParameterError, NonFiniteError, ShapeError
from qem.mechanism.clipping import dual_norms
from qem.mechanism.noise import (
    NoiseSource,
    float_tv_bound,
    noise_from_seed,
    snap_grid,
    snap_to_grid,
)
from qem.mechanism.report import Preview
from qem.privacy.gdp import calibrate_gdp_mu, warn_large_delta
from qem.privacy.pure import (
    check_acceptance,
    choose_radius,
    pure_beta,
    utility_sensitivity,
    worst_case_acceptance,
)
from qem.privacy.sensitivity import Adjacency, ClipNorm, Sensitivity, gdp_beta, gdp_mu
from qem.quadratic import PublicQuadratic

TARGET_ACCEPTANCE = 0.5
"""Worst-case acceptance probability aimed at when the pure mode chooses R itself."""

_MAX_BLOCK_ENTRIES = 1 << 22
"""Largest number of float64 entries one block of rejection-sampler proposals may hold."""


class Mode(StrEnum):
    """Which guarantee the release carries."""

    GDP = "gdp"
    PURE = "pure"


@dataclass(frozen=True)
class _Calibration:
    epsilon: float | None
    delta: float | None
    mu: float | None
    beta: float
    radius: float | None
    acceptance: float | None


def _noise_source(seed: int | None, noise: NoiseSource | None) -> NoiseSource:
    if noise is None:
        return noise_from_seed(seed)
    if not isinstance(noise, NoiseSource):
        raise InvalidParameterError(
            f"noise must be a qem.mechanism.noise.NoiseSource or None, got {noise!r}."
        )
    if seed is not None:
        raise InvalidParameterError(
            "pass either seed or noise, not both: a seed selects SeededNoise(seed)."
        )
    return noise


class QuadraticExponentialMechanism:
    """Exact sampler of Normal(-(N lam A)^-1 S, (beta N lam A)^-1) for a clipped gradient sum S.

    Parameters are public: ``A`` (k x k, positive definite), ``N`` (the public constant of
    docs/theory.md §0, §2), ``lam``, ``clip_norm`` C, ``adjacency`` ("replace_one" | "add_remove"),
    ``clipping`` ("dual" | "euclidean", the norm the gradients were clipped in), ``mode``
    ("gdp" | "pure"); in pure mode ``radius`` R (chosen by ``calibrate`` when None) and
    ``n_max`` (most records the data may hold, default N). ``seed=None`` draws the noise from
    operating-system entropy; an integer seed makes the draws reproducible and is recorded.
    ``noise`` replaces both by another source (qem.mechanism.noise); secure mode is
    ``noise=SecureNoise()``, which also turns on ``snap``: the release rounded to a public
    power-of-two grid in whitened coordinates (docs/theory.md §10a).
    Call ``calibrate`` (or ``set_beta``) before ``sample``.
    """

    def __init__(
        self,
        A: np.ndarray | PublicQuadratic,
        *,
        N: float,
        lam: float = 1.0,
        clip_norm: float,
        adjacency: Adjacency | str = Adjacency.REPLACE_ONE,
        clipping: ClipNorm | str = ClipNorm.DUAL,
        mode: Mode | str = Mode.GDP,
        radius: float | None = None,
        n_max: float | None = None,
        seed: int | None = None,
        noise: NoiseSource | None = None,
        snap: bool | None = None,
    ) -> None:
        self.N = check_positive(
            "N", N, "N is the dataset size (replace-one) or the declared size (add/remove)."
        )
        self.lam = check_positive("lam", lam, "lam weighs the quadratic; try 1.0.")
        clip_norm = check_positive("clip_norm C", clip_norm, "Use a clipping bound such as 1.0.")
        adjacency = parse_option(Adjacency, adjacency, "adjacency")
        clipping = parse_option(ClipNorm, clipping, "clipping")
        self.mode = parse_option(Mode, mode, "mode")
        if self.mode is Mode.GDP and (radius is not None or n_max is not None):
            raise InvalidParameterError(
                "radius and n_max apply to mode='pure' only; drop them or set mode='pure'."
            )
        self._radius = None if radius is None else check_positive("radius R", radius)
        self.n_max = self.N if n_max is None else check_positive("n_max", n_max)
        self.noise = _noise_source(seed, noise)
        if snap is not None and not isinstance(snap, bool):
            raise InvalidParameterError(f"snap must be None, True or False, got {snap!r}.")
        self.snap = self.noise.secure if snap is None else snap

        self.quadratic = A if isinstance(A, PublicQuadratic) else PublicQuadratic.from_matrix(A)
        self.A, self.cholesky = self.quadratic.A, self.quadratic.cholesky
        self.lambda_min = self.quadratic.lambda_min
        self.k = int(self.A.shape[0])
        self.sensitivity = Sensitivity(clip_norm, adjacency, clipping, self.lambda_min)
        self._calibration: _Calibration | None = None
        self.last_draws: int | None = None
        """Normal draws the last ``sample`` call made (pure mode: proposals up to the last
        accepted one)."""

    # -- calibration ----------------------------------------------------------------------

    def calibrate(self, epsilon: float, delta: float | None = None) -> Preview:
        """Set beta for the target budget and return the preview.

        gdp: mu = the largest mu whose profile meets (eps, delta); beta = mu^2 N lam / (s b)^2.
        Warns (PrivacyWarning) when delta >= 1/N.
        pure: delta is ignored (the release is (eps, 0)-DP); R = choose_radius(...) unless given;
        beta = eps / (2 R s b); raises RejectionSamplingError when the worst-case acceptance over
        datasets of at most n_max records is below MIN_ACCEPTANCE.
        """
        epsilon = check_epsilon(epsilon)
        if self.mode is Mode.GDP:
            if delta is None:
                raise InvalidParameterError(
                    "mode='gdp' needs delta, for example 1e-5 (well below 1/N); "
                    "or use mode='pure' for (eps, 0)-DP."
                )
            delta = check_delta(delta)
            warn_large_delta(delta, self.N)
            mu = calibrate_gdp_mu(epsilon, delta)
            beta = gdp_beta(mu, self.N, self.lam, self.sensitivity)
            self._calibration = _Calibration(epsilon, delta, mu, beta, None, None)
        else:
            radius = self._radius
            if radius is None:
                radius = choose_radius(
                    epsilon,
                    self.k,
                    self.N,
                    self.lam,
                    self.sensitivity,
                    self.n_max,
                    TARGET_ACCEPTANCE,
                )
            beta = pure_beta(epsilon, radius, self.sensitivity)
            self._calibration = self._pure_calibration(epsilon, radius, beta)
        return self.preview()

    def set_beta(self, beta: float) -> Preview:
        """Use this inverse temperature directly (advanced use and tests).

        The guarantee is the one beta implies: gdp, mu = sqrt(beta / (N lam)) s b (eps, delta
        unset); pure, eps = 2 beta R s b with the radius given to the constructor.
        """
        beta = check_positive("beta", beta)
        if self.mode is Mode.GDP:
            mu = gdp_mu(beta, self.N, self.lam, self.sensitivity)
            self._calibration = _Calibration(None, None, mu, beta, None, None)
        else:
            if self._radius is None:
                raise InvalidParameterError(
                    "set_beta in mode='pure' needs the radius R: pass radius= to the constructor."
                )
            epsilon = 2.0 * beta * utility_sensitivity(self._radius, self.sensitivity)
            self._calibration = self._pure_calibration(epsilon, self._radius, beta)
        return self.preview()

    def set_noise_multiplier(self, noise_multiplier: float) -> Preview:
        """Gaussian-DP mode: beta = N lam / (z b)^2, so that N lam L^T w is the whitened clipped
        sum plus Normal(0, (z b)^2 I) noise (docs/theory.md §13); one round is s/z GDP."""
        if self.mode is not Mode.GDP:
            raise InvalidParameterError("set_noise_multiplier applies to mode='gdp' only.")
        z = check_positive("noise multiplier z", noise_multiplier)
        return self.set_beta(self.N * self.lam / (z * self.sensitivity.per_example_dual_bound) ** 2)

    def _pure_calibration(self, epsilon: float, radius: float, beta: float) -> _Calibration:
        acceptance = worst_case_acceptance(
            self.k, radius, beta, self.N, self.lam, self.sensitivity, self.n_max
        )
        check_acceptance(acceptance)
        return _Calibration(epsilon, 0.0, None, beta, radius, acceptance)

    def _calibrated(self) -> _Calibration:
        if self._calibration is None:
            raise InvalidParameterError(
                "the mechanism is not calibrated: call calibrate(epsilon, delta) first."
            )
        return self._calibration

    @property
    def is_calibrated(self) -> bool:
        """Whether beta has been set."""
        return self._calibration is not None

    @property
    def beta(self) -> float:
        """The inverse temperature beta."""
        return self._calibrated().beta

    @property
    def mu(self) -> float | None:
        """The GDP parameter of the release (None in pure mode)."""
        return self._calibrated().mu

    @property
    def radius(self) -> float | None:
        """R of W_R in pure mode (None in gdp mode)."""
        return self._calibrated().radius

    def preview(self) -> Preview:
        """Privacy and noise of the release, computed from public quantities only (§1c)."""
        cal = self._calibrated()
        precision = cal.beta * self.N * self.lam
        sens = self.sensitivity
        return Preview(
            k=self.k,
            N=self.N,
            lam=self.lam,
            mode=self.mode.value,
            adjacency=sens.adjacency.value,
            clipping=sens.clipping.value,
            clip_norm=float(sens.clip_norm),
            epsilon=cal.epsilon,
            delta=cal.delta,
            mu=cal.mu,
            beta=cal.beta,
            noise_scale=1.0 / math.sqrt(precision),
            max_euclidean_std=1.0 / math.sqrt(precision * self.lambda_min),
            expected_excess_loss=self.k / (2.0 * cal.beta * self.N),
            radius=cal.radius,
            worst_case_acceptance=cal.acceptance,
        )

    # -- sampling -------------------------------------------------------------------------

    def _check_gradient_sum(self, gradient_sum: np.ndarray) -> np.ndarray:
        s = np.asarray(gradient_sum, dtype=np.float64)
        if s.shape != (self.k,):
            raise ShapeError(
                f"the clipped gradient sum must have shape ({self.k},) (one entry per subspace "
                f"coordinate), got {s.shape}."
            )
        if not np.all(np.isfinite(s)):
            raise NonFiniteError(
                "the clipped gradient sum holds NaN or infinity; check the private gradients."
            )
        return s

    def mean(self, gradient_sum: np.ndarray) -> np.ndarray:
        """m_D = -(N lam A)^-1 sum_i gh_i."""
        s = self._check_gradient_sum(gradient_sum)
        return -linalg.cho_solve((self.cholesky, True), s) / (self.N * self.lam)

    def _normal(self, mean: np.ndarray, n: int, beta: float) -> np.ndarray:
        """n draws (n, k) of m + L^-T z / sqrt(beta N lam), z ~ Normal(0, I_k).

        Snapped: L^-T (Lambda t) with t = rint((L^T m + z / sqrt(beta N lam)) / Lambda), the
        whitened draw rounded to the grid (docs/theory.md §10a).
        """
        z = self.noise.standard_normal((self.k, n))
        scale = math.sqrt(beta * self.N * self.lam)
        if not self.snap:
            noise = linalg.solve_triangular(self.cholesky, z, lower=True, trans="T")
            return mean + noise.T / scale
        grid = snap_grid(1.0 / scale)
        whitened = grid * snap_to_grid(mean @ self.cholesky, z.T / scale, grid)
        return linalg.solve_triangular(self.cholesky, whitened.T, lower=True, trans="T").T

    def sample(self, gradient_sum: np.ndarray, size: int | None = None) -> np.ndarray:
        """Draw w (shape (k,), or (size, k)) from the calibrated mechanism.

        Pure mode rejects Normal draws until ||w||_A <= R and records the number of draws in
        ``last_draws``. That number, hence the running time, depends on ||m_D||_A and so on the
        data: it is a timing side channel outside the eps-DP guarantee; do not publish it.
        """
        cal = self._calibrated()
        n = 1 if size is None else self._check_size(size)
        m = self.mean(gradient_sum)
        if self.mode is Mode.GDP:
            w, draws = self._normal(m, n, cal.beta), n
        else:
            self._check_pure_gradient_sum(np.asarray(gradient_sum, dtype=np.float64))
            w, draws = self._reject(m, n, cal)
        self.last_draws = draws
        return w[0] if size is None else w

    @staticmethod
    def _check_size(size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise InvalidParameterError(f"size must be None or an integer >= 1, got {size!r}.")
        return int(size)

    def _check_pure_gradient_sum(self, s: np.ndarray) -> None:
        """The pure mode's acceptance bound assumes ||S||_{A^-1} <= n_max b."""
        bound = self.n_max * self.sensitivity.per_example_dual_bound
        if dual_norms(s[None, :], self.cholesky)[0] > bound * (1.0 + 1e-9):
            raise InvalidParameterError(
                "the clipped gradient sum is larger than n_max clipped gradients can be: the data "
                "holds more than n_max records or was not clipped with this C and norm; pass "
                "n_max >= the number of records."
            )

    def _reject(self, mean: np.ndarray, n: int, cal: _Calibration) -> tuple[np.ndarray, int]:
        """n i.i.d. draws of the Normal conditioned on ||w||_A <= R, and the proposals used."""
        block = math.ceil(1.2 * n / cal.acceptance) + 16
        block = max(1, min(block, _MAX_BLOCK_ENTRIES // self.k))
        radius_sq = cal.radius * cal.radius
        kept: list[np.ndarray] = []
        n_kept, draws = 0, 0
        while n_kept < n:
            w = self._normal(mean, block, cal.beta)
            whitened = w @ self.cholesky  # rows L^T w_i, so ||w_i||_A^2 = sum of squares
            inside = np.flatnonzero(np.sum(whitened * whitened, axis=1) <= radius_sq)
            need = n - n_kept
            if inside.size >= need:
                inside = inside[:need]
                draws += int(inside[-1]) + 1
            else:
                draws += block
            kept.append(w[inside])
            n_kept += inside.size
        return np.concatenate(kept, axis=0), draws

    # -- reporting ------------------------------------------------------------------------

    def seed_info(self) -> dict:
        """Where the noise came from: ``seed_source`` ("os_entropy", "user_seed" with the seed
        recorded, or "os_csprng") and ``seed``."""
        source = self.noise.describe()
        return {"seed_source": source["seed_source"], "seed": source["seed"]}

    def noise_info(self) -> dict:
        """The noise source and the snapping of the release (docs/theory.md §10a).

        ``snapping`` is None or holds the grid Lambda (whitened coordinates), the bound on the
        probability that float arithmetic changed the snapped release (secure source only, else
        None) and, in pure mode, the epsilon of the snapped release, eps (1 + sqrt(k) Lambda
        / (2 R)).
        """
        cal = self._calibrated()
        info = self.noise.describe()
        info["snapping"] = None
        if self.snap:
            noise_std = 1.0 / math.sqrt(cal.beta * self.N * self.lam)
            grid = snap_grid(noise_std)
            tv = float_tv_bound(self.k, noise_std, grid) if self.noise.secure else None
            info["snapping"] = {
                "grid": grid,
                "coordinates": "whitened, L^T w",
                "float_tv_bound": tv,
            }
            if self.mode is Mode.PURE:
                epsilon = cal.epsilon * (1.0 + math.sqrt(self.k) * grid / (2.0 * cal.radius))
                info["snapping"]["epsilon"] = epsilon
                if tv is not None:
                    info["snapping"]["float_tv_bound"] = tv / cal.acceptance
        return info

    def privacy_statement(self) -> dict:
        """The guarantee and every public number it rests on, for the privacy report."""
        cal = self._calibrated()
        if self.mode is Mode.GDP:
            guarantee = (
                "mu-GDP (Dong, Roth & Su 2022) for one release; (epsilon, delta)-DP by its exact "
                "privacy profile (Balle & Wang 2018)"
            )
        else:
            guarantee = (
                "pure epsilon-DP: exponential mechanism restricted to {w : ||w||_A <= R} "
                "(McSherry & Talwar 2007); the number of rejections is a timing side channel"
            )
        statement = {
            "mechanism": "quadratic exponential mechanism, exact Normal sampling",
            "guarantee": guarantee,
            "mode": self.mode.value,
            "adjacency": self.sensitivity.adjacency.value,
            "clipping": self.sensitivity.clipping.value,
            "epsilon": cal.epsilon,
            "delta": cal.delta,
            "mu": cal.mu,
            "beta": cal.beta,
            "N": self.N,
            "lam": self.lam,
            "clip_norm": float(self.sensitivity.clip_norm),
            "k": self.k,
            "sensitivity": self.sensitivity.to_dict(),
            "noise": self.noise_info(),
        }
        if self.mode is Mode.PURE:
            statement.update(
                radius=cal.radius,
                n_max=self.n_max,
                utility_sensitivity=utility_sensitivity(cal.radius, self.sensitivity),
                worst_case_acceptance=cal.acceptance,
            )
        return statement
