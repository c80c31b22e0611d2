"""The high-level call: model + loss + public data + private data + budget ->
FineTuneResult(model, report, preview, diagnostics, releases).

A run is a schedule of rounds (qem.schedules, docs/theory.md §8 and §13). Round t:
  1. public side:  the subspace P_t (a public seed), the public quadratic
                   A_t = P_t^T H0 P_t + gamma I on public data, factored once
                   (PublicQuadratic), and the clip bound C_t (given, or a quantile of PUBLIC
                   per-example gradient norms); a public curvature pass every
                   ``curvature_every`` rounds (K-FAC: its factors, projected into every
                   round's subspace without a data pass; other curvatures: A itself, kept
                   while the subspace does not change);
  2. private pass: sum_{i in B_t} gh_i over the rows the schedule gives the round;
  3. mechanism:    w ~ Normal(-(N_t lam A)^-1 sum gh, (beta_t N_t lam A)^-1) with
                   beta_t = N_t lam / (z b)^2, z the schedule's noise multiplier;
  4. step:         theta <- theta + alpha P_t w, alpha chosen by a line search on PUBLIC
                   validation data (free post-processing, §9) unless ``prior_weight`` is given.
Every forward pass runs on a copy of the caller's model in eval mode: the caller's model and
every buffer of the released model equal the input's. Everything round t uses besides the
private gradients is public or an earlier release, so the composition of §8/§13 holds.

Devices: every pass moves its batches to the model's device (``device`` moves the copy there
first); the k x k side (A, its Cholesky factor, the clipped sums, the noise) is float64 on the
CPU (numpy/scipy): each batch's (B, k) projected gradients come back to the CPU as float64,
which costs B k 8 bytes per batch and keeps the privacy-critical arithmetic on one exact path.

Several processes (qem.distributed, docs/theory.md §16): under an initialised
``torch.distributed`` group each rank reads its shard of the private rows (step 2), the sums
are all-reduced in float64, and rank 0 alone computes the public side of step 1, draws the noise
of step 3 and takes step 4; what it computes is broadcast, so every rank ends with the same
model and report. Only rank 0 calls ``on_release``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

import qem
from qem.checks import check_count, check_delta, check_epsilon, check_positive, parse_option
from qem.curvature import KFAC
from qem.curvature.base import Curvature
from qem.curvature.factory import make_curvature
from qem.data import DataLike, as_dataset, batches, known_targets
from qem.distributed import LocalProcess, process_group
from qem.errors import InvalidParameterError, SpentBudgetError
from qem.io import save_run
from qem.labels import check_targets
from qem.linesearch import line_search_step
from qem.losses import check_per_example_loss
from qem.mechanism import QuadraticExponentialMechanism, SecureNoise
from qem.model_calls import call_model, on_model_device, resolve_device
from qem.parameters import Layers, check_finite_parameters
from qem.privacy.gdp import gdp_epsilon
from qem.privacy.ledger import PrivacyLedger, spent_epsilon
from qem.privacy.sensitivity import Adjacency, ClipNorm
from qem.public.clip_norm import public_clip_norm
from qem.quadratic import PublicQuadratic
from qem.report import Diagnostics, PrivacyReport, RoundRecord
from qem.schedules import (
    Budget,
    Plan,
    Round,
    Schedule,
    make_schedule,
    partitioned,
    sequential,
)
from qem.statistics import InvalidRecords, private_gradient_sum
from qem.subspace.base import LossFn, Subspace, add_to_parameters
from qem.subspace.factory import make_subspace
from qem.timing import PhaseTimer

logger = logging.getLogger(__name__)
"""INFO: each round's public summary; DEBUG: its timings (diagnostics, not for publication)."""

HOLDOUT_FRACTION, HOLDOUT_MAX = 0.2, 2000
"""Without validation data, the last min(20%, 2000) public examples are held out for the
line search (public, so free)."""


class ZeroStepWarning(UserWarning):
    """A round's release did not lower the public validation loss and was not applied."""


