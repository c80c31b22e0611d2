"""The record of a run: every release as it is drawn, each round's public record, and the
privacy report (qem.report.PrivacyReport) and result they make. A partial result (an error or an
interrupt after a draw) holds every release drawn so far, its pending step at length 0."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from torch import nn

import qem
from qem.finetune.config import Noise
from qem.finetune.result import FineTuneResult
from qem.mechanism import QuadraticExponentialMechanism
from qem.privacy.gdp import gdp_epsilon
from qem.privacy.ledger import PrivacyLedger, spent_epsilon
from qem.privacy.sensitivity import ClipNorm
from qem.public.side import PublicSideState, RoundPublic
from qem.report import Diagnostics, PrivacyReport, RoundRecord
from qem.schedules import Plan, Round
from qem.statistics import InvalidRecords


@dataclass
class RunRecord:
    """What a run has released so far (the releases, each round's public record, the ledger)
    and the report and result they make, partial while rounds are pending."""

    plan: Plan
    ledger: PrivacyLedger
    clipping: ClipNorm
    damping: float
    noise: Noise
    invalid: InvalidRecords
    validation_source: dict
    momentum: float = 0.0
    world_size: int = 1
    resample_every: int | None = None
    noise_source: dict | None = None
    epsilons: dict[int, float] = field(default_factory=dict)
    releases: list[np.ndarray] = field(default_factory=list)
    previews: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)

    def __post_init__(self) -> None:
        self.diagnostics.seed = self.noise.seed

    def accountant_epsilon_upfront(self) -> float:
        """The accountant's epsilon of the whole planned run, computed from public numbers
        before any private data is read, so that an accounting failure cannot lose a
        release."""
        return self.spent(self.plan.schedule.total_rounds)

    def spent(self, completed: int) -> float:
        """``spent_epsilon`` of the first ``completed`` rounds, computed once per count."""
        if completed not in self.epsilons:
            self.epsilons[completed] = spent_epsilon(self.plan, completed)
        return self.epsilons[completed]

    def add_release(
        self,
        executed: Round,
        w: np.ndarray,
        public: RoundPublic,
        preview: dict,
        mechanism: QuadraticExponentialMechanism,
        lam: float,
    ) -> None:
        """Record round ``executed``'s release (its step is still pending)."""
        self.releases.append(np.asarray(w, dtype=np.float64).copy())
        self.previews.append(preview)
        self.pending.append(
            {
                "round": executed.index + 1,
                "epoch": executed.epoch + 1,
                "N": executed.N,
                "noise_multiplier": executed.noise_multiplier,
                "mu": preview.get("mu"),
                "epsilon": executed.epsilon,
                "beta": mechanism.beta,
                "lam": lam,
                "clip_norm": float(public.clip_norm),
                "clip_norm_source": public.clip_norm_source,
                "subspace_seed": public.basis.seed,
                "preview": preview,
                "snapping": mechanism.noise_info()["snapping"],
            }
        )
        if self.noise_source is None:
            info = mechanism.noise.describe()
            info.pop("seed")  # a seed is a diagnostic (diagnostics.json), never publishable
            self.noise_source = {
                "source": info.pop("seed_source"),
                **info,
                "round_seeds": "numpy SeedSequence(the user's seed).spawn(T + 1): child t for "
                "round t's noise, child T for Poisson sampling (the seed is in diagnostics.json, "
                "not here: anyone who knows it can regenerate the noise)"
                if self.noise.seed is not None
                else None,
                "snapped": mechanism.snap,
            }

    def finish_round(
        self, alpha: float, val_loss: float | None, releases: int, seconds: dict, invalid: int
    ) -> None:
        """Record the step taken with the pending release, and the round's diagnostics: its
        timings and how many of its private records were invalid (for the curator only)."""
        self.diagnostics.invalid_records.append(invalid)
        entry = self.pending.pop()
        self.records.append(
            RoundRecord(
                **entry,
                step_length=float(alpha),
                public_validation_loss=val_loss,
                releases_in_step=int(releases),
            )
        )
        self.diagnostics.round_seconds.append(seconds)
        for phase, value in seconds.items():
            self.diagnostics.seconds[phase] = self.diagnostics.seconds.get(phase, 0.0) + value

    def result(self, model: nn.Module, public: PublicSideState, *, done: bool) -> FineTuneResult:
        """The run so far as a FineTuneResult (a partial one while rounds are pending: their
        releases are included, with step length 0 since no step was applied)."""
        records = list(self.records) + [
            RoundRecord(**entry, step_length=0.0, public_validation_loss=None)
            for entry in self.pending
        ]
        report = self._report(records, public, done)
        return FineTuneResult(
            model=copy.deepcopy(model) if not done else model,
            report=report,
            preview=list(self.previews),
            diagnostics=self.diagnostics,
            releases=list(self.releases),
        )

    def _unapplied(self, records: list[RoundRecord]) -> int:
        """Releases no step has applied yet: those carried out of the last round whose step
        was 0 (each earlier zero-step release went into a later step), and pending ones."""
        finished = self.records
        carried = finished[-1].releases_in_step if finished and finished[-1].step_length == 0 else 0
        return carried + len(records) - len(finished)

    def _noise_description(self) -> dict:
        """Where the normals came from (the first round's source; every round uses the same
        kind). The test-only exact-mean path says NOT PRIVATE."""
        if not self.noise.enabled:
            return {"source": "DISABLED (test-only path): NOT PRIVATE"}
        return dict(self.noise_source)

    def _report(
        self, records: list[RoundRecord], public: PublicSideState, done: bool
    ) -> PrivacyReport:
        budget, plan, basis = self.plan.budget, self.plan, public.basis
        mode = budget.mode
        mu = plan.mu_after(len(records))
        if mu is not None:
            guarantee = (
                f"{mu:.6g}-GDP (Dong, Roth & Su 2022) for {budget.adjacency.value} neighbours, "
                f"hence ({gdp_epsilon(mu, budget.delta):.6g}, {budget.delta:.3g})-DP by its exact "
                "privacy profile (Balle & Wang 2018)"
            )
        elif mode == "gdp":
            guarantee = (
                f"({self.spent(len(records)):.6g}, {budget.delta:.3g})-DP for "
                f"{budget.adjacency.value} neighbours by dp-accounting's PLD accountant "
                "(Poisson-subsampled Gaussian rounds)"
            )
        else:
            guarantee = (
                f"pure {self.spent(len(records)):.6g}-DP for {budget.adjacency.value} neighbours: "
                "exponential mechanism restricted to {w : ||w||_A <= R} (McSherry & Talwar "
                "2007), basic composition; the number of rejections is a timing side channel"
            )
        if self.noise.seed is not None and self.noise.enabled:
            guarantee += (
                "; REPRODUCIBLE RUN: the noise was drawn from a user seed, so the release is NOT "
                "private against anyone who knows the seed"
            )
        if not done:
            guarantee = f"PARTIAL RUN ({len(records)} round(s) released): " + guarantee
        steps = [r.step_length for r in records]
        return PrivacyReport(
            qem_version=qem.__version__,
            guarantee=guarantee,
            mode=mode,
            adjacency=budget.adjacency.value,
            clipping=self.clipping.value,
            epsilon=budget.epsilon,
            delta=budget.delta if mode == "gdp" else 0.0,
            mu=mu,
            accountant=self.ledger.report_block(
                "dp_accounting PLD" if mode == "gdp" else "basic composition",
                epsilon=self.spent(len(records)),
                delta=budget.delta if mode == "gdp" else 0.0,
            ),
            schedule=plan.describe(),
            N=plan.N,
            lam=records[0].lam,
            gamma=self.damping,
            k=basis.k,
            C=[r.clip_norm for r in records],
            subspace={**basis.describe(), "resample_every": self.resample_every},
            curvature=public.curvature_description,
            validation=self.validation_source,
            rounds=records,
            step_lengths=steps,
            zero_step_rounds=sum(1 for s in steps[: len(self.records)] if s == 0.0),
            unapplied_releases=self._unapplied(records),
            noise=self._noise_description(),
            invalid_records=self.invalid.value,
            momentum=self.momentum,
            world_size=self.world_size,
        )
