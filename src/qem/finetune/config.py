"""The configuration of a run, in the objects the round engine reads (docs/theory.md §13):
``Budget`` (qem.privacy.budget: what may be spent), ``PublicSide`` (qem.public.config: what a
round computes from public data, and when), ``PrivatePass`` (how private records are clipped and
what an invalid one contributes), ``Noise`` (where the normals come from), ``StepRule`` (how a
release becomes a step: post-processing on public data) and ``Performance`` (how the work is
run; none of its flags changes a release, up to the float rounding of batched kernels). Each
validates itself when built, before any data is read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qem.checks import check_count, check_in_interval, check_positive, parse_option
from qem.data import DataLike
from qem.errors import InvalidParameterError
from qem.privacy.sensitivity import ClipNorm
from qem.seeds import check_seed
from qem.statistics import InvalidRecords


@dataclass(frozen=True)
class PrivatePass:
    """How the private pass treats records: ``clipping`` in the dual norm ||g||_{A^-1}
    (default) or the Euclidean norm, and ``invalid_records`` ('zero': a record whose gradient
    cannot be computed contributes zero; 'raise': strict mode, docs/theory.md §12)."""

    clipping: ClipNorm | str = ClipNorm.DUAL
    invalid_records: InvalidRecords | str = InvalidRecords.ZERO

    def __post_init__(self) -> None:
        object.__setattr__(self, "clipping", parse_option(ClipNorm, self.clipping, "clipping"))
        object.__setattr__(
            self,
            "invalid_records",
            parse_option(InvalidRecords, self.invalid_records, "invalid_records"),
        )


@dataclass(frozen=True)
class Noise:
    """Where the normals come from: operating-system entropy (default), a user ``seed`` (the
    reproducibility switch: not private against anyone who knows it), or ``secure``: every
    normal from the OS CSPRNG with the release snapped to a grid (docs/theory.md §10a).
    ``enabled=False`` releases the exact mean: a test-only path whose report says NOT PRIVATE."""

    seed: int | None = None
    secure: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed(self.seed))
        if self.secure and self.seed is not None:
            raise InvalidParameterError(
                "secure_noise draws from the operating system's CSPRNG and takes no seed; drop one."
            )


@dataclass(frozen=True)
class StepRule:
    """How a release w_t becomes a step (post-processing with public data, docs/theory.md §9):
    theta <- theta + alpha d_t with d_t = P_t w_t + m alpha_{t-1} d_{t-1} (``momentum`` m in
    [0, 1)); alpha from a line search on public ``validation_data`` (a held-out public split
    when None; ``line_search_size`` examples of it at most), or alpha = 1 at the fixed quadratic
    weight lam = ``prior_weight`` (also pure mode, where lam is not free). A searched step is
    kept only when the validation loss falls by more than ``step_significance`` paired
    standard errors (None: any decrease); a release whose step is not kept is carried into the
    next round's direction (qem.finetune.step, docs/theory.md §9b). ``confirmation_size``: the
    last that many validation examples are kept from the search and the test runs on them."""

    prior_weight: float | None = None
    momentum: float = 0.0
    validation_data: DataLike | None = None
    line_search_size: int | None = None
    step_significance: float | None = 1.0
    confirmation_size: int | None = None

    def __post_init__(self) -> None:
        if self.step_significance is not None:
            check_in_interval("step_significance", self.step_significance, 0.0, 10.0, closed="low")
        if self.prior_weight is not None:
            check_positive("prior_weight lam", self.prior_weight)
        check_in_interval("momentum", self.momentum, 0.0, 1.0, closed="low")
        if self.line_search_size is not None:
            check_count("line_search_size", self.line_search_size)
        if self.confirmation_size is not None:
            check_count("confirmation_size", self.confirmation_size)

    def searches(self, mode: str) -> bool:
        """Whether the step length is searched (Gaussian-DP mode without a fixed lam)."""
        return mode == "gdp" and self.prior_weight is None

    def weight(self, mode: str) -> float:
        """lam of the mechanism: 1 when the step length is searched (the release at lam is the
        release at 1 divided by lam, §9), else ``prior_weight`` (default 1)."""
        return 1.0 if self.searches(mode) else float(self.prior_weight or 1.0)


@dataclass(frozen=True)
class Performance:
    """How the work runs; no flag here changes a release (up to float rounding of batched
    kernels): ``batch_size`` of every pass, ``device`` ("cpu", "cuda", "auto"; None: the model's
    own), ``distributed`` ("auto" | True | False, qem.distributed) and ``progress`` bars."""

    batch_size: int = 256
    device: str | torch.device | None = None
    distributed: bool | str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        check_count("batch_size", self.batch_size)
