"""qem.baselines: DP-SGD through Opacus, non-private fine-tuning, no fine-tuning, the registry.

Tiny synthetic task: 200 examples, 5 features, a linearly separable label, logistic
regression in float64.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from opacus.accountants import create_accountant
from torch import nn

import qem.baselines.registry as registry
from qem.baselines.dpsgd import dpsgd
from qem.baselines.none import none
from qem.baselines.nonprivate import nonprivate
from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.finetune import FineTuneResult
from qem.losses import cross_entropy
from qem.metrics import evaluate_loss
from qem.privacy.calibration import (
    accountant_epsilon,
    calibrate_noise_multiplier,
    poisson_gaussian_event,
)
from qem.privacy.ledger import dp_event_from_json
from qem.privacy.pld import PLD_DISCRETIZATION

N, BATCH, EPOCHS, DELTA = 200, 50, 5, 1e-5


def make_task(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Linear(5, 2).double()
    with torch.no_grad():  # start at chance: constant logits
        model.weight.zero_()
        model.bias.zero_()
    return model


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).double().mean())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def dpsgd_event_of(accountant: dict):
    return poisson_gaussian_event(
        accountant["noise_multiplier"], accountant["sample_rate"], accountant["steps"]
    )


def independent_pld_epsilon(sigma: float, q: float, steps: int, relation) -> float:
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )
    accountant = PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    return accountant.compose(event).get_epsilon(DELTA)


def independent_opacus_epsilon(sigma: float, q: float, steps: int) -> float:
    accountant = create_accountant("prv")
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(DELTA)


def run_dpsgd(model, adjacency: str, epsilon: float = 4.0, seed: int | None = 1, data=None):
    private = make_task() if data is None else data
    return dpsgd(
        model,
        cross_entropy,
        make_task(50, seed=9),
        private,
        epsilon=epsilon,
        delta=DELTA,
        adjacency=adjacency,
        seed=seed,
        progress=False,
        lr=0.5,
        batch_size=BATCH,
        epochs=EPOCHS,
    )


@pytest.fixture(scope="module")
def replace_one_run():
    model = make_model().eval()  # a pretrained model usually arrives in eval mode
    before = copy.deepcopy(model)
    return model, before, run_dpsgd(model, "replace_one")


def test_dpsgd_learns_a_separable_task(replace_one_run):
    model, _, result = replace_one_run
    data = make_task(1000, seed=5)
    assert accuracy(model, data) < 0.6
    assert accuracy(result.model, data) > 0.85


def test_dpsgd_leaves_the_input_model_unchanged(replace_one_run):
    model, before, result = replace_one_run
    assert same_weights(model, before)
    assert not model.training  # the caller's mode is untouched
    assert not same_weights(result.model, before)
    assert type(result.model) is type(model) and not hasattr(result.model, "_module")


def test_dpsgd_replace_one_epsilon_is_dp_accountings_and_meets_target(replace_one_run):
    _, _, result = replace_one_run
    report = result.report.to_dict()
    acc = report["accountant"]
    q, steps = 1 / math.ceil(N / BATCH), EPOCHS * math.ceil(N / BATCH)
    relation = acc["neighboring_relation"]
    assert (acc["sample_rate"], acc["steps"], relation) == (q, steps, "REPLACE_ONE")
    sigma = acc["noise_multiplier"]
    expected = independent_pld_epsilon(sigma, q, steps, NeighboringRelation.REPLACE_ONE)
    assert report["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert 4.0 - 0.05 < report["epsilon"] <= 4.0
    assert acc["opacus_prv_epsilon_add_remove"] == pytest.approx(
        independent_opacus_epsilon(sigma, q, steps), rel=1e-9
    )
    assert acc["opacus_prv_epsilon_add_remove"] < report["epsilon"]
    assert report["method"] == "dpsgd" and report["adjacency"] == "replace_one"
    assert report["noise"] == {"source": "user_seed", "seed": 1}
    assert set(result.diagnostics.seconds) == {"calibration", "training", "accounting"}
    assert "seconds" not in report  # timings are diagnostics, not part of the report
    assert dp_event_from_json(acc["dp_event"]) == dpsgd_event_of(acc)
    json.dumps(report, allow_nan=False)


def test_dpsgd_add_remove_agrees_with_opacus_accountant():
    result = run_dpsgd(make_model(), "add_remove")
    acc = result.report.to_dict()["accountant"]
    sigma, q, steps = acc["noise_multiplier"], acc["sample_rate"], acc["steps"]
    expected = independent_pld_epsilon(sigma, q, steps, NeighboringRelation.ADD_OR_REMOVE_ONE)
    assert result.report.to_dict()["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert result.report.to_dict()["epsilon"] <= 4.0
    opacus = independent_opacus_epsilon(sigma, q, steps)
    assert acc["opacus_prv_epsilon_add_remove"] == pytest.approx(opacus, rel=1e-9)
    assert (
        abs(opacus - result.report.to_dict()["epsilon"]) < 0.03
    )  # two accountants, same mechanism


def test_replace_one_needs_more_noise_than_add_remove():
    q, steps, eps = 0.25, 20, 2.0
    add_remove = calibrate_noise_multiplier(eps, DELTA, q, steps, adjacency="add_remove")
    replace_one = calibrate_noise_multiplier(eps, DELTA, q, steps, adjacency="replace_one")
    assert replace_one > 1.2 * add_remove
    for sigma, adjacency in ((add_remove, "add_remove"), (replace_one, "replace_one")):
        for z, meets in ((sigma, True), (0.99 * sigma, False)):  # tight to 1%
            event = poisson_gaussian_event(z, q, steps)
            assert (accountant_epsilon(event, DELTA, adjacency) <= eps) == meets
    # Without subsampling, replacing a record is add/remove at twice the sensitivity.
    full_ar = calibrate_noise_multiplier(eps, DELTA, 1.0, 4, adjacency="add_remove")
    full_r1 = calibrate_noise_multiplier(eps, DELTA, 1.0, 4, adjacency="replace_one")
    assert full_r1 == pytest.approx(2 * full_ar, rel=2e-3)


def test_dpsgd_seed_reproduces_and_os_entropy_is_recorded():
    model = make_model()
    first = run_dpsgd(model, "replace_one", epsilon=1.0, seed=7)
    again = run_dpsgd(model, "replace_one", epsilon=1.0, seed=7)
    other = run_dpsgd(model, "replace_one", epsilon=1.0, seed=None)
    assert same_weights(first.model, again.model)
    assert not same_weights(first.model, other.model)
    assert other.report.noise == {"source": "os_entropy", "seed": None}


def test_dpsgd_survives_empty_poisson_batches():
    # q = 0.2 on 10 records: P(some batch of 25 is empty) > 0.9; the seed makes it certain.
    x, y = make_task(10, seed=3)
    sizes = []

    def recording_loss(outputs, targets):
        sizes.append(outputs.shape[0])
        return cross_entropy(outputs, targets)

    result = dpsgd(
        make_model(),
        recording_loss,
        (x, y),
        (x, y),
        epsilon=2.0,
        delta=1e-3,
        seed=0,
        progress=False,
        batch_size=2,
        epochs=5,
    )
    assert 0 in sizes
    assert result.report.to_dict()["accountant"]["steps"] == 25
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_dpsgd_rejects_batchnorm_before_any_work():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedModelError, match="GroupNorm"):
        run_dpsgd(model, "replace_one")


@pytest.mark.parametrize("method", [dpsgd, nonprivate, none])
@pytest.mark.parametrize(
    ("epsilon", "delta"),
    [(0.0, 1e-5), (-1.0, 1e-5), (math.nan, 1e-5), (1.0, 0.0), (1.0, 1.0), (1.0, -0.1)],
)
def test_bad_budget_raises(method, epsilon, delta):
    with pytest.raises(InvalidParameterError):
        method(
            make_model(),
            cross_entropy,
            make_task(20),
            make_task(20),
            epsilon=epsilon,
            delta=delta,
            progress=False,
        )


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"optimizer": "rmsprop"},
        {"lr": 0.0},
        {"max_grad_norm": -1.0},
        {"epochs": 0},
        {"batch_size": 2.5},
        {"momentum": 1.0},
        {"adjacency": "swap"},
    ],
)
def test_dpsgd_bad_hyperparameters_raise(hyperparameters):
    with pytest.raises(InvalidParameterError):
        dpsgd(
            make_model(),
            cross_entropy,
            make_task(20),
            make_task(20),
            epsilon=1.0,
            delta=DELTA,
            progress=False,
            **hyperparameters,
        )


def test_nonprivate_improves_training_loss_and_is_marked_not_private():
    model, private = make_model(), make_task()
    before = copy.deepcopy(model)
    result = nonprivate(
        model,
        cross_entropy,
        make_task(50, seed=9),
        private,
        epsilon=1.0,
        delta=DELTA,
        seed=0,
        progress=False,
        lr=0.05,
        epochs=5,
        batch_size=50,
    )
    assert same_weights(model, before)
    assert evaluate_loss(result.model, cross_entropy, private) < 0.7 * evaluate_loss(
        model, cross_entropy, private
    )
    assert result.report.to_dict()["epsilon"] is None
    assert result.report.to_dict()["privacy"].startswith("NOT PRIVATE")
    assert result.report.details["requested_budget"] == {"epsilon": 1.0, "delta": DELTA}
    json.dumps(result.report.to_dict(), allow_nan=False)


def test_nonprivate_early_stopping_keeps_the_best_public_epoch():
    public, validation = make_task(50, seed=9), make_task(50, seed=11)
    result = nonprivate(
        make_model(),
        cross_entropy,
        public,
        make_task(),
        validation_data=validation,
        seed=0,
        progress=False,
        lr=0.5,
        epochs=8,
        batch_size=20,
        early_stopping=True,
        patience=2,
    )
    losses = [r["validation_loss"] for r in result.report.details["history"]]
    assert evaluate_loss(result.model, cross_entropy, validation) == pytest.approx(min(losses))
    best = losses.index(min(losses))
    assert len(losses) - 1 == 8 or len(losses) - 1 - best == 2  # ran out or lost patience


def test_none_returns_an_equal_independent_copy():
    model = make_model(seed=3)
    with torch.no_grad():
        model.weight.normal_()
    result = none(model, cross_entropy, make_task(20), make_task(20), epsilon=1.0, delta=DELTA)
    assert same_weights(result.model, model) and result.model is not model
    with torch.no_grad():
        result.model.weight.add_(1.0)
    assert not same_weights(result.model, model)
    assert result.report.to_dict()["epsilon"] == 0.0 and result.report.to_dict()["method"] == "none"


def test_registry_names_and_dispatch(monkeypatch):
    assert set(registry.METHODS) == {"qem", "qem_identity", "dpsgd", "nonprivate", "none"}
    with pytest.raises(InvalidParameterError, match="dpsgd"):
        registry.run_method("dp-sgd", make_model(), cross_entropy, make_task(20), make_task(20))
    result = registry.run_method(
        "none", make_model(), cross_entropy, make_task(20), make_task(20), epsilon=1.0, delta=DELTA
    )
    assert result.report.to_dict()["method"] == "none"

    calls = []

    def fake_fine_tune(model, loss_fn, public, private, **kwargs):
        calls.append(kwargs)
        return FineTuneResult(model=copy.deepcopy(model), report={"mode": "gdp"})

    monkeypatch.setattr(registry, "fine_tune", fake_fine_tune)
    args = (make_model(), cross_entropy, make_task(20), make_task(20))
    registry.run_method("qem", *args, epsilon=1.0, delta=DELTA, rounds=3, seed=4)
    registry.run_method("qem_identity", *args, epsilon=1.0, delta=DELTA)
    assert calls[0]["rounds"] == 3 and calls[0]["seed"] == 4 and "curvature" not in calls[0]
    assert calls[1]["curvature"] == "identity"
    with pytest.raises(InvalidParameterError, match="identity"):
        registry.run_method("qem_identity", *args, epsilon=1.0, delta=DELTA, curvature="ggn")
