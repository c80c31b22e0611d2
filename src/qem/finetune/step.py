"""Step 4 of a round, post-processing of the release with public data (docs/theory.md §9):
theta <- theta + alpha d_t, d_t = P_t w_t (+ m alpha_{t-1} d_{t-1} with momentum m), alpha from
a line search on the public validation data, warm-started at the previous positive step, or
alpha = 1 without one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from qem.linesearch import line_search_step
from qem.losses import LossFn
from qem.subspace.base import Subspace, add_to_parameters


@dataclass
class Stepper:
    """The step rule of a run (module docstring), with the state it carries across rounds."""

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
