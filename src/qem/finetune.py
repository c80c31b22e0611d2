"""The high-level call (DESIGN.md §2 `finetune`): model + loss + public data + private data +
budget -> FineTuneResult(model, report, preview).

One round (DESIGN.md §1):
  1. public pass:  A = P^T H0 P + gamma I at the current parameters (qem.curvature);
  2. clip bound:   C given, or a quantile of PUBLIC per-example gradient norms;
  3. private pass: sum_i gh_i (qem.statistics);
  4. mechanism:    w ~ Normal(-(N lam A)^-1 sum gh, (beta N lam A)^-1) (qem.mechanism);
  5. step:         theta <- theta + alpha P w.
In Gaussian-DP mode the draw is made at lam = 1 and alpha is chosen afterwards by a line
search on public validation data (§1e: post-processing, free) unless ``prior_weight`` is given.
``rounds = T`` repeats this at the released point, each round mu_t = mu / sqrt(T) so that the
composed sqrt(sum mu_t^2) equals the calibrated mu (§1d); pure mode splits eps evenly.
With ``resample_subspace=True`` round t draws a fresh public subspace (seed ``subspace_seed + t``),
so T rounds move theta in up to T*k directions instead of the same k. The seeds are public and
fixed before any private data is read, so the composition of §1d is unchanged.
With ``partition_rounds=True`` (replace-one, Gaussian-DP) round t reads only the t-th of T
disjoint, contiguous chunks of the private data, with N_t = its size and the full mu: a record
changes one round's input only, so the T adaptive rounds are mu-GDP together (parallel
composition; docs/theory.md §8), for the compute of one private pass.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset
from tqdm.auto import tqdm

import qem
from qem.curvature.base import Curvature
from qem.curvature.factory import make_curvature
from qem.data import DataLike, as_dataset, batches
from qem.errors import InvalidParameterError
from qem.io import save_run
from qem.losses import check_per_example_loss
from qem.mechanism import QuadraticExponentialMechanism
from qem.mechanism.clipping import validate_curvature
from qem.parameters import check_finite_parameters
from qem.pretrain import evaluate_loss
from qem.privacy.accounting import compose_with_dp_events
from qem.privacy.gdp import calibrate_gdp_mu, check_delta, check_epsilon, compose_gdp
from qem.privacy.sensitivity import Adjacency, ClipNorm, check_positive, gdp_beta
from qem.statistics import check_targets, private_gradient_sum, public_clip_norm
from qem.subspace.base import LossFn, Subspace
from qem.subspace.factory import make_subspace

MIN_STEP, MAX_STEP = 2.0**-8, 2.0**20
"""Range of the positive step lengths alpha the public line search tries (besides alpha = 0)."""


@dataclass
class FineTuneResult:
    """The fine-tuned model, its privacy report (a JSON-ready dict) and the data-free preview
    of every round."""

    model: nn.Module
    report: dict
    preview: list[dict] = field(default_factory=list)

    def save(self, directory: str, overwrite: bool = False) -> None:
        """Write the state dict and privacy_report.json together, atomically (qem.io)."""
        save_run(directory, self.model.state_dict(), self.report, overwrite=overwrite)


def line_search_step(
    model: nn.Module,
    loss_fn: LossFn,
    subspace: Subspace,
    w: np.ndarray,
    validation: DataLike,
    progress: bool = False,
) -> tuple[float, float]:
    """Pick the step length alpha minimising the public validation loss of theta + alpha P w.

    Over {0} and the powers of sqrt(2) in [MIN_STEP, MAX_STEP], coarse to fine: from alpha = 1
    it moves by factors of 4 (up while the loss falls, else down) to bracket the minimum, then
    tries the best alpha times 2 and 1/2, then times sqrt(2) and 1/sqrt(2). For a loss that is
    unimodal along the line this returns the minimum over the whole sqrt(2) grid with about a
    dozen validation passes, however short the released step is (a clip norm set on public
    data can make it short by orders of magnitude). Post-processing of the released w: no
    privacy cost (DESIGN.md §1e). Returns (alpha, validation loss); ``model`` is left at theta.
    """
    step = torch.as_tensor(w, dtype=torch.float64)
    losses: dict[float, float] = {}
    bar = tqdm(desc="step line search (public)", unit="step", disable=not progress)

    def loss_at(alpha: float) -> float:
        if alpha not in losses:
            trial = copy.deepcopy(model)
            subspace.apply_step(trial, alpha * step)
            losses[alpha] = evaluate_loss(trial, loss_fn, validation)
            bar.update()
        return losses[alpha]

    def best() -> float:
        return min(losses, key=lambda alpha: (losses[alpha], alpha))

    loss_at(0.0)
    factor = 4.0 if loss_at(1.0) < losses[0.0] else 0.25
    alpha = 1.0
    while MIN_STEP <= alpha * factor <= MAX_STEP and best() == alpha:
        alpha *= factor
        loss_at(alpha)
    for factor in (2.0, math.sqrt(2.0)):
        centre = best()
        if centre > 0:
            for alpha in (centre * factor, centre / factor):
                if MIN_STEP <= alpha <= MAX_STEP:
                    loss_at(alpha)
    bar.close()
    alpha = best()
    return float(alpha), losses[alpha]


def _round_seeds(seed: int | None, rounds: int) -> list[int | None]:
    if seed is None:
        return [None] * rounds
    children = np.random.SeedSequence(seed).spawn(rounds)
    return [int(c.generate_state(1)[0]) for c in children]


def fine_tune(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    epsilon: float,
    delta: float | None = 1e-5,
    subspace: str | Subspace = "srht",
    k: int | None = None,
    subspace_seed: int = 0,
    resample_subspace: bool = False,
    partition_rounds: bool = False,
    curvature: str | Curvature = "ggn",
    damping: float = 1e-2,
    clip_norm: float | None = None,
    clip_quantile: float = 0.9,
    clipping: str = "dual",
    prior_weight: float | None = None,
    mode: str = "gdp",
    adjacency: str = "replace_one",
    N: int | None = None,
    rounds: int = 1,
    validation_data: DataLike | None = None,
    public_sample_size: int | None = None,
    radius: float | None = None,
    seed: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    noise: bool = True,
) -> FineTuneResult:
    """Fine-tune ``model`` on ``private_data`` with a differential-privacy guarantee.

    The returned model is a copy; the input model is not modified. ``seed`` makes the noise
    reproducible and is recorded as such in the report; by default noise comes from operating
    system entropy. ``public_sample_size`` limits the public passes (curvature, clip norm) to the
    first that many public examples: public data, so no privacy cost, and the curvature pass
    costs (outputs x examples) per-example projections. ``noise=False`` exists only for tests
    (it releases the exact mean and the report says so); never use it on real data.
    ``resample_subspace`` draws a new subspace of the same kind each round (``subspace`` must
    then be a name, not a built Subspace). ``partition_rounds`` gives round t the t-th of
    ``rounds`` disjoint chunks of the private data and the whole budget (replace-one, GDP only).
    """
    epsilon = check_epsilon(epsilon)
    if mode not in ("gdp", "pure"):
        raise InvalidParameterError(f"mode must be 'gdp' or 'pure', got {mode!r}.")
    if mode == "gdp":
        delta = check_delta(delta)
    rounds = int(rounds)
    if rounds < 1:
        raise InvalidParameterError(f"rounds must be >= 1, got {rounds}.")
    adjacency = Adjacency(adjacency)
    clipping = ClipNorm(clipping)
    check_positive("damping gamma", damping, "Typical values are 1e-3 to 1.")
    if prior_weight is not None:
        check_positive("prior_weight lam", prior_weight)
    if resample_subspace and isinstance(subspace, Subspace):
        raise InvalidParameterError(
            "resample_subspace needs the subspace as a name (e.g. 'kronecker'), not a built "
            "Subspace, so that each round can draw a new one."
        )
    if partition_rounds and (mode != "gdp" or adjacency is not Adjacency.REPLACE_ONE):
        raise InvalidParameterError(
            "partition_rounds needs mode='gdp' and replace_one adjacency: under add/remove one "
            "record would shift every later chunk."
        )
    check_finite_parameters(model)
    public = as_dataset(public_data, "public data")
    private = as_dataset(private_data, "private data")
    validation = public if validation_data is None else as_dataset(validation_data, "validation")
    if public_sample_size is not None:
        if int(public_sample_size) < 1:
            raise InvalidParameterError(
                f"public_sample_size must be >= 1, got {public_sample_size!r}."
            )
        public = Subset(public, range(min(int(public_sample_size), len(public))))
    if N is None:
        if adjacency is Adjacency.ADD_REMOVE:
            raise InvalidParameterError(
                "add/remove adjacency needs a declared, public dataset size N that does not "
                "depend on the private data; pass N."
            )
        N = len(private)
    N = int(check_positive("N", N))
    if partition_rounds and (len(private) != N or rounds > N):
        raise InvalidParameterError(
            f"partition_rounds splits the {len(private)} private records into {rounds} chunks, "
            "each with N = its own size; do not pass N, and use at most one round per record."
        )
    probe_x, probe_y = next(iter(batches(private, 2)))
    with torch.no_grad():
        probe_outputs = model(probe_x)
    for data in (public, private, validation):
        if isinstance(data, TensorDataset):
            check_targets(probe_outputs, data.tensors[1])
    check_per_example_loss(loss_fn, probe_outputs, probe_y)

    timings: dict[str, float] = {}

    def timed(phase: str, start: float) -> None:
        seconds = time.perf_counter() - start
        timings[phase] = timings.get(phase, 0.0) + seconds

    current = copy.deepcopy(model).eval()
    basis = (
        subspace
        if isinstance(subspace, Subspace)
        else make_subspace(subspace, current, k=k, seed=subspace_seed)
    )
    curv = (
        curvature
        if isinstance(curvature, Curvature)
        else make_curvature(curvature, damping, batch_size=batch_size, progress=progress)
    )
    mu_total = calibrate_gdp_mu(epsilon, delta) if mode == "gdp" else None
    round_seeds = _round_seeds(seed, rounds)
    rounds_report, previews = [], []

    for t in range(rounds):
        if partition_rounds:  # N == len(private) here
            chunk = Subset(private, range(t * N // rounds, (t + 1) * N // rounds))
            N_t = len(chunk)
        else:
            chunk, N_t = private, N
        start = time.perf_counter()
        if resample_subspace and t > 0:
            basis = make_subspace(subspace, current, k=k, seed=subspace_seed + t)
        A = curv.matrix(current, loss_fn, basis, public)
        cholesky = validate_curvature(A)
        timed("curvature", start)

        start = time.perf_counter()
        if clip_norm is None:
            C = public_clip_norm(
                current,
                loss_fn,
                basis,
                public,
                quantile=clip_quantile,
                clipping=clipping,
                cholesky=cholesky,
                batch_size=batch_size,
                progress=progress,
            )
            clip_source = f"public quantile {clip_quantile}"
        else:
            C, clip_source = float(clip_norm), "user"
        timed("clip_norm", start)

        start = time.perf_counter()
        stats = private_gradient_sum(
            current,
            loss_fn,
            basis,
            chunk,
            clip_norm=C,
            clipping=clipping,
            cholesky=cholesky,
            batch_size=batch_size,
            progress=progress,
        )
        timed("private_pass", start)

        start = time.perf_counter()
        lam = 1.0 if (mode == "gdp" and prior_weight is None) else float(prior_weight or 1.0)
        mechanism = QuadraticExponentialMechanism(
            A,
            N=N_t,
            lam=lam,
            clip_norm=C,
            adjacency=adjacency,
            clipping=clipping,
            mode=mode,
            radius=radius,
            seed=round_seeds[t],
        )
        if mode == "gdp":
            mu_t = mu_total if partition_rounds else mu_total / math.sqrt(rounds)
            mechanism.set_beta(gdp_beta(mu_t, N_t, lam, mechanism.sensitivity))
        else:
            mechanism.calibrate(epsilon / rounds)
        preview = mechanism.preview().to_dict()
        w = mechanism.sample(stats.gradient_sum) if noise else mechanism.mean(stats.gradient_sum)
        timed("mechanism", start)

        start = time.perf_counter()
        if mode == "gdp" and prior_weight is None:
            alpha, val_loss = line_search_step(
                current, loss_fn, basis, w, validation, progress=progress
            )
        else:
            alpha, val_loss = 1.0, None
        basis.apply_step(current, alpha * torch.as_tensor(w, dtype=torch.float64))
        timed("line_search", start)

        previews.append(preview)
        rounds_report.append(
            {
                "round": t + 1,
                "mu": preview.get("mu"),
                "epsilon": preview.get("epsilon"),
                "beta": preview["beta"],
                "lam": lam,
                "clip_norm": C,
                "clip_norm_source": clip_source,
                "step_length": alpha,
                "subspace_seed": basis.seed,
                "N": N_t,
                "public_validation_loss": val_loss,
                "curvature": curv.describe(),
                "preview": preview,
                "seed": mechanism.seed_info(),
            }
        )

    report = _build_report(
        mode=mode,
        adjacency=adjacency,
        clipping=clipping,
        epsilon=epsilon,
        delta=delta,
        mu_total=mu_total,
        N=N,
        damping=damping,
        basis=basis,
        resample_subspace=resample_subspace,
        partition_rounds=partition_rounds,
        curvature=curv,
        seed=seed,
        rounds=rounds_report,
        noise=noise,
        timings=timings,
    )
    return FineTuneResult(model=current, report=report, preview=previews)


def _build_report(
    *,
    mode,
    adjacency,
    clipping,
    epsilon,
    delta,
    mu_total,
    N,
    damping,
    basis,
    resample_subspace,
    partition_rounds,
    curvature,
    seed,
    rounds,
    noise,
    timings,
) -> dict:
    """The privacy report: every field of DESIGN.md §4, plus each round's details."""
    mus = [r["mu"] for r in rounds if r["mu"] is not None]
    if partition_rounds:  # parallel composition over disjoint chunks: the largest round's mu
        mus = [max(mus)]
    report = {
        "qem_version": qem.__version__,
        "mode": mode,
        "adjacency": adjacency.value,
        "clipping": clipping.value,
        "epsilon": epsilon,
        "delta": delta if mode == "gdp" else 0.0,
        "mu": compose_gdp(mus) if mus else None,
        "dp_accounting_epsilon": (
            compose_with_dp_events(mus, delta=delta, value_discretization_interval=1e-3)
            if mus
            else None
        ),
        "mu_calibrated": mu_total,
        "C": [r["clip_norm"] for r in rounds] if len(rounds) > 1 else rounds[0]["clip_norm"],
        "N": N,
        "composition": (
            "parallel: round t reads only the t-th of T disjoint chunks of the private data"
            if partition_rounds
            else "sequential: every round reads all the private data"
        ),
        "lam": rounds[0]["lam"],
        "gamma": damping,
        "k": basis.k,
        "subspace": {
            **basis.describe(),
            "seed": rounds[0]["subspace_seed"],
            "resampled_each_round": resample_subspace,
        },
        "curvature": curvature.describe(),
        "rounds": rounds,
        "step_lengths": [r["step_length"] for r in rounds],
        "seed": {"source": "user_seed" if seed is not None else "os_entropy", "seed": seed},
        "noise": "exact sampling" if noise else "DISABLED (test-only path): NOT PRIVATE",
        "seconds": timings,
    }
    return report