@dataclass
class FineTuneResult:
    """The fine-tuned model, its privacy report (publishable), the data-free preview of every
    round, the diagnostics (NOT publishable: timings) and the releases w_t themselves."""

    model: nn.Module
    report: PrivacyReport
    preview: list[dict] = field(default_factory=list)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    releases: list[np.ndarray] = field(default_factory=list)

    def save(self, directory: str, overwrite: bool = False) -> None:
        """Write the state dict, privacy_report.json and diagnostics.json together,
        atomically (qem.io)."""
        save_run(
            directory,
            self.model.state_dict(),
            self.report.to_dict(),
            diagnostics=self.diagnostics.to_dict(),
            overwrite=overwrite,
        )


def fine_tune(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    epsilon: float,
    delta: float | None = 1e-5,
    schedule: Schedule | dict | None = None,
    rounds: int = 1,
    resample_subspace: bool = False,
    partition_rounds: bool = False,
    subspace: str | Subspace = "srht",
    k: int | None = None,
    subspace_seed: int = 0,
    layers: Layers | None = None,
    curvature: str | Curvature = "ggn",
    damping: float = 1e-2,
    curvature_every: int = 1,
    clip_norm: float | None = None,
    clip_quantile: float = 0.9,
    clipping: str = "dual",
    prior_weight: float | None = None,
    momentum: float = 0.0,
    mode: str = "gdp",
    adjacency: str = "replace_one",
    N: int | None = None,
    validation_data: DataLike | None = None,
    line_search_size: int | None = None,
    public_sample_size: int | None = None,
    radius: float | None = None,
    seed: int | None = None,
    secure_noise: bool = False,
    invalid_records: str = "zero",
    batch_size: int = 256,
    progress: bool = False,
    on_release: Callable[[FineTuneResult], None] | None = None,
    distributed: bool | str = "auto",
    device: str | torch.device | None = None,
    noise: bool = True,
) -> FineTuneResult:
    """Fine-tune ``model`` on ``private_data`` with a differential-privacy guarantee.

    The returned model is a copy; the input model is not modified (not even its buffers or
    train/eval flag). ``schedule`` (qem.schedules.sequential / partitioned / poisson, or its
    JSON form {"kind": "poisson", "sampling_rate": q, "rounds": T}) says which records each
    round reads and how the budget is spent; without it, ``rounds``, ``resample_subspace`` and
    ``partition_rounds`` build a sequential or partitioned one.
    Data (qem.data): tensors (inputs, targets), inputs possibly a dict of tensors; a dict of
    tensors with "labels"; a map-style Dataset of pairs or dicts; or a DataLoader over one,
    read through its collate_fn in dataset order (its sampler and shuffling are not used). The
    model is called as ``model(x)`` or ``model(**inputs)`` and may return a tensor, a dict
    with "logits" or a Hugging Face ModelOutput (qem.model_calls). Public and validation data
    may also be streams (an IterableDataset), read once into memory; private data must be
    addressable by row.
    ``layers`` (module names and nn.Module types, e.g. ["classifier", nn.Linear]) restricts
    the subspace kind to the chosen modules: 'kronecker' spans their Linear/Conv2d layers, the
    other kinds their trainable parameters; the subspace is rebuilt from the kind and
    ``layers`` whenever a schedule resamples it. Parameters with requires_grad=False are never
    changed.
    ``seed`` makes the noise (and Poisson sampling) reproducible and is recorded as such in
    the report; by default both come from operating-system entropy. ``secure_noise`` draws
    every normal from the operating system's CSPRNG by an inverse CDF and snaps the release to a
    power-of-two grid (docs/theory.md §10a; it takes no seed). ``validation_data`` (public)
    picks each step length; without it a public split is held out. ``line_search_size`` limits
    the line search to that many validation examples, ``public_sample_size`` the curvature and
    clip passes to that many public examples (public: no privacy cost). ``curvature_every`` R:
    one public curvature pass every R rounds (see the module docstring). ``momentum`` m in
    [0, 1) steps along d_t = P_t w_t + m alpha_{t-1} d_{t-1} instead of P_t w_t (heavy ball over
    the releases: post-processing, free). ``invalid_records``
    ('zero' | 'raise') is what the private pass does with a record whose gradient cannot be
    computed (docs/theory.md §12). ``on_release(result)`` is called right after every draw with
    the run so far, so that a caller can save it before anything else can fail; an error after
    a draw raises SpentBudgetError carrying that partial result. ``progress`` shows a bar over the
    rounds ("qem round t/T") above the passes' bars; the ``qem.finetune`` logger records each
    round's public summary at INFO and its timings at DEBUG. ``distributed`` ("auto": when
    an initialised torch.distributed group has more than one rank; True: require a group; False:
    ignore any) runs one release over the ranks of the group (module docstring): give every
    rank the same arguments, private data included (each reads only its shard); only rank 0
    calls ``on_release``, and every rank returns the same model and report. ``device`` ("cpu",
    "cuda", "auto": the GPU when there is one) runs the passes there; by default the model's
    own device. ``noise=False`` exists only
    for tests (it releases the exact mean and the report says so); never use it on real data.
    """
    epsilon = check_epsilon(epsilon)
    if mode not in ("gdp", "pure"):
        raise InvalidParameterError(f"mode must be 'gdp' or 'pure', got {mode!r}.")
    delta = check_delta(delta) if mode == "gdp" else None
    adjacency = parse_option(Adjacency, adjacency, "adjacency")
    clipping = parse_option(ClipNorm, clipping, "clipping")
    invalid = parse_option(InvalidRecords, invalid_records, "invalid_records")
    check_positive("damping gamma", damping, "Typical values are 1e-3 to 1.")
    if prior_weight is not None:
        check_positive("prior_weight lam", prior_weight)
    if not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
        raise InvalidParameterError(f"momentum must lie in [0, 1), got {momentum!r}.")
    curvature_every = check_count("curvature_every", curvature_every)
    schedule = _resolve_schedule(schedule, rounds, resample_subspace, partition_rounds)
    if schedule.resample_every is not None and isinstance(subspace, Subspace):
        raise InvalidParameterError(
            "a schedule that resamples the subspace needs it as a name (e.g. 'kronecker'), not "
            "a built Subspace, so that each round can draw a new one."
        )
    if layers is not None and isinstance(subspace, Subspace):
        raise InvalidParameterError(
            "layers= applies to a subspace given by name; a built Subspace has its layers "
            "already (pass layers to its constructor)."
        )
    check_finite_parameters(model)
    public = as_dataset(public_data, "public data")
    private = as_dataset(private_data, "private data", addressable=True)
    searches = mode == "gdp" and prior_weight is None
    public, validation, validation_source = _validation_split(public, validation_data, searches)
    if line_search_size is not None and validation is not None:
        validation = _head(validation, check_count("line_search_size", line_search_size))
    if public_sample_size is not None:
        public = _head(public, check_count("public_sample_size", public_sample_size))
    if N is None:
        if adjacency is Adjacency.ADD_REMOVE:
            raise InvalidParameterError(
                "add/remove adjacency needs a declared, public dataset size N that does not "
                "depend on the private data; pass N."
            )
        N = len(private)
    N = int(check_positive("N", N))
    budget = Budget(epsilon, delta, mode, adjacency)
    if secure_noise and seed is not None:
        raise InvalidParameterError(
            "secure_noise draws from the operating system's CSPRNG and takes no seed; drop one."
        )
    seeds = SeedTree(seed, schedule.total_rounds)
    plan = schedule.plan(budget, len(private), N, seed=seeds.sampling)
    target = resolve_device(device, model)
    ranks = process_group(distributed)
    ranks.check_agreement(len(private), "the number of private records")
    root = ranks.is_root
    progress = progress and root  # bars, log lines and warnings once, from rank 0

    current = copy.deepcopy(model).to(target).eval()
    _probe_public(current, loss_fn, public, validation)
    ledger = PrivacyLedger(plan)
    run = _Run(
        plan=plan,
        ledger=ledger,
        budget=budget,
        clipping=clipping,
        damping=damping,
        seed=seed,
        noise=noise,
        invalid=invalid,
        validation_source=validation_source,
        momentum=float(momentum),
        world_size=ranks.world_size,
    )
    run.accountant_epsilon_upfront()  # every public computation that can fail, before the data
    curv = (
        curvature
        if isinstance(curvature, Curvature)
        else make_curvature(
            curvature,
            damping,
            batch_size=batch_size,
            progress=progress,
            **({"refresh_every": curvature_every} if curvature == "kfac" else {}),
        )
    )
    reprojects = isinstance(curv, KFAC)  # stored factors, projected into every round's subspace
    basis = subspace if isinstance(subspace, Subspace) else None
    quadratic = C = clip_source = None
    stepper = _Stepper(loss_fn, validation if searches else None, float(momentum))

    total = plan.schedule.total_rounds
    shard = ranks.shard(len(private))
    round_bar = tqdm(plan.rounds(shard), total=total, unit="round", disable=not progress)
    for executed in round_bar:
        clock = PhaseTimer()
        t = executed.index
        round_bar.set_description(f"qem round {t + 1}/{total}")
        if basis is None or (
            not isinstance(subspace, Subspace) and run.subspace_draw != executed.subspace_draw
        ):
            basis = make_subspace(
                subspace, current, k=k, seed=subspace_seed + executed.subspace_draw, layers=layers
            )
            quadratic = None
        run.subspace_draw = executed.subspace_draw
        if quadratic is None or reprojects or t % curvature_every == 0:
            public_side = partial(
                _public_side, curv, current, loss_fn, basis, public, clock, clip_norm,
                quantile=clip_quantile, clipping=clipping, batch_size=batch_size,
            )  # fmt: skip
            quadratic, C = _shared_public_side(ranks, public_side, basis.k)
            run.curvature_description = ranks.json_from_root(curv.describe)
            clock.lap("public_broadcast")
            clip_source = "user" if clip_norm is not None else f"public quantile {clip_quantile}"

        # -- the only step that reads private data -----------------------------------------
        rows = private if executed.rows is None else Subset(private, executed.rows.tolist())
        stats = private_gradient_sum(
            current,
            loss_fn,
            basis,
            rows,
            clip_norm=C,
            clipping=clipping,
            cholesky=quadratic.cholesky,
            batch_size=batch_size,
            invalid_records=invalid,
            # a Poisson round's size is private: no bar that would display it
            progress=progress and plan.schedule.kind != "poisson",
            all_reduce=ranks.all_reduce_sum,
        )
        clock.lap("private_pass")
        lam = 1.0 if (mode == "gdp" and prior_weight is None) else float(prior_weight or 1.0)
        mechanism = QuadraticExponentialMechanism(
            quadratic,
            N=executed.N,
            lam=lam,
            clip_norm=C,
            adjacency=adjacency,
            clipping=clipping,
            mode=mode,
            radius=radius,
            seed=seeds.noise[t],
            noise=SecureNoise() if secure_noise else None,
        )
        if mode == "gdp":
            preview = mechanism.set_noise_multiplier(executed.noise_multiplier).to_dict()
        else:
            preview = mechanism.calibrate(executed.epsilon).to_dict()
        # the noise is drawn once, on rank 0 alone, and the release broadcast
        draw = partial(mechanism.sample if noise else mechanism.mean, stats.gradient_sum)
        w = ranks.from_root(draw if root else None, basis.k)
        del stats  # nothing private outlives the draw
        ledger.record(executed)
        clock.lap("mechanism")
        run.add_release(executed, w, basis, preview, mechanism, C, clip_source, lam)
        if on_release is not None and root:
            on_release(run.result(current, curv, basis, done=False))

        # -- post-processing with public data (rank 0; the step is broadcast) -------------
        try:
            take_step = partial(stepper.step, current, basis, w)
            alpha, val_loss = ranks.from_root(take_step if root else None, 2).tolist()
            val_loss = None if np.isnan(val_loss) else val_loss
            ranks.broadcast_parameters(current, basis.parameter_names)
        except Exception as error:
            raise SpentBudgetError(
                f"round {t + 1} failed after its noise was drawn ({error}); the budget of "
                f"{ledger.completed} round(s) is spent. The error's .result holds the releases: "
                "save it (result.save(directory)) rather than rerunning.",
                run.result(current, curv, basis, done=False),
            ) from error
        clock.lap("line_search")
        run.finish_round(alpha, val_loss, clock.seconds)
        if not root:
            continue
        _log_round(run.records[-1], total, clock.seconds)
        if alpha == 0.0 and searches:
            warnings.warn(
                _zero_step_message(t + 1, validation_source), ZeroStepWarning, stacklevel=2
            )
    return run.result(current, curv, basis, done=True)


