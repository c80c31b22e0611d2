"""The step-length search on public validation data (qem.linesearch, docs/theory.md §9): the
grid {0} and the powers of sqrt(2) in [MIN_STEP, MAX_STEP], the warm start, the bounds, the
model left at theta on every exit, and the number of validation passes, each against a brute
force over the whole grid.

Most tests search along a one-parameter model whose validation loss along the line is
(alpha - c)^2 exactly (theta0 = 0, direction 1: theta = alpha in float64 without rounding), so
the optimum is known and every step the search evaluates is recorded by the loss itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cases import loss_fn, make_linear, make_task
from qem.finetune.step import Stepper
from qem.linesearch import MAX_STEP, MIN_STEP, StepSearch, line_search_step, step_probe
from qem.metrics import evaluate_loss
from qem.subspace.factory import make_subspace

GRID = [0.0, *(2.0 ** (j / 2) for j in range(-16, 41))]
"""{0} and 2^(j/2) for 2^-8 <= 2^(j/2) <= 2^20, computed exactly (powers of two and their
products with the float64 sqrt(2))."""
assert (GRID[1], GRID[-1]) == (MIN_STEP, MAX_STEP)

ROUNDING = 1e-12
"""Relative tolerance for a step the search computes as a product of powers of sqrt(2) (a few
float64 roundings, ~1e-15 each)."""


class Line(nn.Module):
    """One float64 parameter theta (0 at the start), output theta for every example."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(len(x), 1)


