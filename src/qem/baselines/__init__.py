"""Baselines that qem is compared with, side by side (the evaluation protocol: README.md,
docs/results.md): DP-SGD through Opacus (``dpsgd``), non-private fine-tuning (``nonprivate``) and no
fine-tuning (``none``); the table of methods, qem included, is ``qem.baselines.registry``.

Every method has fine_tune's core signature,
``method(model, loss_fn, public_data, private_data, *, epsilon, delta, adjacency,
validation_data, seed, progress, **hyperparameters) -> FineTuneResult``, never modifies the
input model, and returns the result built by :func:`baseline_result`. This module holds what the
methods share: the report, input checks, the seed handling and the per-phase timer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import qem
from qem.checks import check_delta, check_epsilon
from qem.finetune import FineTuneResult
from qem.report import BaselineReport, Diagnostics
from qem.seeds import child_seeds


def check_requested_budget(epsilon: float | None, delta: float | None) -> dict:
    """The (epsilon, delta) a non-private method was called with, checked when given: sweeps
    pass every method the same budget, and a bad one should fail everywhere."""
    return {
        "epsilon": None if epsilon is None else check_epsilon(epsilon),
        "delta": None if delta is None else check_delta(delta),
    }


def seed_info(seed: int | None) -> dict:
    """How the randomness was seeded, in the report's format (as fine_tune writes it).

    A seed drawn from OS entropy is never written down: knowing it would reveal the noise.
    """
    return {"source": "user_seed" if seed is not None else "os_entropy", "seed": seed}


def torch_generators(
    seed: int | None, devices: Sequence[torch.device | str]
) -> list[torch.Generator]:
    """One independent torch generator per entry of ``devices`` (on that device): children of
    ``seed`` (numpy SeedSequence) when it is given, otherwise each seeded with 63 bits of
    operating-system entropy (``secrets``)."""
    seeds = child_seeds(seed, len(devices))
    return [torch.Generator(device=d).manual_seed(s) for d, s in zip(devices, seeds, strict=True)]


def baseline_result(
    model: torch.nn.Module,
    method: str,
    *,
    privacy: str,
    epsilon: float | None,
    delta: float | None,
    adjacency: str,
    N: int,
    accountant: dict | None,
    hyperparameters: dict,
    seed: int | None,
    seconds: dict[str, float],
    **details: object,
) -> FineTuneResult:
    """The result every baseline returns: its model, a publishable BaselineReport and the
    diagnostics (seconds: not publishable, see qem.report).

    ``privacy`` states the guarantee in words; ``epsilon`` is the epsilon the method's
    accountant certifies (None when the method is not private); ``accountant`` holds the
    accountant's inputs and cross-checks.
    """
    report = BaselineReport(
        qem_version=qem.__version__,
        method=method,
        privacy=privacy,
        epsilon=epsilon,
        delta=delta,
        adjacency=adjacency,
        N=N,
        accountant=accountant,
        hyperparameters=hyperparameters,
        noise=seed_info(seed),
        details=dict(details),
    )
    return FineTuneResult(model=model, report=report, diagnostics=Diagnostics(seconds=seconds))