def _public_side(
    curvature: Curvature,
    model: nn.Module,
    loss_fn: LossFn,
    basis: Subspace,
    public: Dataset,
    clock: PhaseTimer,
    clip_norm: float | None,
    **clip_options,
) -> tuple[PublicQuadratic, float]:
    """Step 1 of a round: the public quadratic A (factored) and the clip norm C, given or a
    quantile of public gradient norms (``clip_options``: quantile, clipping, batch_size)."""
    quadratic = curvature.quadratic(model, loss_fn, basis, public)
    clock.lap("curvature")
    if clip_norm is not None:
        return quadratic, float(clip_norm)
    C = public_clip_norm(model, loss_fn, basis, public, cholesky=quadratic.cholesky, **clip_options)
    clock.lap("clip_norm")
    return quadratic, C


@dataclass
class _Stepper:
    """Step 4 of a round, post-processing on public data: theta <- theta + alpha d with
    d = P w (+ m alpha_{t-1} d_{t-1} with momentum m) and alpha from the line search on
    ``validation`` (from the previous positive step), or alpha = 1 without one."""

    loss_fn: LossFn
    validation: Dataset | None
    momentum: float
    previous_step: float = 1.0
    velocity: dict[str, torch.Tensor] | None = None

    def step(self, model: nn.Module, basis: Subspace, w: np.ndarray) -> np.ndarray:
        """Apply the step to ``model``; return [alpha, public validation loss (NaN without a
        search)]."""
        step = basis.direction(model, torch.as_tensor(w, dtype=torch.float64))
        if self.momentum and self.velocity is not None:
            step = {n: d + self.momentum * self.velocity.get(n, 0.0) for n, d in step.items()}
        if self.validation is not None:
            alpha, val_loss, _ = line_search_step(
                model, self.loss_fn, step, self.validation, start=self.previous_step
            )
        else:
            alpha, val_loss = 1.0, math.nan
        add_to_parameters(model, step, alpha)
        self.velocity = {name: alpha * d for name, d in step.items()}
        self.previous_step = alpha if alpha > 0 else self.previous_step
        return np.array([alpha, val_loss])


