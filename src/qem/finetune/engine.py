"""The round engine (docs/theory.md §8, §13): the loop of a run and nothing else. Round t:

  1. public side   the subspace P_t, the factored public quadratic A_t and the clip norm C_t,
                   each on its own cadence (qem.public.side);
  2. private pass  sum_{i in B_t} gh_i over the rows the schedule gives the round, the only
                   step that reads private data (qem.statistics);
  3. mechanism     w_t ~ Normal(-(N_t lam A_t)^-1 sum gh, (beta_t N_t lam A_t)^-1) with
                   beta_t = N_t lam / (z C_t)^2, z the schedule's noise multiplier (or the
                   pure-mode calibration of epsilon_t), drawn once;
  4. ledger        the round's privacy cost is recorded as soon as its noise is drawn, and the
                   release is handed to ``on_release`` before anything else can fail;
  5. step          theta <- theta + alpha P_t w_t (qem.finetune.step: post-processing with public
                   data), then the round's public record.

Every forward pass runs on a copy of the caller's model in eval mode. Everything round t uses
besides the private gradients is public or an earlier release, so the composition holds.
Under a process group (qem.distributed, docs/theory.md §16) each rank reads its shard in step 2,
the sums are all-reduced in float64, and rank 0 alone computes the public side, draws the noise
and takes the step; what it computes is broadcast, so every rank ends with the same model and
report. Only rank 0 calls ``on_release``, logs and warns.

Devices: every pass moves its batches to the model's device; the k x k side (A, its Cholesky
factor, the clipped sums, the noise) is float64 on the CPU.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
from torch import nn
from torch.utils.data import Subset

from qem.data import DataLike
from qem.defaults import default_schedule
from qem.distributed import process_group
from qem.errors import PrivacyWarning, SpentBudgetError
from qem.finetune.config import Noise, Performance, PrivatePass, StepRule
from qem.finetune.inputs import RunData
from qem.finetune.preflight import preflight
from qem.finetune.record import RunRecord
from qem.finetune.result import FineTuneResult, InvalidRecordsWarning, ZeroStepWarning
from qem.finetune.round_log import invalid_records_message, log_round, zero_step_message
from qem.finetune.step import Stepper
from qem.losses import LossFn
from qem.mechanism import QuadraticExponentialMechanism, SecureNoise
from qem.model_calls import resolve_device
from qem.parameters import check_finite_parameters
from qem.per_example import shared_machine_threads
from qem.privacy.budget import Budget
from qem.privacy.ledger import PrivacyLedger
from qem.progress import progress_bar
from qem.public.config import PublicSide
from qem.public.side import PublicSideState, RoundPublic
from qem.schedules import Round, Schedule, make_schedule
from qem.seeds import SeedTree
from qem.statistics import GradientStatistics, private_gradient_sum
from qem.timing import PhaseTimer


def run_rounds(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    budget: Budget,
    schedule: Schedule | None = None,
    public: PublicSide | None = None,
    private: PrivatePass | None = None,
    noise: Noise | None = None,
    step: StepRule | None = None,
    performance: Performance | None = None,
    on_release: Callable[[FineTuneResult], None] | None = None,
) -> FineTuneResult:
    """Fine-tune ``model`` on ``private_data`` under ``budget`` by the rounds of ``schedule``
    (None: qem.defaults.default_schedule for the public dataset size N and the mode),
    from the configuration objects (qem.finetune.config; ``fine_tune`` is the keyword facade
    over this). Everything that can fail without reading private data fails here, first."""
    engine = RoundEngine(
        model, loss_fn, public_data, private_data, budget, schedule,
        public or PublicSide(), private or PrivatePass(), noise or Noise(), step or StepRule(),
        performance or Performance(), on_release,
    )  # fmt: skip
    return engine.run()


class RoundEngine:
    """One run: the set-up that reads no private data (``__init__``), then the rounds (``run``)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        public_data: DataLike,
        private_data: DataLike,
        budget: Budget,
        schedule: Schedule | None,
        public: PublicSide,
        private: PrivatePass,
        noise: Noise,
        step: StepRule,
        performance: Performance,
        on_release: Callable[[FineTuneResult], None] | None,
    ) -> None:
        check_finite_parameters(model)
        public = public.for_model(model)  # subspace "auto": Kronecker where it spans the model
        if noise.seed is not None and noise.enabled:
            warnings.warn(
                f"seed={noise.seed}: the noise (and Poisson sampling) is reproducible, so the "
                "release is NOT private against anyone who knows the seed; the report says so, "
                "and the seed is kept in diagnostics.json only. Drop the seed for a private run.",
                PrivacyWarning,
                stacklevel=4,
            )
        self.searches = step.searches(budget.mode)
        self.data = RunData.build(
            public_data, private_data, step.validation_data, searches=self.searches,
            line_search_size=step.line_search_size, public_sample_size=public.public_sample_size,
            confirmation_size=step.confirmation_size,
        )  # fmt: skip
        if schedule is None:
            public_size = budget.for_records(len(self.data.private)).N  # add/remove: declared N
            schedule = make_schedule(default_schedule(public_size, budget.mode))
        redraw_every = public.redraw_every(schedule.same_records_every_round)
        self.seeds = SeedTree(noise.seed, schedule.total_rounds)
        self.plan = schedule.plan(budget, len(self.data.private), seed=self.seeds.sampling)
        self.budget, self.private, self.noise, self.on_release = (
            self.plan.budget, private, noise, on_release
        )  # fmt: skip
        self.loss_fn, self.lam = loss_fn, step.weight(budget.mode)
        self.group = process_group(performance.distributed)
        self.group.check_agreement(len(self.data.private), "the number of private records")
        self.progress = performance.progress and self.group.is_root
        self.batch_size = performance.batch_size
        target = resolve_device(performance.device, model)
        self.model = copy.deepcopy(model).to(target).eval()
        preflight(self.model, loss_fn, self.data)
        self.ledger = PrivacyLedger(self.plan)
        self.record = RunRecord(
            plan=self.plan, ledger=self.ledger, clipping=private.clipping, damping=public.damping,
            noise=noise, invalid=private.invalid_records,
            validation_source=self.data.validation_source, momentum=float(step.momentum),
            world_size=self.group.world_size, resample_every=redraw_every,
        )  # fmt: skip
        self.record.accountant_epsilon_upfront()  # an accounting failure cannot lose a release
        self.public_side = PublicSideState(
            public, loss_fn, self.data.public, redraw_every=redraw_every,
            clipping=private.clipping, batch_size=self.batch_size, progress=self.progress,
        )  # fmt: skip
        validation = self.data.validation if self.searches else None
        self.stepper = Stepper(
            loss_fn, validation, float(step.momentum), step.step_significance,
            confirmation=self.data.confirmation if self.searches else None,
        )  # fmt: skip

    def run(self) -> FineTuneResult:
        """The rounds, in order (module docstring); the whole run's result."""
        total = self.plan.schedule.total_rounds
        shard = self.group.shard(len(self.data.private))
        rounds = progress_bar(
            self.plan.rounds(shard), total=total, unit="round", enabled=self.progress, leave=True
        )
        for executed in rounds:
            rounds.set_description(f"qem round {executed.index + 1}/{total}")
            with shared_machine_threads():  # the cores other processes leave free
                self._round(executed, total)
        if self.group.is_root:
            self._warn_once()
        return self.record.result(self.model, self.public_side, done=True)

    def _round(self, executed: Round, total: int) -> None:
        """One round: the five steps of the module docstring, in order."""
        timer = PhaseTimer()
        public = self.public_side.prepare(executed.index, self.model, timer, self.group)
        statistics = self._private_pass(executed, public)
        timer.lap("private_pass")
        mechanism, preview = self._mechanism(executed, public)
        w = self._draw(mechanism, statistics, public.basis.k)
        invalid = statistics.invalid_count  # for the curator's diagnostics only
        del statistics  # nothing private outlives the draw
        self.ledger.record(executed)
        timer.lap("mechanism")
        self.record.add_release(executed, w, public, preview, mechanism, self.lam)
        if self.on_release is not None and self.group.is_root:
            self.on_release(self.record.result(self.model, self.public_side, done=False))
        alpha, val_loss, releases = self._step(executed, public, w)
        timer.lap("line_search")
        self.record.finish_round(alpha, val_loss, releases, timer.seconds, invalid)
        if self.group.is_root:
            log_round(self.record.records[-1], total, timer.seconds)

    def _private_pass(self, executed: Round, public: RoundPublic) -> GradientStatistics:
        """Step 2, the only one that reads private data: the clipped sum over the round's rows
        (this rank's shard of them), all-reduced over the ranks."""
        private = self.data.private
        rows = private if executed.rows is None else Subset(private, executed.rows.tolist())
        return private_gradient_sum(
            self.model, self.loss_fn, public.basis, rows, clip_norm=public.clip_norm,
            clipping=self.private.clipping, cholesky=public.quadratic.cholesky,
            batch_size=self.batch_size, invalid_records=self.private.invalid_records,
            # a Poisson round's size is private: no bar that would display it
            progress=self.progress and not self.plan.schedule.private_round_sizes,
            all_reduce=self.group.all_reduce_sum,
        )  # fmt: skip

    def _draw(
        self, mechanism: QuadraticExponentialMechanism, statistics: GradientStatistics, k: int
    ) -> np.ndarray:
        """Step 3's draw, once, on rank 0 alone; the release is broadcast."""
        draw = mechanism.sample if self.noise.enabled else mechanism.mean
        compute = (lambda: draw(statistics.gradient_sum)) if self.group.is_root else None
        return self.group.from_root(compute, k)

    def _mechanism(
        self, executed: Round, public: RoundPublic
    ) -> tuple[QuadraticExponentialMechanism, dict]:
        """Step 3's mechanism for round ``executed``, calibrated, and its data-free preview."""
        budget = self.budget
        mechanism = QuadraticExponentialMechanism(
            public.quadratic, N=executed.N, lam=self.lam, clip_norm=public.clip_norm,
            adjacency=budget.adjacency, clipping=self.private.clipping, mode=budget.mode,
            radius=budget.radius, seed=self.seeds.noise[executed.index],
            noise=SecureNoise() if self.noise.secure else None,
        )  # fmt: skip
        if budget.mode == "gdp":
            return mechanism, mechanism.set_noise_multiplier(executed.noise_multiplier).to_dict()
        return mechanism, mechanism.calibrate(executed.epsilon).to_dict()

    def _step(
        self, executed: Round, public: RoundPublic, w: np.ndarray
    ) -> tuple[float, float | None, int]:
        """Step 5 on rank 0, broadcast; an error raises SpentBudgetError with the run so far."""
        try:
            alpha, val_loss, releases = self.group.from_root(
                (lambda: self.stepper.step(self.model, public.basis, w))
                if self.group.is_root
                else None,
                3,
            ).tolist()
            self.group.broadcast_parameters(self.model, public.basis.parameter_names)
        except Exception as error:
            raise SpentBudgetError(
                f"round {executed.index + 1} failed after its noise was drawn ({error}); the "
                f"budget of {self.ledger.completed} round(s) is spent. The error's .result holds "
                "the releases: save it (result.save(directory)) rather than rerunning.",
                self.record.result(self.model, self.public_side, done=False),
            ) from error
        return alpha, None if np.isnan(val_loss) else val_loss, int(releases)

    def _warn_once(self) -> None:
        """At the end of the run, one warning per kind: the rounds whose release was not applied
        (step length 0), and the private records that were invalid (their count is shown to the
        person running qem, who holds the data, and written to diagnostics.json; it is never
        part of the privacy report)."""
        zero = [r.round for r in self.record.records if r.step_length == 0.0]
        if zero and self.searches:
            message = zero_step_message(zero, len(self.record.records), self.data.validation_source)
            warnings.warn(message, ZeroStepWarning, stacklevel=5)  # the caller of fine_tune
        invalid = self.record.diagnostics.invalid_records
        if any(invalid):
            warnings.warn(invalid_records_message(invalid), InvalidRecordsWarning, stacklevel=5)
