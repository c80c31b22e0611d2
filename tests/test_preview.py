"""qem.preview and ``qem preview``: the closed forms equal the mechanism's preview on an explicit
k x k matrix, the round budgets equal qem.schedules' plans, any k works without a k x k matrix,
and the preview of ``--model``/``--public`` is what fine_tune reports for the same inputs."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from cli_files import TINY_FACTORY, write_blobs
from qem.cli.main import main
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.mechanism import QuadraticExponentialMechanism
from qem.mechanism import quadratic as quadratic_module
from qem.preview import (
    TARGET_ACCEPTANCE,
    closed_form_preview,
    schedule_round,
    sequential_round,
)
from qem.privacy.budget import Budget
from qem.privacy.sensitivity import Adjacency
from qem.schedules import make_schedule

SPECTRUM = np.array([0.05, 0.3, 1.0, 2.5, 7.0])


def mechanism_preview(budget, A, **options) -> dict:
    """The preview of the mechanism built on the matrix A, calibrated as fine_tune calibrates a
    round (noise multiplier in gdp mode, the round's epsilon in pure mode)."""
    mechanism = QuadraticExponentialMechanism(A, N=budget.N, **options)
    if options.get("mode", "gdp") == "gdp":
        return mechanism.set_noise_multiplier(budget.noise_multiplier).to_dict()
    return mechanism.calibrate(budget.epsilon).to_dict()


@pytest.mark.parametrize("mode", ["gdp", "pure"])
@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
@pytest.mark.parametrize("adjacency", ["replace_one", "add_remove"])
def test_the_closed_form_is_the_mechanisms_preview(mode, clipping, adjacency):
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(len(SPECTRUM),) * 2))
    A = (Q * SPECTRUM) @ Q.T  # a dense A with this spectrum: only k and lambda_min matter
    budget = sequential_round(2.0, 1e-5, mode, adjacency, N=500, rounds=3)
    options = dict(lam=0.7, clip_norm=1.7, adjacency=adjacency, clipping=clipping, mode=mode)
    expected = mechanism_preview(budget, A, **options)
    got = closed_form_preview(
        budget, k=len(SPECTRUM), lambda_min=SPECTRUM.min(), **options, epsilon=2.0, delta=1e-5
    )
    assert set(got) == set(expected)
    for key, value in expected.items():
        if key in ("epsilon", "delta"):
            continue  # the preview echoes the run's target; the round's mechanism has its own
        if isinstance(value, float):
            # the same formulas; A's eigenvalues from eigvalsh carry ~1e-15 relative error
            assert got[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("mode", ["gdp", "pure"])
@pytest.mark.parametrize("rounds", [1, 4])
def test_sequential_rounds_are_the_schedules_plan(mode, rounds):
    delta = None if mode == "pure" else 1e-5
    plan = make_schedule({"kind": "sequential", "rounds": rounds}).plan(
        Budget(1.5, delta, mode, Adjacency.REPLACE_ONE), 800
    )
    first = next(iter(plan.rounds()))
    got = sequential_round(1.5, 1e-5, mode, "replace_one", 800, rounds)
    assert (got.N, got.rounds) == (first.N, rounds)
    assert got.noise_multiplier == first.noise_multiplier  # the same arithmetic: exact
    assert got.epsilon == first.epsilon and got.mu == plan.mu


def test_other_schedules_are_calibrated_by_qem_schedules():
    spec = {"kind": "poisson", "sampling_rate": 0.1, "rounds": 20}
    budget = Budget(1.0, 1e-5, "gdp", Adjacency.REPLACE_ONE)
    plan = make_schedule(spec).plan(budget, 2000)
    got = schedule_round(spec, 1.0, 1e-5, "gdp", "replace_one", 2000)
    assert got.N == 200.0 and got.rounds == 20 and got.mu is None
    assert got.noise_multiplier == plan.noise_multiplier


def test_the_target_acceptance_is_the_mechanisms():
    assert TARGET_ACCEPTANCE == quadratic_module.TARGET_ACCEPTANCE


@pytest.mark.parametrize("mode", ["gdp", "pure"])
def test_any_k_without_a_k_by_k_matrix(mode):
    """k = 100,000 was a 74.5 GiB allocation; the closed form holds no array of size k."""
    budget = sequential_round(1.0, 1e-5, mode, "replace_one", N=49_000)
    tracemalloc.start()
    preview = closed_form_preview(budget, k=100_000, lambda_min=0.01, clip_norm=1.0, mode=mode)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20  # bytes; a k-vector of float64 alone would be 0.8 MB, A 80 GB
    assert preview["expected_excess_loss"] == pytest.approx(
        100_000 / (2 * preview["beta"] * 49_000)
    )
    if mode == "pure":
        assert preview["worst_case_acceptance"] == pytest.approx(TARGET_ACCEPTANCE, abs=1e-6)


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    (tmp_path / "tiny_net.py").write_text(TINY_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_blobs(tmp_path, {"public": 70, "private": 90, "valid": 30})


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
def test_the_preview_of_model_and_public_data_is_what_fine_tune_reports(
    tiny_task, capsys, validation, clipping
):
    from tiny_net import build

    options = {"epsilon": 2.0, "k": 12, "subspace": "srht", "clipping": clipping, "seed": 0}
    result = fine_tune(
        build(),
        cross_entropy,
        tiny_task["public"],
        tiny_task["private"],
        validation_data=tiny_task["valid"] if validation else None,
        **options,
    )
    argv = ["preview", "--model", "tiny_net:build", "--public", "public.npz", "--n", "90"]
    argv += ["--epsilon", "2", "--k", "12", "--subspace", "srht", "--clipping", clipping]
    argv += ["--validation", "valid.npz"] if validation else []
    assert main([*argv, "--json"]) == 0
    preview = json.loads(capsys.readouterr().out)
    reported = result.report.rounds[0]
    assert preview["k"] == result.report.k == 12
    # C: the same public quantile of the same per-example norms, computed by the same code on
    # the same float32 model; the rest follows from C in float64.
    assert preview["clip_norm"] == pytest.approx(reported.clip_norm, rel=1e-6)
    assert preview["mu"] == pytest.approx(reported.preview["mu"], rel=1e-9)
    for key in ("beta", "expected_excess_loss", "noise_scale"):
        assert preview[key] == pytest.approx(reported.preview[key], rel=1e-5), key
    assert preview["public_loss"] > 0 and preview["excess_vs_public_loss"] > 0
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "public quantile 0.9" in text and "x the pretrained model's public loss" in text


def test_the_preview_says_when_c_is_assumed(capsys):
    assert main(["preview", "--epsilon", "1", "--n", "1000", "--k", "10"]) == 0
    assert "C = 1 is assumed" in capsys.readouterr().out
    assert main(["preview", "--epsilon", "1", "--n", "1000", "--k", "10", "-C", "2"]) == 0
    assert "assumed" not in capsys.readouterr().out


@pytest.mark.parametrize("adjacency", ["replace_one", "add_remove"])
def test_noise_dominated_rounds_is_where_the_round_noise_reaches_n_c(adjacency):
    """At T* the noise norm of a sequential round, z C sqrt(k) (z = s sqrt(T) / mu), equals the
    largest clipped sum n C; mu checked against the exact Gaussian-DP profile
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (docs/theory.md §2)."""
    from scipy.stats import norm

    from qem.preview import noise_dominated_rounds

    epsilon, delta, n, k = 1.0, 1e-5, 300, 1024
    limit = noise_dominated_rounds(epsilon, delta, adjacency, n, k)
    z = sequential_round(epsilon, delta, "gdp", adjacency, n, rounds=1).noise_multiplier
    assert z * np.sqrt(limit) * np.sqrt(k) == pytest.approx(n, rel=1e-12)
    s = Adjacency(adjacency).multiplier
    mu = s * np.sqrt(k * limit) / n  # T* = (n mu / (s sqrt k))^2 solved for mu
    profile = norm.cdf(-epsilon / mu + mu / 2) - np.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
    assert profile == pytest.approx(delta, rel=1e-6)


def test_the_preview_prints_the_rounds_regime_and_the_default_schedule(capsys):
    assert main(["preview", "--epsilon", "1", "--n", "300", "--k", "1024", "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["rounds"] == 1  # n <= 2048: the default is one sequential round
    assert 1 < fields["noise_dominated_rounds"] < 2  # (300 mu / (2 * 32))^2 with mu ~ 0.27
    assert main(["preview", "--epsilon", "8", "--n", "49000", "--k", "1024"]) == 0
    out = capsys.readouterr().out
    assert "poisson with 48 round(s) of 1024 expected records" in " ".join(out.split())
