"""The step length along a release, chosen on PUBLIC validation data (docs/theory.md §9).

In Gaussian-DP mode the release at weight lam is the release at lam = 1 divided by lam (§9),
so choosing alpha in theta + alpha P w after the draw replaces tuning lam and costs no privacy:
it is post-processing of w with public data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from qem.data import DataLike
from qem.losses import LossFn
from qem.metrics import evaluate_loss

MIN_EXPONENT, MAX_EXPONENT = -16, 40
"""The grid of positive step lengths: alpha = 2^(e/2) for integer e in [MIN_EXPONENT,
MAX_EXPONENT], i.e. the powers of sqrt(2) from 2^-8 to 2^20 (besides alpha = 0)."""
MIN_STEP, MAX_STEP = 2.0 ** (MIN_EXPONENT // 2), 2.0 ** (MAX_EXPONENT // 2)


@contextmanager
def step_probe(model: nn.Module, direction: Mapping[str, torch.Tensor]) -> Iterator:
    """Yield ``move(alpha)``, which sets each parameter named in ``direction`` to
    theta + alpha direction (in the parameter's dtype); theta is restored on exit. No copy of the
    model is made, so a probe costs one forward pass over the validation data whatever the
    model's size."""
    params = dict(model.named_parameters())
    origin = {name: params[name].detach().clone() for name in direction}
    moves = {
        name: d.to(device=origin[name].device, dtype=origin[name].dtype)
        for name, d in direction.items()
    }

    def move(alpha: float) -> None:
        with torch.no_grad():
            for name, start in origin.items():
                params[name].copy_(start + alpha * moves[name])

    try:
        yield move
    finally:
        move(0.0)


def line_search_step(
    model: nn.Module,
    loss_fn: LossFn,
    direction: Mapping[str, torch.Tensor],
    validation: DataLike,
    *,
    start: float = 1.0,
) -> tuple[float, float, int]:
    """Pick the step length alpha minimising the public validation loss of theta + alpha d,
    for a direction d in parameter space (the lifted release P w, or with momentum a
    combination of releases: post-processing either way).

    Over {0} and the grid 2^(e/2), e = MIN_EXPONENT..MAX_EXPONENT (exact powers: the search
    moves on the integer e, so the ends of the range are reached exactly), coarse to fine.
    From alpha = ``start`` (the previous round's step: a warm start, snapped to the grid) it
    moves down by factors of 4 until a step beats alpha = 0, then by sqrt(2) down to MIN_STEP if
    none did; from the best step so far it then walks by factors of 4 up, or else down, while
    the loss falls; finally it tries the best alpha times 2 and 1/2, then sqrt(2) and 1/sqrt(2).
    For a loss unimodal along the line this returns the minimum over the whole grid in about
    eight passes from a good start, and from any start within the range. Returns (alpha,
    validation loss at alpha, passes made); ``model`` is left at theta.
    """
    losses: dict[int | None, float] = {}  # keyed by e; None is alpha = 0
    with step_probe(model, direction) as move:

        def loss_at(e: int | None) -> float:
            if e not in losses:
                move(_step(e))
                losses[e] = evaluate_loss(model, loss_fn, validation)
            return losses[e]

        def best() -> int | None:
            return min(losses, key=lambda e: (losses[e], _step(e)))

        def on_grid(e: int) -> bool:
            return MIN_EXPONENT <= e <= MAX_EXPONENT

        def walk(e: int, by: int) -> None:
            while on_grid(e + by) and loss_at(e + by) < losses[e]:
                e += by

        loss_at(None)
        e = _exponent(start)
        loss_at(e)
        while best() is None and on_grid(e - 4):
            e -= 4
            loss_at(e)
        while best() is None and on_grid(e - 1):
            e -= 1
            loss_at(e)
        if best() is not None:
            centre = best()
            walk(centre, 4)
            if best() == centre:
                walk(centre, -4)
        for by in (2, 1):
            centre = best()
            if centre is not None:
                for e in (centre + by, centre - by):
                    if on_grid(e):
                        loss_at(e)
    chosen = best()
    return _step(chosen), losses[chosen], len(losses)


def _step(e: int | None) -> float:
    """alpha = 2^(e/2), exactly (0 for None)."""
    if e is None:
        return 0.0
    return math.ldexp(math.sqrt(2.0) if e % 2 else 1.0, e // 2)


def _exponent(alpha: float) -> int:
    """The e of the grid step nearest to ``alpha`` (1 for alpha <= 0 or not finite)."""
    if not alpha > 0 or not math.isfinite(alpha):
        return 0
    return min(max(round(2.0 * math.log2(alpha)), MIN_EXPONENT), MAX_EXPONENT)
