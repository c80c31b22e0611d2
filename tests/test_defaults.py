"""qem.defaults' recipe: the default schedule follows from N (public: the record count under
replace-one, the declared N under add/remove), the subspace from the model's layer types, the
curvature from the subspace, and k is min(d, SUBSPACE_K) for every kind that takes a k."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cases import blob_task, make_linear, run
from qem.defaults import MAX_DEFAULT_ROUNDS, ROUND_RECORDS, SUBSPACE_K, default_schedule
from qem.public.config import PublicSide
from qem.subspace.kronecker import Kronecker


def test_the_default_schedule_follows_from_n_and_the_mode():
    one = {"kind": "sequential", "rounds": 1}
    assert default_schedule(10) == default_schedule(2 * ROUND_RECORDS) == one
    assert default_schedule(2 * ROUND_RECORDS + 1) == {
        "kind": "poisson",
        "expected_batch": ROUND_RECORDS,
        "rounds": 2,
    }
    assert default_schedule(49_000)["rounds"] == round(49_000 / ROUND_RECORDS) == 48
    assert default_schedule(10**7)["rounds"] == MAX_DEFAULT_ROUNDS
    assert default_schedule(10**7, "pure") == one  # no subsampled accountant in pure mode


class Embedded(nn.Module):
    """A trainable nn.Embedding (which Kronecker does not span) in front of a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.head = nn.Embedding(5, 4), nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


def test_the_auto_subspace_is_kronecker_where_it_spans_the_model_and_srht_elsewhere():
    side = PublicSide()
    assert side.subspace == "auto" and side.curvature is None  # resolved with the model
    spanned = side.for_model(make_linear())
    assert (spanned.subspace, spanned.curvature) == ("kronecker", "kfac")
    other = side.for_model(Embedded())
    assert (other.subspace, other.curvature) == ("srht", "ggn")
    head_only = PublicSide(layers=["head"]).for_model(Embedded())
    assert (head_only.subspace, head_only.curvature) == ("kronecker", "kfac")
    kept = PublicSide(subspace="srht").for_model(make_linear())
    assert (kept.subspace, kept.curvature) == ("srht", "ggn")  # a kind given is kept


def test_the_curvature_follows_from_the_subspace():
    assert PublicSide(subspace="srht").curvature == "ggn"
    assert PublicSide(subspace=Kronecker(make_linear(), seed=0)).curvature == "kfac"
    assert PublicSide(subspace="kronecker", curvature="ggn").curvature == "ggn"  # kept as given


def test_k_is_min_d_and_subspace_k():
    # every entry of the 3 x 6 weight and its bias column: 3 x (6 + 1)
    assert Kronecker(make_linear(), seed=0).k == 21
    assert SUBSPACE_K == 1024


@pytest.mark.parametrize(("n", "kind", "rounds"), [(300, "sequential", 1), (2100, "poisson", 2)])
def test_fine_tune_without_a_schedule_runs_the_default_for_n(n, kind, rounds):
    task = blob_task(sizes=(100, n, 100), model=make_linear)
    result = run(task, epsilon=1.0, delta=1e-5, schedule=None, rounds=None, seed=0)
    assert result.report.schedule["kind"] == kind and len(result.report.rounds) == rounds


def test_under_add_remove_the_default_schedule_follows_the_declared_n_not_the_count():
    """The private count is not public under add/remove: 300 records with a declared N of
    3,000 get the schedule of 3,000 (Poisson, round(3000 / 1024) = 3 rounds), not of 300."""
    task = blob_task(sizes=(100, 300, 100), model=make_linear)
    options = {"epsilon": 1.0, "schedule": None, "rounds": None, "seed": 0}
    result = run(task, adjacency="add_remove", N=3000, **options)
    assert result.report.schedule["kind"] == "poisson" and len(result.report.rounds) == 3
    assert run(task, **options).report.schedule["kind"] == "sequential"  # replace-one: 300
