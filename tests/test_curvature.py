"""qem.curvature: each curvature type against a dense brute force on tiny float64 models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.data import TensorDataset

import qem.progress
from qem.curvature import (
    EmpiricalFisher,
    GaussNewton,
    Hessian,
    IdentityCurvature,
    fingerprint,
    make_curvature,
)
from qem.errors import CurvatureError, InvalidParameterError, NonFiniteError, ShapeError
from qem.losses import cross_entropy, squared_error
from qem.parameters import unflatten
from qem.subspace.base import Subspace

GAMMA = 0.3
K = 6
N = 10


class DenseTestSubspace(Subspace):
    """P = Q of a seeded Gaussian (d, k): orthonormal columns, explicit."""

    kind = "dense-test"

    def __init__(self, model: nn.Module, k: int, seed: int = 0) -> None:
        super().__init__(model, k, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(self.d, k, generator=gen, dtype=torch.float64)
        self.P = torch.linalg.qr(gaussian)[0]

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return self._vectors(g, self.d) @ self.P

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        return self._vectors(w, self.k) @ self.P.T


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()


def data_for(model_name: str, loss_fn, n: int = N, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 4) if model_name == "mlp" else (n, 1, 5, 5)
    inputs = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if loss_fn is cross_entropy:
        targets = torch.randint(0, 3, (n,), generator=gen)
    else:
        targets = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return inputs, targets


MODELS = {"mlp": mlp, "cnn": cnn}


def flat_theta(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def output_at(model: nn.Module, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    params = unflatten(theta, dict(model.named_parameters()))
    return functional_call(model, params, (inputs,))


def damped(P: torch.Tensor, H: torch.Tensor, clamp: bool = False) -> np.ndarray:
    M = (P.T @ H @ P).numpy()
    M = 0.5 * (M + M.T)
    if clamp:
        lam, V = np.linalg.eigh(M)
        M = (V * np.maximum(lam, 0)) @ V.T
    return M + GAMMA * np.eye(P.shape[1])


def brute_ggn(model, loss_fn, P, inputs, targets) -> np.ndarray:
    theta = flat_theta(model)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for x, y in zip(inputs, targets, strict=True):
        J = jacobian(lambda t, x=x: output_at(model, t, x[None])[0], theta)
        out = output_at(model, theta, x[None])[0].detach()
        HL = hessian(lambda o, y=y: loss_fn(o[None], y[None]).sum(), out)
        G += J.T @ HL @ J
    return damped(P, G / len(inputs))


def brute_fisher(model, loss_fn, P, inputs, targets) -> np.ndarray:
    F = torch.zeros(P.shape[0], P.shape[0], dtype=torch.float64)
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        loss_fn(model(x[None]), y[None]).sum().backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        F += torch.outer(g, g)
    return damped(P, F / len(inputs))


def brute_hessian(model, loss_fn, P, inputs, targets) -> np.ndarray:
    H = hessian(lambda t: loss_fn(output_at(model, t, inputs), targets).mean(), flat_theta(model))
    return damped(P, H, clamp=True)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_fn", [cross_entropy, squared_error])
def test_ggn_matches_brute_force(model_name, loss_fn):
    model = MODELS[model_name]()
    sub = DenseTestSubspace(model, K)
    inputs, targets = data_for(model_name, loss_fn)
    A = GaussNewton(GAMMA, batch_size=4, progress=False).matrix(
        model, loss_fn, sub, (inputs, targets)
    )
    assert A.dtype == np.float64 and A.shape == (K, K)
    np.testing.assert_allclose(A, brute_ggn(model, loss_fn, sub.P, inputs, targets), atol=1e-10)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_fn", [cross_entropy, squared_error])
def test_fisher_matches_brute_force(model_name, loss_fn):
    model = MODELS[model_name]()
    sub = DenseTestSubspace(model, K)
    inputs, targets = data_for(model_name, loss_fn)
    A = EmpiricalFisher(GAMMA, batch_size=4, progress=False).matrix(
        model, loss_fn, sub, (inputs, targets)
    )
    expected = brute_fisher(model, loss_fn, sub.P, inputs, targets)
    np.testing.assert_allclose(A, expected, atol=1e-10)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_fn", [cross_entropy, squared_error])
def test_hessian_matches_brute_force(model_name, loss_fn):
    model = MODELS[model_name]()
    sub = DenseTestSubspace(model, K)
    inputs, targets = data_for(model_name, loss_fn)
    curvature = Hessian(GAMMA, batch_size=4, progress=False, basis_chunk=4)
    A = curvature.matrix(model, loss_fn, sub, (inputs, targets))
    expected = brute_hessian(model, loss_fn, sub.P, inputs, targets)
    np.testing.assert_allclose(A, expected, atol=1e-10)


def test_hessian_clamps_negative_eigenvalues():
    """Far-off regression targets make the full Hessian of a tanh MLP indefinite (k = d)."""
    model = mlp()
    sub = DenseTestSubspace(model, 43, seed=3)
    inputs, targets = data_for("mlp", squared_error)
    targets = 10 * targets
    H = hessian(
        lambda t: squared_error(output_at(model, t, inputs), targets).mean(), flat_theta(model)
    )
    true_eigenvalues = np.linalg.eigvalsh(H.numpy())
    assert true_eigenvalues[0] < -1e-3  # the case really is indefinite

    curvature = Hessian(GAMMA, batch_size=3, progress=False)
    A = curvature.matrix(model, squared_error, sub, (inputs, targets))
    np.testing.assert_allclose(
        A, brute_hessian(model, squared_error, sub.P, inputs, targets), atol=1e-9
    )
    info = curvature.describe()
    assert info["clamped_eigenvalues"] == int((true_eigenvalues < 0).sum())
    assert info["most_negative_eigenvalue"] == pytest.approx(true_eigenvalues[0], rel=1e-9)
    assert np.linalg.eigvalsh(A)[0] == pytest.approx(GAMMA, rel=1e-9)


def test_hessian_without_negative_eigenvalues_clamps_nothing():
    model = mlp()
    sub = DenseTestSubspace(model, 2, seed=0)
    inputs, targets = data_for("mlp", squared_error)
    H = hessian(
        lambda t: squared_error(output_at(model, t, inputs), targets).mean(), flat_theta(model)
    )
    projected = (sub.P.T @ H @ sub.P).numpy()
    assert np.linalg.eigvalsh(projected)[0] > 1e-2  # precondition: P^T H P is PD here
    curvature = Hessian(GAMMA, progress=False)
    A = curvature.matrix(model, squared_error, sub, (inputs, targets))
    np.testing.assert_allclose(A, projected + GAMMA * np.eye(2), atol=1e-10)
    assert curvature.describe()["clamped_eigenvalues"] == 0
    assert curvature.describe()["most_negative_eigenvalue"] is None


def test_identity_is_damping_times_identity():
    model = mlp()
    sub = DenseTestSubspace(model, K)
    curvature = IdentityCurvature(GAMMA)
    A = curvature.matrix(model, cross_entropy, sub, None)
    np.testing.assert_array_equal(A, GAMMA * np.eye(K))
    assert curvature.describe() == {
        "type": "identity",
        "damping": GAMMA,
        "n_public": None,
        "public_data_fingerprint": None,
    }


KINDS = ["ggn", "fisher", "hessian", "identity"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_damping_must_be_positive(kind, damping):
    with pytest.raises(InvalidParameterError, match="damping"):
        make_curvature(kind, damping)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_batch_size_must_be_positive_integer(batch_size):
    with pytest.raises(InvalidParameterError, match="batch_size"):
        GaussNewton(GAMMA, batch_size=batch_size)


@pytest.mark.parametrize("kind", ["ggn", "fisher", "hessian"])
def test_symmetric_positive_definite_and_batch_size_independent(kind):
    model = cnn()
    sub = DenseTestSubspace(model, K)
    data = data_for("cnn", cross_entropy)
    small = make_curvature(kind, GAMMA, batch_size=3, progress=False)
    large = make_curvature(kind, GAMMA, batch_size=64, progress=False)
    A = small.matrix(model, cross_entropy, sub, data)
    np.testing.assert_array_equal(A, A.T)
    assert np.linalg.eigvalsh(A)[0] >= GAMMA * (1 - 1e-9)
    np.testing.assert_allclose(A, large.matrix(model, cross_entropy, sub, data), atol=1e-12)
    for field in ("type", "n_public", "public_data_fingerprint"):
        assert small.describe()[field] == large.describe()[field]
    assert small.describe()["n_public"] == N


@pytest.mark.parametrize("kind", ["ggn", "fisher", "hessian"])
def test_float32_model_matches_float64(kind):
    model64 = mlp()
    model32 = copy.deepcopy(model64).float()
    sub = DenseTestSubspace(model64, K)
    data = data_for("mlp", cross_entropy)  # float64 inputs, cast to the model's dtype
    curvature = make_curvature(kind, GAMMA, progress=False)
    A64 = curvature.matrix(model64, cross_entropy, sub, data)
    A32 = curvature.matrix(model32, cross_entropy, sub, data)
    assert A32.dtype == np.float64
    assert next(model32.parameters()).dtype == torch.float32
    np.testing.assert_allclose(A32, A64, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(A32, A64)  # it really computed in float32


def test_fingerprint_tracks_the_public_data():
    inputs, targets = data_for("mlp", cross_entropy)
    digest = fingerprint((inputs, targets))
    assert len(digest) == 64
    assert fingerprint(TensorDataset(inputs, targets), batch_size=3) == digest
    assert fingerprint((inputs.clone(), targets.clone())) == digest

    changed = inputs.clone()
    changed[7, 2] += 1e-12
    assert fingerprint((changed, targets)) != digest
    assert fingerprint((inputs, (targets + 1) % 3)) != digest
    assert fingerprint((inputs.float(), targets)) != digest
    assert fingerprint((inputs.reshape(N, 2, 2), targets)) != digest
    assert fingerprint((inputs[:-1], targets[:-1])) != digest

    model = mlp()
    curvature = GaussNewton(GAMMA, batch_size=4, progress=False)
    curvature.matrix(model, cross_entropy, DenseTestSubspace(model, K), (inputs, targets))
    assert curvature.describe()["public_data_fingerprint"] == digest


def test_model_is_left_unchanged_and_used_in_eval_mode():
    model = mlp(dropout=0.5).train()
    before = copy.deepcopy(model.state_dict())
    sub = DenseTestSubspace(model, K)
    data = data_for("mlp", cross_entropy)
    curvature = GaussNewton(GAMMA, progress=False)
    A = curvature.matrix(model, cross_entropy, sub, data)
    assert model.training and all(m.training for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    np.testing.assert_array_equal(A, curvature.matrix(model, cross_entropy, sub, data))
    eval_model = copy.deepcopy(model).eval()
    np.testing.assert_allclose(A, brute_ggn(eval_model, cross_entropy, sub.P, *data), atol=1e-10)


def test_non_finite_inputs_raise():
    model = mlp()
    inputs, targets = data_for("mlp", cross_entropy)
    inputs[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        GaussNewton(GAMMA, progress=False).matrix(
            model, cross_entropy, DenseTestSubspace(model, K), (inputs, targets)
        )


def test_non_finite_parameters_raise():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"0\.weight"):
        Hessian(GAMMA, progress=False).matrix(
            model, cross_entropy, DenseTestSubspace(model, K), data_for("mlp", cross_entropy)
        )


def test_concave_output_loss_is_not_positive_definite():
    model = mlp()

    def concave(outputs, targets):
        return -10.0 * squared_error(outputs, targets)

    with pytest.raises(CurvatureError, match=r"positive definite.*convex"):
        GaussNewton(GAMMA, progress=False).quadratic(
            model, concave, DenseTestSubspace(model, K), data_for("mlp", squared_error)
        )


def test_batch_mean_loss_is_rejected():
    model = mlp()

    def mean_loss(outputs, targets):
        return cross_entropy(outputs, targets).mean()

    with pytest.raises(ShapeError, match="one loss per example"):
        Hessian(GAMMA, progress=False).matrix(
            model, mean_loss, DenseTestSubspace(model, K), data_for("mlp", cross_entropy)
        )


def test_factory():
    assert type(make_curvature("ggn", 1.0)) is GaussNewton
    assert type(make_curvature("fisher", 1.0)) is EmpiricalFisher
    assert type(make_curvature("identity", 1.0)) is IdentityCurvature
    hess = make_curvature("hessian", 2.0, batch_size=8, progress=False, basis_chunk=3)
    assert (hess.damping, hess.batch_size, hess.progress, hess.basis_chunk) == (2.0, 8, False, 3)
    with pytest.raises(InvalidParameterError, match="unknown curvature kind 'kfc'"):
        make_curvature("kfc", 1.0)
    with pytest.raises(InvalidParameterError, match="basis_chunk"):
        make_curvature("ggn", 1.0, basis_chunk=3)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar(progress, capsys, monkeypatch):
    monkeypatch.setattr(qem.progress, "on_terminal", lambda: True)  # capsys is not a terminal
    model = mlp()
    GaussNewton(GAMMA, batch_size=4, progress=progress).matrix(
        model, cross_entropy, DenseTestSubspace(model, K), data_for("mlp", cross_entropy)
    )
    err = capsys.readouterr().err
    assert ("curvature (ggn)" in err) is progress
