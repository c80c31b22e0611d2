"""Worst-case neighbouring datasets for the pair audits (docs/theory.md §17).

The model is a bias-free linear classifier nn.Linear(FEATURES, 2) at theta0 = 0 (float64). The
differing record z has input x = REACH e_last, a feature that nothing else touches: the public
records are random in the other features (so that the public curvature is not a multiple of
the identity) and 0 in the last one; the other private records have input 0, hence gradient 0
at every theta (no bias), so that they shift neither side and Poisson sampling of them adds
nothing.

Why the pair is worst case for every subspace, curvature and clip norm, in every round: with
two classes the gradient of z is (softmax(W x) - e_y) x^T = p_1 (-1, 1)^T x^T for y = 0 and
p_0 (1, -1)^T x^T for y = 1, so the two gradients point in opposite directions at ANY theta,
and stay opposite after any linear projection P^T and any whitening L^-1. Clipped in the dual
norm (when clipping binds, which the audit checks round by round) they are u and -u with
||u|| = C: the difference has the largest dual norm any pair can have, s C (s = 2 replace-one;
add/remove adds u alone, s = 1). Under Euclidean clipping the bound is C / sqrt(lambda_min(A))
and it is attained only along an eigenvector of lambda_min(A): with the identity subspace the
record's gradient lies in the last feature's weights, where the public curvature is 0 and A =
gamma I = lambda_min(A) I, so the pair is worst case there (and the audit says so elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qem.losses import cross_entropy
from qem.privacy.sensitivity import Adjacency

FEATURES = 8
"""Input features; the last one is used only by the differing record."""
PUBLIC_RECORDS = 80
"""Public records (the last 20% of them become the line search's validation split)."""
RECORDS = 64
"""Private records of the larger dataset of a pair (all but z have input 0)."""
REACH = 20.0
"""The differing record is x = REACH e_last: at theta0 its gradient has Euclidean norm
REACH / sqrt(2), far above the public gradients' norms (the public clip-norm quantile), and
the released steps move its logit by O(1) only, so clipping keeps binding in later rounds."""
PUBLIC_SCALES = np.geomspace(0.3, 3.0, FEATURES - 1)
"""Standard deviations of the public features: a curvature with eigenvalues spread over two
orders of magnitude."""

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class WorstCasePair:
    """Neighbouring private datasets D, D' and everything public about them.

    ``without`` is D with z's input set to 0 (z then contributes nothing; same size): the
    Poisson rounds that do not sample z. ``direction`` is v (unit norm, over
    ``model.parameters()``): D' moves t = v^T (theta - theta0) up. ``N`` is the declared size
    under add/remove, else None. z is the last row (``record``), so that a partitioned schedule
    puts it in its last chunk.
    """

    model: nn.Module
    public: Data
    private: Data
    neighbour: Data
    without: Data
    direction: torch.Tensor
    N: int | None
    record: int


def worst_case_pair(adjacency: Adjacency | str, seed: int = 0) -> WorstCasePair:
    """The pair of the module docstring. replace_one: D = others + (x, 0), D' = others + (x, 1);
    add_remove: D = others, D' = others + (x, 1), N = |D'|. Data from numpy's PCG64 (``seed``),
    the same on every machine."""
    adjacency = Adjacency(adjacency)
    rng = np.random.default_rng(seed)
    x = np.zeros((PUBLIC_RECORDS, FEATURES))
    x[:, :-1] = rng.standard_normal((PUBLIC_RECORDS, FEATURES - 1)) * PUBLIC_SCALES
    public = (torch.from_numpy(x), torch.from_numpy(rng.integers(0, 2, PUBLIC_RECORDS)))

    model = nn.Linear(FEATURES, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    others = torch.zeros(RECORDS - 1, FEATURES, dtype=torch.float64)
    other_labels = torch.from_numpy(rng.integers(0, 2, RECORDS - 1))
    far = torch.zeros(1, FEATURES, dtype=torch.float64)
    far[0, -1] = REACH

    def with_record(inputs: torch.Tensor, label: int) -> Data:
        return torch.cat([others, inputs]), torch.cat([other_labels, torch.tensor([label])])

    def gradient(label: int) -> torch.Tensor:
        model.zero_grad()
        cross_entropy(model(far), torch.tensor([label])).sum().backward()
        return model.weight.grad.reshape(-1).detach().clone()

    if adjacency is Adjacency.REPLACE_ONE:
        private, neighbour, N = with_record(far, 0), with_record(far, 1), None
        without = with_record(torch.zeros_like(far), 0)
        direction = gradient(0) - gradient(1)
    else:
        private = without = (others, other_labels)
        neighbour, N = with_record(far, 1), RECORDS
        direction = -gradient(1)
    model.zero_grad(set_to_none=True)
    return WorstCasePair(
        model, public, private, neighbour, without, direction / direction.norm(), N, RECORDS - 1
    )


def parameter_vector(model: nn.Module) -> torch.Tensor:
    """theta of ``model`` as one vector (``parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def statistic(model: nn.Module, pair: WorstCasePair) -> float:
    """t = v^T (theta - theta0) of a released model (the end-to-end audit's statistic)."""
    return float((parameter_vector(model) - parameter_vector(pair.model)) @ pair.direction)
