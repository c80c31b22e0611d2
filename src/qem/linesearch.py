"""The step length along a release, chosen on PUBLIC validation data (docs/theory.md §9).

In Gaussian-DP mode the release at weight lam is the release at lam = 1 divided by lam (§9),
so choosing alpha in theta + alpha P w after the draw replaces tuning lam and costs no privacy:
it is post-processing of w with public data. So is the acceptance test of the chosen step
(``StepSearch.significant``): a step is taken only when the validation loss falls by more than
its own paired standard error (docs/theory.md §9b).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qem.data import DataLike
from qem.losses import LossFn
from qem.metrics import example_losses

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


@dataclass(frozen=True)
class StepSearch:
    """The outcome of a line search: the step length alpha (0: no step), the mean validation
    loss there, the passes over the validation data it made, and the per-example validation
    losses at theta and at theta + alpha d (float64), for the acceptance test."""

    alpha: float
    loss: float
    passes: int
    losses_at_zero: torch.Tensor
    losses_at_alpha: torch.Tensor

    def significant(self, z: float) -> bool:
        """Whether the step lowers the mean validation loss by more than ``z`` paired standard
        errors on the search's own examples (``significant_decrease``; a step of length 0
        never does)."""
        if self.alpha == 0.0:
            return False
        return significant_decrease(self.losses_at_zero, self.losses_at_alpha, z)


def significant_decrease(at_zero: torch.Tensor, at_alpha: torch.Tensor, z: float) -> bool:
    """With d_i = loss_i(theta + alpha d) - loss_i(theta) over n examples: whether
    mean(d) < -z sd(d) / sqrt(n), a paired decrease beyond z standard errors."""
    d = at_alpha - at_zero
    spread = float(d.std(unbiased=True)) if len(d) > 1 else 0.0
    return float(d.mean()) < -z * spread / math.sqrt(len(d))


def line_search_step(
    model: nn.Module,
    loss_fn: LossFn,
    direction: Mapping[str, torch.Tensor],
    validation: DataLike,
    *,
    start: float = 1.0,
    warm: bool = False,
) -> StepSearch:
    """Pick the step length alpha minimising the public validation loss of theta + alpha d,
    for a direction d in parameter space (the lifted release P w, or with momentum and carried
    releases a combination of releases: post-processing either way).

    Over {0} and the grid 2^(e/2), e = MIN_EXPONENT..MAX_EXPONENT (exact powers: the search
    moves on the integer e, so the ends of the range are reached exactly). From alpha = ``start``
    (snapped to the grid) it moves down by factors of 4 until a step beats alpha = 0, then by
    sqrt(2) down to MIN_STEP if none did; from the best step so far it then walks by factors of
    4 up, or else down, while the loss falls; finally it tries the best alpha times 2 and 1/2,
    then sqrt(2) and 1/sqrt(2). For a loss unimodal along the line this returns the minimum
    over the whole grid in about eight passes from a good start, and from any start within the
    range. ``warm`` (``start`` is the previous round's step, likely near this one's): when
    ``start`` beats 0 it tries its neighbours times sqrt(2) and 1/sqrt(2) and walks by sqrt(2)
    towards the better one while the loss falls (four passes when ``start`` is the minimum),
    the full search otherwise. ``model`` is left at theta.
    """
    losses: dict[int | None, torch.Tensor] = {}  # per-example losses keyed by e; None: alpha 0
    with step_probe(model, direction) as move:

        def loss_at(e: int | None) -> float:
            if e not in losses:
                move(_step(e))
                losses[e] = example_losses(model, loss_fn, validation)
            return float(losses[e].mean())

        def best() -> int | None:
            return min(losses, key=lambda e: (float(losses[e].mean()), _step(e)))

        def on_grid(e: int) -> bool:
            return MIN_EXPONENT <= e <= MAX_EXPONENT

        def walk(e: int, by: int) -> None:
            while on_grid(e + by) and loss_at(e + by) < loss_at(e):
                e += by

        loss_at(None)
        e = _exponent(start)
        if warm and loss_at(e) < loss_at(None):
            for neighbour in (e + 1, e - 1):
                if on_grid(neighbour):
                    loss_at(neighbour)
            if best() != e:
                walk(best(), 1 if best() > e else -1)
        else:
            _full_search(e, loss_at, best, on_grid, walk)
    chosen = best()
    return StepSearch(
        _step(chosen), float(losses[chosen].mean()), len(losses), losses[None], losses[chosen]
    )


def _full_search(e: int, loss_at, best, on_grid, walk) -> None:
    """The coarse-to-fine search of ``line_search_step`` from grid index ``e``."""
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


def _step(e: int | None) -> float:
    """alpha = 2^(e/2), exactly (0 for None)."""
    if e is None:
        return 0.0
    return math.ldexp(math.sqrt(2.0) if e % 2 else 1.0, e // 2)


def _exponent(alpha: float) -> int:
    """The e of the grid step nearest to ``alpha`` (e = 0, alpha = 1, for alpha <= 0 or not
    finite)."""
    if not alpha > 0 or not math.isfinite(alpha):
        return 0
    return min(max(round(2.0 * math.log2(alpha)), MIN_EXPONENT), MAX_EXPONENT)