def _shared_public_side(
    ranks: LocalProcess, compute: Callable[[], tuple[PublicQuadratic, float]], k: int
) -> tuple[PublicQuadratic, float]:
    """The public quadratic and clip norm, computed by ``compute`` on rank 0 and broadcast
    (A, its Cholesky factor, lambda_min(A), C: qem.distributed says why rather than computed
    on every rank)."""
    if ranks.world_size == 1:
        return compute()

    def packed() -> np.ndarray:
        quadratic, C = compute()
        return np.concatenate(
            [quadratic.A.ravel(), quadratic.cholesky.ravel(), [quadratic.lambda_min, C]]
        )

    values = ranks.from_root(packed if ranks.is_root else None, 2 * k * k + 2)
    A, L = values[: k * k].reshape(k, k), values[k * k : 2 * k * k].reshape(k, k)
    return PublicQuadratic(A, L, float(values[-2])), float(values[-1])


def _resolve_schedule(
    schedule: Schedule | dict | None, rounds: int, resample_subspace: bool, partition_rounds: bool
) -> Schedule:
    """``schedule`` itself, or the one the shortcuts describe."""
    if schedule is not None:
        schedule = make_schedule(schedule)
        if rounds != 1 or resample_subspace or partition_rounds:
            raise InvalidParameterError(
                "give either schedule= or the shortcuts rounds=/resample_subspace=/"
                "partition_rounds=, not both."
            )
        return schedule
    rounds = check_count("rounds", rounds)
    if partition_rounds:
        return partitioned(rounds, resample_subspace=resample_subspace)
    return sequential(rounds, resample_subspace=resample_subspace)