class SquaredDistance:
    """Per-example loss (theta - c)^2 with c the target; records every theta it is called at
    (one call per validation pass: the validation data is one batch)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(outputs[0, 0]))
        return (outputs[:, 0] - targets) ** 2


def search(
    c: float, start: float = 1.0, warm: bool = False
) -> tuple[float, float, int, list[float], Line]:
    """line_search_step along theta = alpha for the loss (alpha - c)^2: (alpha, loss, passes,
    the steps evaluated in order, the model)."""
    model, loss = Line(), SquaredDistance()
    validation = (torch.zeros(4, 1, dtype=torch.float64), torch.full((4,), c, dtype=torch.float64))
    direction = {"theta": torch.ones(1, dtype=torch.float64)}
    found = line_search_step(model, loss, direction, validation, start=start, warm=warm)
    return found.alpha, found.loss, found.passes, loss.seen, model


def grid_minimum(c: float) -> float:
    """The brute-force minimiser of (alpha - c)^2 over GRID."""
    return min(GRID, key=lambda alpha: (alpha - c) ** 2)


def on_grid(alpha: float) -> bool:
    return alpha == 0.0 or min(abs(alpha / point - 1.0) for point in GRID[1:]) < ROUNDING


OPTIMA = [2**-5.3, 0.05, 0.7, 1.0, 1.3, 37.3, 2**12.2, 2**19.4]
"""Targets c whose grid minimum is a positive step inside the range and nearer to c than any
other grid point (no ties)."""
STARTS = [1.0, 2**-8, 2**-6, 3.0, 2**12, 2**20, 0.0, -2.0, math.nan, math.inf]


@pytest.mark.parametrize("c", [-1.0, 2**-12, *OPTIMA, 2**22])
def test_every_step_tried_lies_on_the_grid_within_the_bounds(c):
    for start in STARTS:
        alpha, value, _, seen, _ = search(c, start)
        assert seen[0] == 0.0  # alpha = 0 (keep theta) is always a candidate
        assert all(on_grid(a) for a in seen), (start, seen)
        low, high = MIN_STEP * (1 - ROUNDING), MAX_STEP * (1 + ROUNDING)
        assert all(a == 0.0 or low <= a <= high for a in seen), (start, seen)
        assert len(set(seen)) == len(seen)  # no step is evaluated twice
        assert alpha in seen and value == pytest.approx((alpha - c) ** 2, rel=1e-12)


@pytest.mark.parametrize("c", OPTIMA)
def test_a_unimodal_loss_gets_the_grid_minimum_from_any_start(c):
    """From any start, the minimum over the whole grid (a brute force over its 58 points), in
    about eight passes from the optimum itself and one more per factor 4 the start is off: from
    the optimum s* the search evaluates 0, s*, 4 s*, s*/4, 2 s*, s*/2, sqrt(2) s*, s*/sqrt(2)."""
    best = grid_minimum(c)
    for start in STARTS:
        alpha, _, passes, seen, _ = search(c, start)
        assert alpha == pytest.approx(best, rel=ROUNDING), start
        snapped = start if start > 0 and math.isfinite(start) else 1.0
        assert passes == len(seen) <= 8 + abs(math.log(snapped / best, 4)), start
    _, _, from_optimum, _, _ = search(c, best)
    interior = best / 4 >= MIN_STEP and best * 4 <= MAX_STEP  # else fewer steps are in range
    assert from_optimum == 8 if interior else from_optimum < 8


@pytest.mark.parametrize(
    ("start", "snapped"),
    [(1.0, 1.0), (3.0, 2**1.5), (0.6, 2**-0.5), (2**-6, 2**-6), (1e-9, MIN_STEP),
     (2.0**30, MAX_STEP), (0.0, 1.0), (-5.0, 1.0), (math.nan, 1.0), (math.inf, 1.0)],
)  # fmt: skip
def test_the_warm_start_is_the_nearest_grid_step(start, snapped):
    """The first step tried after alpha = 0 is the grid point nearest ``start`` in log scale
    (clamped to the range; 1 for a start that is not a positive finite number)."""
    if 0 < start < math.inf:  # the brute-force nearest point, in log scale
        assert snapped == min(GRID[1:], key=lambda a: abs(math.log(a / start)))
    _, _, _, seen, _ = search(37.3, start)
    assert seen[1] == pytest.approx(snapped, rel=ROUNDING)


def test_the_step_rule_warm_starts_at_the_previous_positive_step():
    """Stepper (fine_tune's step rule) starts each search at the last positive step: the second
    search of a run tries the first one's alpha first, and a zero step leaves it in place."""
    model, loss = Line(), SquaredDistance()
    validation = (
        torch.zeros(4, 1, dtype=torch.float64),
        torch.full((4,), 37.3, dtype=torch.float64),
    )
    stepper = Stepper(loss, validation, momentum=0.0)
    basis = make_subspace("identity", model)
    first, _, _ = stepper.step(model, basis, np.array([1.0]))
    assert first == pytest.approx(32.0, rel=ROUNDING) and float(model.theta.detach()) == first
    loss.seen.clear()
    second, _, _ = stepper.step(model, basis, np.array([-1e-3]))  # theta = 32: c is up the line
    assert loss.seen[1] == pytest.approx(first + -1e-3 * 32.0, rel=ROUNDING)
    assert second == 0.0 and stepper.previous_step == first  # 37.3 lies the other way
    loss.seen.clear()
    _, _, releases = stepper.step(model, basis, np.array([2e-3]))  # carries the -1e-3
    assert loss.seen[1] == pytest.approx(32.0 + 1e-3 * first, rel=ROUNDING) and releases == 2


@pytest.mark.parametrize("start", [1.0, 2**12])
def test_optima_beyond_the_range_stop_at_its_ends(start):
    """A target below MIN_STEP / 2 is best served by alpha = 0, one above MAX_STEP by MAX_STEP:
    nothing outside [MIN_STEP, MAX_STEP] is tried."""
    alpha, _, _, seen, _ = search(2**-12, start)
    assert alpha == 0.0 == grid_minimum(2**-12)
    assert min(a for a in seen if a > 0) == pytest.approx(MIN_STEP, rel=ROUNDING)
    alpha, _, _, seen, _ = search(2.0**25, 1.0)
    assert alpha == pytest.approx(MAX_STEP, rel=ROUNDING) and max(seen) <= MAX_STEP * (1 + ROUNDING)


SMALL, LARGE = 0.00317, 2.0**22
"""Targets whose grid minimum is an end of the range: (2^-8 - SMALL)^2 = 5.4e-7 < (2^-7.5 -
SMALL)^2 = 5.5e-6 < (0 - SMALL)^2 = 1.0e-5, and LARGE lies beyond MAX_STEP."""
assert (grid_minimum(SMALL), grid_minimum(LARGE)) == (MIN_STEP, MAX_STEP)


@pytest.mark.parametrize(("c", "start"), [(SMALL, 2**-6), (LARGE, 2**12), (LARGE, 3.0)])
def test_the_ends_of_the_range_are_reached_from_any_start(c, start):
    alpha, *_ = search(c, start)
    assert alpha == pytest.approx(grid_minimum(c), rel=ROUNDING)


def test_the_smallest_steps_are_tried_from_a_start_of_odd_exponent():
    alpha, *_ = search(SMALL, 3.0)
    assert alpha == pytest.approx(MIN_STEP, rel=ROUNDING)


def test_an_ascent_direction_keeps_the_model_bit_identical():
    alpha, value, _, seen, model = search(-1.0)
    assert alpha == 0.0 and value == 1.0
    assert float(model.theta.detach()) == 0.0 and seen[-1] != 0.0  # restored after the probes


def descent_direction(model, valid, scale):
    """``scale`` times the unit negative validation gradient, in identity-subspace coordinates."""
    model.zero_grad()
    loss_fn(model(valid[0]), valid[1]).mean().backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    return -scale * gradient / np.linalg.norm(gradient)


@pytest.mark.parametrize("start", [1.0, 2.0**12, 2.0**-6])
@pytest.mark.parametrize("scale", [1e-5, 1e-2, 1.0])
def test_line_search_finds_the_grid_minimum_however_short_the_step(scale, start):
    """Linear softmax regression: the validation loss is convex along the line, so the coarse-
    to-fine search must return the minimum over the whole grid {0} and 2^(j/2), 2^-8..2^20,
    which a brute force evaluates, whether the best step is short (scale 1) or long (1e-5),
    and whatever the warm start (the previous round's step) is."""
    model = make_linear(0)
    valid = make_task(300, 4, shift=0.8)
    basis = make_subspace("identity", model)
    w = descent_direction(model, valid, scale)
    step = basis.direction(model, torch.as_tensor(w))
    found = line_search_step(model, loss_fn, step, valid, start=start)
    alpha, loss = found.alpha, found.loss
    brute = []
    for a in GRID:
        trial = make_linear(0)
        basis.apply_step(trial, a * torch.as_tensor(w))
        brute.append(evaluate_loss(trial, loss_fn, valid))
    assert alpha == pytest.approx(GRID[int(np.argmin(brute))], rel=ROUNDING)
    assert loss == pytest.approx(min(brute), rel=1e-12)
    if scale != 1e-2:  # the search had to go far up (1e-5) or stay short (1)
        assert alpha > 256 if scale == 1e-5 else alpha < 16


def test_line_search_keeps_the_model_for_an_ascent_direction():
    model = make_linear(0)
    valid = make_task(300, 4, shift=0.8)
    basis = make_subspace("identity", model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ascent = basis.direction(model, torch.as_tensor(-descent_direction(model, valid, 1.0)))
    found = line_search_step(model, loss_fn, ascent, valid)
    alpha, loss = found.alpha, found.loss
    assert alpha == 0.0
    assert loss == pytest.approx(evaluate_loss(model, loss_fn, valid), rel=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


class FailsOnThirdPass:
    """The cross-entropy, raising at the third validation pass (a file that vanished)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("validation data unreadable (injected)")
        return loss_fn(outputs, targets)


def test_the_model_is_restored_when_the_search_fails():
    """An error in the middle of the search (theta moved to a probe) leaves every parameter of
    a float32 model bit-identical: step_probe restores theta on any exit."""
    model = make_linear(0).float()
    valid = tuple(t.float() if t.is_floating_point() else t for t in make_task(50, 4))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    direction = {n: torch.ones_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="injected"):
        line_search_step(model, FailsOnThirdPass(), direction, valid)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_step_probe_moves_only_the_named_parameters_in_their_dtype_and_restores_them():
    model = make_linear(0).float()
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    direction = {"weight": torch.full((3, 6), 0.5, dtype=torch.float64)}
    with pytest.raises(KeyboardInterrupt), step_probe(model, direction) as move:
        move(2.0)
        assert model.weight.dtype == torch.float32
        torch.testing.assert_close(model.weight.detach(), weight + 1.0, rtol=0, atol=1e-6)
        assert torch.equal(model.bias, bias)
        raise KeyboardInterrupt  # even an interrupt restores theta
    assert torch.equal(model.weight, weight) and torch.equal(model.bias, bias)


@pytest.mark.parametrize("c", OPTIMA)
def test_a_warm_search_from_the_optimum_makes_four_passes(c):
    """From the previous round's step, when it is this round's grid minimum: 0, it, and its two
    neighbours by sqrt(2)."""
    alpha, _, passes, seen, _ = search(c, start=grid_minimum(c), warm=True)
    assert alpha == pytest.approx(grid_minimum(c), rel=ROUNDING) and passes == 4
    assert len(seen) == 4


@pytest.mark.parametrize("c", OPTIMA)
@pytest.mark.parametrize("offset", [-3, 2])
def test_a_warm_search_walks_to_the_grid_minimum(c, offset):
    """From a start a few grid points off (but beating 0), the walk by sqrt(2) reaches the
    grid minimum of a unimodal loss; from a start that does not beat 0, the full search runs."""
    start = grid_minimum(c) * math.sqrt(2.0) ** offset
    alpha, value, _, _, _ = search(c, start=start, warm=True)
    if (start - c) ** 2 < c**2:
        assert alpha == pytest.approx(grid_minimum(c), rel=ROUNDING)
    else:  # the full search from start, as without warm
        assert (alpha, value) == search(c, start=start)[:2]


def significance_case(shift: float, noise: float, n: int = 400) -> StepSearch:
    g = torch.Generator().manual_seed(0)
    zero = torch.rand(n, generator=g, dtype=torch.float64)
    moved = zero - shift + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return StepSearch(1.0, float(moved.mean()), 3, zero, moved)


def test_a_step_is_significant_only_beyond_z_paired_standard_errors():
    """mean(d) < -z sd(d)/sqrt(n), checked against the statistic computed by hand."""
    for shift, noise in [(0.05, 0.1), (0.005, 0.1), (-0.01, 0.1), (0.0, 0.0)]:
        case = significance_case(shift, noise)
        d = (case.losses_at_alpha - case.losses_at_zero).numpy()
        t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d))) if d.std() > 0 else 0.0
        for z in (0.0, 1.0, 2.0):
            assert case.significant(z) == bool(d.mean() < 0 and t < -z), (shift, noise, z)
    assert significance_case(0.05, 0.1).significant(1.0)  # a clear descent is kept
    assert not significance_case(0.002, 0.1).significant(1.0)  # within its noise: not
    assert not StepSearch(0.0, 0.0, 1, torch.zeros(3), torch.zeros(3)).significant(0.0)
