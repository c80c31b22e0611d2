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

MIN_STEP, MAX_STEP = 2.0**-8, 2.0**20
"""Range of the positive step lengths alpha the search tries (besides alpha = 0)."""


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

    Over {0} and the powers of sqrt(2) in [MIN_STEP, MAX_STEP], coarse to fine. From alpha =
    ``start`` (the previous round's step: a warm start) it moves down by factors of 4 until a
    step beats alpha = 0 (if ``start`` does not); from the best step so far it then walks by
    factors of 4 up, or else down, while the loss falls; finally it tries the best alpha times
    2 and 1/2, then sqrt(2) and 1/sqrt(2). For a loss unimodal along the line this returns the
    minimum over the whole sqrt(2) grid in about eight passes from a good start, and from any
    start within the range. Returns (alpha, validation loss at alpha, passes made); ``model``
    is left at theta.
    """
    losses: dict[float, float] = {}
    with step_probe(model, direction) as move:

        def loss_at(alpha: float) -> float:
            if alpha not in losses:
                move(alpha)
                losses[alpha] = evaluate_loss(model, loss_fn, validation)
            return losses[alpha]

        def best() -> float:
            return min(losses, key=lambda alpha: (losses[alpha], alpha))

        def walk(alpha: float, factor: float) -> None:
            while (
                MIN_STEP <= alpha * factor <= MAX_STEP and loss_at(alpha * factor) < losses[alpha]
            ):
                alpha *= factor

        loss_at(0.0)
        alpha = _on_grid(start)
        loss_at(alpha)
        while best() == 0.0 and alpha * 0.25 >= MIN_STEP:
            alpha *= 0.25
            loss_at(alpha)
        if best() > 0:
            centre = best()
            walk(centre, 4.0)
            if best() == centre:
                walk(centre, 0.25)
        for factor in (2.0, math.sqrt(2.0)):
            centre = best()
            if centre > 0:
                for alpha in (centre * factor, centre / factor):
                    if MIN_STEP <= alpha <= MAX_STEP:
                        loss_at(alpha)
    alpha = best()
    return float(alpha), losses[alpha], len(losses)


def _on_grid(alpha: float) -> float:
    """The power of sqrt(2) nearest to ``alpha`` inside [MIN_STEP, MAX_STEP] (1 for alpha <= 0)."""
    if not alpha > 0 or not math.isfinite(alpha):
        return 1.0
    exponent = round(2.0 * math.log2(alpha))
    return float(min(max(math.sqrt(2.0) ** exponent, MIN_STEP), MAX_STEP))