def _head(data: Dataset, size: int) -> Dataset:
    return data if size >= len(data) else Subset(data, range(size))


def _validation_split(
    public: Dataset, validation_data: DataLike | None, searches: bool
) -> tuple[Dataset, Dataset | None, dict]:
    """(public for the passes, validation for the line search, its description). Without
    validation data and with a line search to run, a public split is held out."""
    if validation_data is not None:
        validation = as_dataset(validation_data, "validation data")
        return public, validation, {"source": "user", "n": len(validation)}
    if not searches:
        return public, None, {"source": "none (no line search: prior_weight or pure mode)", "n": 0}
    n = len(public)
    held = min(HOLDOUT_MAX, int(n * HOLDOUT_FRACTION))
    if held < 1:
        raise InvalidParameterError(
            f"the public data has {n} examples, too few to hold out a validation split for the "
            "step line search; pass validation_data (public) or prior_weight."
        )
    return (
        Subset(public, range(n - held)),
        Subset(public, range(n - held, n)),
        {"source": f"held-out public split (the last {held} of {n} public examples)", "n": held},
    )


def _probe_public(model: nn.Module, loss_fn: LossFn, public: Dataset, validation: Dataset) -> None:
    """Shape, label and loss checks on PUBLIC examples (never on private ones): a bad private
    record is handled by the invalid-record policy, not by an error naming it."""
    probe_x, probe_y = on_model_device(model, *next(iter(batches(public, 2))))
    with torch.no_grad():
        outputs = call_model(model, probe_x)
    for data in (public, validation):
        targets = None if data is None else known_targets(data)
        if targets is not None:
            check_targets(outputs, targets)
    check_per_example_loss(loss_fn, outputs, probe_y)


