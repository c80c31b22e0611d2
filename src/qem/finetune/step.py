"""Step 5 of a round, post-processing of the releases with public data (docs/theory.md §9):
theta <- theta + alpha d_t with

    d_t = P_t w_t  +  m alpha_{t-1} d_{t-1}  +  c_t ,

momentum m, and c_t the releases not applied so far (the sum of the directions of the rounds
since the last step taken, §9b): a release whose step was not taken is still a public vector,
and the next round's search runs along it plus its own. alpha comes from a line search on the
public validation data (warm-started at the previous positive step) and is kept only when the
validation loss falls by more than ``accept_z`` paired standard errors; without validation data
alpha = 1. With ``confirmation`` (public examples the search does not read) the test runs on
them instead, free of the bias of testing alpha on the examples that chose it (docs/theory.md
§9b). Every input of the rule is public or a release, so the rule costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from qem.linesearch import StepSearch, line_search_step, significant_decrease, step_probe
from qem.losses import LossFn
from qem.metrics import example_losses
from qem.subspace.base import Subspace, add_to_parameters

Direction = dict[str, torch.Tensor]


@dataclass
class Stepper:
    """The step rule of a run (module docstring), with the state it carries across rounds."""

    loss_fn: LossFn
    validation: Dataset | None
    momentum: float
    accept_z: float | None = 1.0
    confirmation: Dataset | None = None
    previous_step: float | None = None
    velocity: Direction | None = None
    carried: Direction | None = None
    carried_releases: int = 0

    def step(self, model: nn.Module, basis: Subspace, w: np.ndarray) -> np.ndarray:
        """Apply the step to ``model``; return [alpha, public validation loss (NaN without a
        search), releases in the step tried (1 + those carried)]."""
        step = basis.direction(model, torch.as_tensor(w, dtype=torch.float64))
        step = _plus(step, self.carried)
        if self.momentum and self.velocity is not None:
            step = _plus(step, {n: self.momentum * v for n, v in self.velocity.items()})
        releases = 1 + self.carried_releases
        if self.validation is None:
            alpha, val_loss = 1.0, math.nan
        else:
            search = line_search_step(
                model, self.loss_fn, step, self.validation,
                start=self.previous_step or 1.0, warm=self.previous_step is not None,
            )  # fmt: skip
            accepted = self.accept_z is None or self._significant(model, step, search)
            alpha = search.alpha if accepted else 0.0
            val_loss = search.loss if accepted else float(search.losses_at_zero.mean())
        add_to_parameters(model, step, alpha)
        self.velocity = {name: alpha * d for name, d in step.items()}
        if alpha > 0:
            self.previous_step, self.carried, self.carried_releases = alpha, None, 0
        else:  # nothing applied: the releases in ``step`` are carried into the next round's
            self.carried = {n: d for n, d in step.items()}
            self.carried_releases = releases
        return np.array([alpha, val_loss, releases])

    def _significant(self, model: nn.Module, step: Direction, search: StepSearch) -> bool:
        """The acceptance test of the searched step: on the confirmation examples when there
        are some (two passes over them), else on the search's own."""
        if self.confirmation is None or search.alpha == 0.0:
            return search.significant(self.accept_z)
        with step_probe(model, step) as move:
            at_zero = example_losses(model, self.loss_fn, self.confirmation)
            move(search.alpha)
            at_alpha = example_losses(model, self.loss_fn, self.confirmation)
        return significant_decrease(at_zero, at_alpha, self.accept_z)


def _plus(a: Direction, b: Direction | None) -> Direction:
    """a + b, parameter by parameter (b may name a subset of a's parameters, or be None)."""
    if b is None:
        return a
    return {name: value + b[name] if name in b else value for name, value in a.items()} | {
        name: value for name, value in b.items() if name not in a
    }
