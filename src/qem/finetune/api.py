"""``fine_tune``: the keyword API, a facade that maps its arguments onto the configuration objects
(qem.finetune.config, qem.public.config, qem.privacy.budget) in one place and hands them to the
round engine (qem.finetune.engine.run_rounds), which power users may call directly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qem.checks import check_count
from qem.curvature.base import Curvature
from qem.data import DataLike
from qem.errors import InvalidParameterError
from qem.finetune.config import Noise, Performance, PrivatePass, StepRule
from qem.finetune.engine import run_rounds
from qem.finetune.result import FineTuneResult
from qem.losses import LossFn
from qem.parameters import Layers
from qem.privacy.budget import Budget
from qem.public.config import PublicSide
from qem.schedules import Schedule, make_schedule, partitioned, sequential
from qem.subspace.base import Subspace


def fine_tune(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    epsilon: float,
    delta: float | None = 1e-5,
    schedule: Schedule | dict | None = None,
    rounds: int | None = None,
    resample_subspace: bool | int | None = None,
    partition_rounds: bool = False,
    subspace: str | Subspace = "auto",
    k: int | None = None,
    subspace_seed: int = 0,
    layers: Layers | None = None,
    curvature: str | Curvature | None = None,
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
    step_significance: float | None = 1.0,
    confirmation_size: int | None = None,
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
    train/eval flag). Round t draws w_t exactly from the quadratic exponential mechanism in a
    public subspace and steps theta <- theta + alpha P_t w_t (docs/theory.md §1, §8, §13).

    Data (qem.data): tensors (inputs, targets), inputs possibly a dict of tensors; a dict of
    tensors with "labels"; a map-style Dataset of pairs or dicts; or a DataLoader over one, read
    through its collate_fn in dataset order (its sampler and shuffling are not used). The model
    is called as ``model(x)`` or ``model(**inputs)`` and may return a tensor, a dict with
    "logits" or a Hugging Face ModelOutput (qem.model_calls). Public and validation data may be
    streams (an IterableDataset), read once into memory; private data must be addressable.

    Args:
        model, loss_fn: the pretrained model and a per-example loss (B,) (qem.losses).
        public_data, private_data: public data for curvature and clip norm; the private data.
        epsilon, delta: the target (delta unused in pure mode). Budget (qem.privacy.budget).
        mode: "gdp" (Gaussian DP, default) or "pure" (epsilon-DP on {||w||_A <= radius}).
        adjacency: "replace_one" (default) or "add_remove" (needs the declared public size N).
        N: the public weight of the quadratic (default: the number of private records).
        radius: pure mode's R (None: chosen by qem).
        schedule: which records each round reads and how the budget is spent
            (qem.schedules.sequential / partitioned / poisson, or its JSON form
            {"kind": "poisson", "sampling_rate": q, "rounds": T}); without it ``rounds`` and
            ``partition_rounds`` build a sequential or partitioned one, and without those the
            schedule follows from the number of private records (qem.defaults.default_schedule:
            one round up to 2,048 records, else Poisson rounds of 1,024 expected records over
            one expected epoch, at most 100).
        resample_subspace: a new public subspace every round (True), every R rounds (R), never
            (False), or None: every round when rounds read different records (partitioned,
            Poisson), never when they all read every record (sequential).
        subspace, k, subspace_seed, layers: the subspace P (a kind or a built Subspace; its
            dimension, public seed, and the modules it spans: names and nn.Module types;
            'kronecker' spans their Linear/Conv2d layers; the default 'auto' is Kronecker when
            that spans every trainable parameter, SRHT otherwise; k defaults to min(d, 1024)).
            requires_grad=False parameters are never changed.
        curvature, damping, curvature_every: A = P^T H0 P + gamma I on public data (a kind or a
            built Curvature; default K-FAC in a Kronecker subspace, the exact GGN otherwise),
            one estimate every R rounds (K-FAC projects its factors into each round's
            subspace in between). PublicSide (qem.public.config).
        clip_norm, clip_quantile, clipping: C, given or the public quantile of per-example
            gradient norms; clipping in the dual norm ("dual") or the Euclidean one.
        public_sample_size: at most that many public examples in the curvature and clip passes.
        invalid_records: "zero" (a record whose gradient cannot be computed contributes zero)
            or "raise" (docs/theory.md §12). PrivatePass.
        seed: makes the noise and the Poisson sampling reproducible (recorded in the report; NOT
            private against anyone who knows it); by default both come from OS entropy.
        secure_noise: every normal from the OS CSPRNG, release snapped to a grid (§10a).
        noise: False releases the exact mean (tests only; the report says NOT PRIVATE). Noise.
        prior_weight: a fixed quadratic weight lam (no line search; alpha = 1).
        momentum: m in [0, 1): steps along d_t = P_t w_t + m alpha_{t-1} d_{t-1}.
        validation_data: public data whose loss picks each step length (default: a held-out
            public split); line_search_size: at most that many of its examples.
        step_significance: z; a searched step is kept only when the validation loss falls by
            more than z paired standard errors (None: any decrease); a release whose step is not
            kept joins the next round's direction (§9b); confirmation_size: the test runs on
            the last that many validation examples, which the search does not read. StepRule.
        batch_size, device, distributed, progress: how the work runs (Performance: none of
            them changes a release); device "cpu" | "cuda" | "auto"; distributed "auto" | True |
            False runs one release over the ranks of a torch.distributed group (each rank reads
            its shard, rank 0 draws the noise; give every rank the same arguments).
        on_release: called with the run so far right after every draw (rank 0), so that the
            caller can save it before anything else can fail; an error after a draw raises
            SpentBudgetError carrying that partial result.

    Returns:
        FineTuneResult: the model, the publishable report, previews, diagnostics, releases.
    """
    budget = Budget(epsilon, delta, mode, adjacency, N, radius)
    schedule = _resolve_schedule(schedule, rounds, partition_rounds)
    public_side = PublicSide(
        subspace=subspace, k=k, subspace_seed=subspace_seed, layers=layers,
        resample_every=_resample_every(resample_subspace), curvature=curvature,
        damping=damping, curvature_every=curvature_every, clip_norm=clip_norm,
        clip_quantile=clip_quantile, public_sample_size=public_sample_size,
    )  # fmt: skip
    return run_rounds(
        model,
        loss_fn,
        public_data,
        private_data,
        budget=budget,
        schedule=schedule,
        public=public_side,
        private=PrivatePass(clipping=clipping, invalid_records=invalid_records),
        noise=Noise(seed=seed, secure=secure_noise, enabled=noise),
        step=StepRule(
            prior_weight,
            momentum,
            validation_data,
            line_search_size,
            step_significance,
            confirmation_size,
        ),
        performance=Performance(batch_size, device, distributed, progress),
        on_release=on_release,
    )


def _resample_every(resample_subspace: bool | int | None) -> int | str | None:
    """PublicSide.resample_every from the keyword: True -> 1, False -> None, None -> "auto"."""
    if resample_subspace is None:
        return "auto"
    if isinstance(resample_subspace, bool):
        return 1 if resample_subspace else None
    return check_count("resample_subspace", resample_subspace)


def _resolve_schedule(
    schedule: Schedule | dict | None, rounds: int | None, partition_rounds: bool
) -> Schedule | None:
    """``schedule`` itself, the one the shortcuts describe, or None: the engine's default for
    the number of private records (qem.defaults.default_schedule)."""
    if schedule is not None:
        if rounds is not None or partition_rounds:
            raise InvalidParameterError(
                "give either schedule= or the shortcuts rounds=/partition_rounds=, not both."
            )
        return make_schedule(schedule)
    if rounds is None and not partition_rounds:
        return None
    rounds = check_count("rounds", 1 if rounds is None else rounds)
    return partitioned(rounds) if partition_rounds else sequential(rounds)