def _log_round(record: RoundRecord, total: int, seconds: dict[str, float]) -> None:
    """Round summary at INFO, from public values only (N_t is the schedule's public weight,
    never a Poisson round's realised size); its timings at DEBUG, as diagnostics."""
    privacy = (
        f"z = {record.noise_multiplier:.4g}"
        if record.noise_multiplier is not None
        else f"epsilon_t = {record.epsilon:.4g}"
    )
    logger.info(
        "round %d/%d: N_t = %.6g, %s, clip norm C = %.4g, step length %.4g",
        record.round,
        total,
        record.N,
        privacy,
        record.clip_norm,
        record.step_length,
    )
    logger.debug(
        "round %d seconds per phase (diagnostics, not for publication: timings of the private "
        "pass depend on the private data): %s",
        record.round,
        ", ".join(f"{phase} {value:.3g}" for phase, value in seconds.items()),
    )


def _zero_step_message(round_number: int, validation_source: dict) -> str:
    causes = [
        "the budget is too small for the number of private records (the release is mostly "
        "noise: try a larger epsilon, fewer rounds, or a schedule with fewer, larger rounds)",
        "the clip norm (a public quantile may clip nearly every private gradient, or too few)",
        "validation data unlike the private data (the step is scored on public validation data)",
    ]
    if validation_source["source"] != "user":
        causes.append(
            "the validation split is held out from the public data the model was pretrained "
            "on, where theta0 is already near the minimum: pass validation_data resembling the "
            "private data"
        )
    return (
        f"round {round_number}: the release did not lower the public validation loss, so its "
        "step length is 0 and the model is unchanged by it (its budget is spent all the same). "
        "Likely causes: " + "; ".join(causes) + "."
    )


class SeedTree:
    """Independent streams from one user seed (numpy SeedSequence children): ``noise[t]``
    for round t's Normal draw, ``sampling`` for the Poisson inclusions; all None
    (operating-system entropy) without a seed."""

    def __init__(self, seed: int | None, rounds: int) -> None:
        if seed is None:
            self.noise: list[int | None] = [None] * rounds
            self.sampling: int | None = None
            return
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise InvalidParameterError(f"seed must be None or an integer >= 0, got {seed!r}.")
        children = np.random.SeedSequence(int(seed)).spawn(rounds + 1)
        values = [int(c.generate_state(1)[0]) for c in children]
        self.noise, self.sampling = values[:rounds], values[rounds]


@dataclass
class _Run:
    """What a run has released so far, and its report."""

    plan: Plan
    ledger: PrivacyLedger
    budget: Budget
    clipping: ClipNorm
    damping: float
    seed: int | None
    noise: bool
    invalid: InvalidRecords
    validation_source: dict
    momentum: float = 0.0
    world_size: int = 1
    curvature_description: dict | None = None
    subspace_draw: int = -1
    noise_source: dict | None = None
    epsilons: dict[int, float] = field(default_factory=dict)
    releases: list[np.ndarray] = field(default_factory=list)
    previews: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)

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
        basis: Subspace,
        preview: dict,
        mechanism: QuadraticExponentialMechanism,
        C: float,
        clip_source: str,
        lam: float,
    ) -> None:
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
                "clip_norm": float(C),
                "clip_norm_source": clip_source,
                "subspace_seed": basis.seed,
                "preview": preview,
                "snapping": mechanism.noise_info()["snapping"],
            }
        )
        if self.noise_source is None:
            info = mechanism.noise.describe()
            info.pop("seed")  # a round's own child seed; the report records the user's seed
            self.noise_source = {
                "source": info.pop("seed_source"),
                "seed": self.seed,
                **info,
                "round_seeds": "numpy SeedSequence(seed).spawn(T + 1): child t for round t's "
                "noise, child T for Poisson sampling"
                if self.seed is not None
                else None,
                "snapped": mechanism.snap,
            }

    def finish_round(self, alpha: float, val_loss: float | None, seconds: dict) -> None:
        entry = self.pending.pop()
        self.records.append(
            RoundRecord(**entry, step_length=float(alpha), public_validation_loss=val_loss)
        )
        self.diagnostics.round_seconds.append(seconds)
        for phase, value in seconds.items():
            self.diagnostics.seconds[phase] = self.diagnostics.seconds.get(phase, 0.0) + value

    def result(
        self, model: nn.Module, curvature: Curvature, basis: Subspace, *, done: bool
    ) -> FineTuneResult:
        """The run so far as a FineTuneResult (a partial one while rounds are pending: their
        releases are included, with step length 0 since no step was applied)."""
        records = list(self.records) + [
            RoundRecord(**entry, step_length=0.0, public_validation_loss=None)
            for entry in self.pending
        ]
        report = self._report(records, curvature, basis, done)
        return FineTuneResult(
            model=copy.deepcopy(model) if not done else model,
            report=report,
            preview=list(self.previews),
            diagnostics=self.diagnostics,
            releases=list(self.releases),
        )

    def _noise_description(self) -> dict:
        """Where the normals came from (the first round's source; every round uses the same
        kind). The test-only exact-mean path says NOT PRIVATE."""
        if not self.noise:
            return {"source": "DISABLED (test-only path): NOT PRIVATE", "seed": self.seed}
        return dict(self.noise_source)

    def _report(
        self, records: list[RoundRecord], curvature: Curvature, basis: Subspace, done: bool
    ) -> PrivacyReport:
        budget, plan = self.budget, self.plan
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
            accountant={
                "name": "dp_accounting PLD" if mode == "gdp" else "basic composition",
                "epsilon": self.spent(len(records)),
                "delta": budget.delta if mode == "gdp" else 0.0,
                **self.ledger.to_dict(),
            },
            schedule=plan.describe(),
            N=plan.N,
            lam=records[0].lam,
            gamma=self.damping,
            k=basis.k,
            C=[r.clip_norm for r in records],
            subspace={**basis.describe(), "resample_every": plan.schedule.resample_every},
            curvature=self.curvature_description or curvature.describe(),
            validation=self.validation_source,
            rounds=records,
            step_lengths=steps,
            zero_step_rounds=sum(1 for s in steps[: len(self.records)] if s == 0.0),
            noise=self._noise_description(),
            invalid_records=self.invalid.value,
            momentum=self.momentum,
            world_size=self.world_size,
        )
