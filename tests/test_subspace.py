"""Subspace bases P: per-example projected gradients, orthonormality, seeds, errors."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import nn

from qem.errors import InvalidParameterError, ShapeError, UnsupportedModelError
from qem.losses import cross_entropy
from qem.parameters import flatten
from qem.subspace import (
    KINDS,
    SRHT,
    DenseGaussian,
    Identity,
    Kronecker,
    ParameterSubset,
    Subspace,
    biases,
    last_layer,
    make_subspace,
)
from qem.subspace.srht import fwht

F64 = torch.float64


def mlp() -> nn.Module:
    """d = 5*7 + 7 + 7*3 + 3 = 66 (not a power of two)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def cnn() -> nn.Module:
    """Two Conv2d (strided and padded; dilated) and a Linear on 2x8x8 inputs; d = 160."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, 2, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


def batch(model_name: str, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (size, 5) if model_name == "mlp" else (size, 2, 8, 8)
    return torch.randn(shape, generator=gen, dtype=F64), torch.randint(0, 3, (size,), generator=gen)


MODELS = {"mlp": mlp, "cnn": cnn}

BUILDERS = {
    "identity": lambda m: Identity(m),
    "subset_names": lambda m: ParameterSubset(
        m, names=["0.weight", "5.bias" if len(m) > 3 else "2.bias"]
    ),
    "subset_modules": lambda m: ParameterSubset(m, modules=["0"]),
    "last_layer": last_layer,
    "biases": biases,
    "dense": lambda m: DenseGaussian(m, 9, seed=0),
    "srht": lambda m: SRHT(m, 9, seed=0),
    "kronecker": lambda m: Kronecker(m, 9, seed=0),
}


def looped_gradients(model: nn.Module, subspace: Subspace, x, y) -> torch.Tensor:
    """Reference: one torch.autograd.grad per example, flattened in the subspace's order: (B, d)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in subspace.parameter_names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_per_example_gradients_match_loop_times_p(kind, model_name):
    model = MODELS[model_name]()
    subspace = BUILDERS[kind](model)
    x, y = batch(model_name)
    got = subspace.per_example_gradients(model, cross_entropy, x, y)
    expected = looped_gradients(model, subspace, x, y) @ subspace.materialize()
    assert got.dtype == F64 and got.shape == (len(x), subspace.k)
    assert expected.abs().max() > 1e-3  # the comparison is not between zeros
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_subsets_differentiate_only_chosen_parameters():
    model = mlp()
    subspace = ParameterSubset(model, modules=["2"])
    assert subspace.parameter_names == ("2.weight", "2.bias")
    assert subspace.d == subspace.k == 7 * 3 + 3
    assert last_layer(model).parameter_names == ("2.weight", "2.bias")
    assert biases(cnn()).parameter_names == ("0.bias", "2.bias", "5.bias")
    model[0].weight.requires_grad_(False)
    assert Identity(model).parameter_names == ("0.bias", "2.weight", "2.bias")


@pytest.mark.parametrize("n", [1, 2, 32, 512])
def test_fwht_is_the_hadamard_matrix(n):
    x = torch.randn(3, 2, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    hadamard = torch.tensor(scipy.linalg.hadamard(n), dtype=F64)
    torch.testing.assert_close(fwht(x), x @ hadamard.T, atol=1e-11, rtol=0)


def test_fwht_large_follows_sylvester_recursion():
    """H_{2n} [a; b] = [H_n a + H_n b; H_n a - H_n b] at n = 2^14 (three factors)."""
    x = torch.randn(2, 2**15, dtype=F64, generator=torch.Generator().manual_seed(0))
    a, b = fwht(x[:, : 2**14]), fwht(x[:, 2**14 :])
    torch.testing.assert_close(fwht(x), torch.cat([a + b, a - b], dim=1), atol=1e-9, rtol=0)
    with pytest.raises(ValueError):
        fwht(torch.zeros(6))


def orthonormal_cases():
    cases = []
    for seed in (0, 1, 2):
        cases.append(("srht_pow2", lambda m, s=seed: SRHT(m, 11, seed=s)))
        cases.append(("srht", lambda m, s=seed: SRHT(m, 11, seed=s)))
        cases.append(("srht_cnn", lambda m, s=seed: SRHT(m, 11, seed=s)))
    cases.append(("dense", lambda m: DenseGaussian(m, 11, seed=3)))
    cases.append(("kronecker", lambda m: Kronecker(m, 11, seed=3)))
    cases.append(("kronecker_cnn", lambda m: Kronecker(m, 11, seed=3)))
    return cases


@pytest.mark.parametrize(("name", "build"), orthonormal_cases())
def test_basis_is_orthonormal_and_project_lift_agree(name, build):
    if name == "srht_pow2":
        torch.manual_seed(0)
        model = nn.Linear(7, 8).double()  # d = 64
    else:
        model = cnn() if name.endswith("_cnn") else mlp()
    subspace = build(model)
    p = subspace.materialize()
    eye = torch.eye(subspace.k, dtype=F64)
    torch.testing.assert_close(p.T @ p, eye, atol=1e-10, rtol=0)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(4, subspace.d, generator=gen, dtype=F64)
    w = torch.randn(4, subspace.k, generator=gen, dtype=F64)
    torch.testing.assert_close(subspace.project(g), g @ p, atol=1e-10, rtol=0)
    torch.testing.assert_close(subspace.lift(subspace.project(g)), g @ p @ p.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(subspace.project(subspace.lift(w)), w, atol=1e-10, rtol=0)
    if name == "srht_pow2":
        assert subspace.d == subspace.n == 64 and len(subspace.signs) == 1
        # classic SRHT: every entry of P is +-1/sqrt(d)
        torch.testing.assert_close(p.abs(), torch.full_like(p, 1 / 8), atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [1100, 1800])
def test_srht_is_incoherent(d):
    """Every coordinate passes through a full n-point Hadamard transform: with k = d, the
    orthogonal T has entries O(sqrt(log d / n)) (a padded or unmixed part would give 1)."""
    subspace = SRHT(nn.Linear(d - 1, 1), d, seed=d)
    assert subspace.n == 1024
    t = subspace.materialize()
    torch.testing.assert_close(t.T @ t, torch.eye(d, dtype=F64), atol=1e-10, rtol=0)
    assert t.abs().max() * math.sqrt(subspace.n) < 5.0


@pytest.mark.parametrize("kind", ["dense", "srht", "kronecker"])
def test_seed_determines_basis(kind):
    model = mlp()
    p0 = make_subspace(kind, model, k=6, seed=0).materialize()
    torch.testing.assert_close(make_subspace(kind, model, k=6, seed=0).materialize(), p0)
    assert (make_subspace(kind, model, k=6, seed=1).materialize() - p0).abs().max() > 1e-3
    fresh = make_subspace(kind, model, k=6)
    assert isinstance(fresh.seed, int)
    again = make_subspace(kind, model, k=6, seed=fresh.seed)
    torch.testing.assert_close(again.materialize(), fresh.materialize())


def test_describe_fields():
    model = mlp()
    srht = SRHT(model, 5, seed=7).describe()
    assert srht["type"] == "srht" and srht["k"] == 5 and srht["d"] == 66 and srht["seed"] == 7
    assert srht["parameters"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert srht["hadamard_size"] == 64 and srht["block_starts"] == [0, 2]
    dense = DenseGaussian(model, 4, seed=2, parameter_names=["2.weight"]).describe()
    assert dense == {"type": "dense", "k": 4, "d": 21, "seed": 2, "parameters": ["2.weight"]}
    subset = last_layer(model).describe()
    assert subset["type"] == "subset" and subset["modules"] == ["2"] and subset["seed"] is None
    assert subset["k"] == subset["d"] == 24
    kron = Kronecker(model, 8, seed=1).describe()
    assert kron["type"] == "kronecker" and kron["requested_k"] == 8
    assert [(layer["module"], layer["out"], layer["in"]) for layer in kron["layers"]] == [
        ("0", 7, 6),
        ("2", 3, 8),
    ]
    assert sum(layer["k_out"] * layer["k_in"] for layer in kron["layers"]) == kron["k"]


def test_apply_step_and_parameter_dict():
    model = mlp()
    subspace = SRHT(model, 5, seed=0)
    before = flatten({n: p.detach().clone() for n, p in model.named_parameters()})
    w = torch.arange(1.0, 6.0, dtype=F64)
    subspace.apply_step(model, w)
    after = flatten({n: p.detach() for n, p in model.named_parameters()})
    torch.testing.assert_close(after - before, subspace.materialize() @ w, atol=1e-12, rtol=0)
    grads = {n: torch.ones_like(p) * i for i, (n, p) in enumerate(model.named_parameters())}
    reordered = dict(reversed(list(grads.items())))
    torch.testing.assert_close(
        subspace.project_parameter_dict(reordered), subspace.project(flatten(grads))
    )
    with pytest.raises(ShapeError):
        subspace.project_parameter_dict({"0.weight": grads["0.weight"]})
    with pytest.raises(ShapeError):
        subspace.project(torch.zeros(65))
    with pytest.raises(ShapeError):
        subspace.lift(torch.zeros(6))


@pytest.mark.parametrize("kind", ["dense", "srht", "kronecker"])
@pytest.mark.parametrize("k", [0, -1, 67, 2.5])
def test_bad_k(kind, k):
    with pytest.raises(InvalidParameterError, match="k="):
        make_subspace(kind, mlp(), k=k, seed=0)


def test_dense_refuses_large_basis():
    with pytest.raises(InvalidParameterError, match=r"srht.*kronecker"):
        DenseGaussian(mlp(), 10, seed=0, max_bytes=66 * 10 * 8 - 1)
    assert DenseGaussian(mlp(), 10, seed=0, max_bytes=66 * 10 * 8).k == 10


def test_bad_selections():
    model = mlp()
    with pytest.raises(UnsupportedModelError, match="nope"):
        ParameterSubset(model, names=["0.weight", "nope"])
    with pytest.raises(UnsupportedModelError, match="no module named '7'"):
        ParameterSubset(model, modules=["7"])
    with pytest.raises(UnsupportedModelError, match="no trainable"):
        ParameterSubset(model, modules=["1"])  # Tanh
    with pytest.raises(InvalidParameterError):
        ParameterSubset(model)
    with pytest.raises(UnsupportedModelError):
        biases(nn.Sequential(nn.Linear(2, 2, bias=False)))
    with pytest.raises(UnsupportedModelError):
        last_layer(nn.Sequential(nn.LayerNorm(3)))


def test_factory():
    model = mlp()
    assert set(KINDS) == {
        "identity",
        "last_layer",
        "biases",
        "subset",
        "dense",
        "srht",
        "kronecker",
    }
    built = {
        "identity": make_subspace("identity", model),
        "last_layer": make_subspace("last_layer", model, k=24),
        "biases": make_subspace("biases", model, seed=3),
        "subset": make_subspace("subset", model, names=["0.bias"]),
        "dense": make_subspace("dense", model, k=4, seed=0),
        "srht": make_subspace("srht", model, k=4, seed=0, parameter_names=["2.weight"]),
        "kronecker": make_subspace("kronecker", model, seed=0, shapes=[(1, 2), (2, 1)]),
    }
    assert [s.k for s in built.values()] == [66, 24, 10, 7, 4, 4, 4]
    assert built["srht"].d == 21
    with pytest.raises(InvalidParameterError, match="unknown subspace kind 'pca'"):
        make_subspace("pca", model, k=4)
    with pytest.raises(InvalidParameterError, match="fixed"):
        make_subspace("identity", model, k=10)
    with pytest.raises(InvalidParameterError, match="k=512 must lie between"):
        make_subspace("srht", model, k=512)  # an explicit k beyond this model's d = 66
    assert make_subspace("srht", model).k == 66  # the default: min(d, SUBSPACE_K = 1024)
    assert make_subspace("dense", model, seed=0).k == 66


def test_batchnorm_in_train_mode_is_refused_by_the_generic_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 0, 1, 1])
    subspace = SRHT(model, 4, seed=0)
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        subspace.per_example_gradients(model, cross_entropy, x, y)
    model.eval()
    assert subspace.per_example_gradients(model, cross_entropy, x, y).shape == (5, 4)
    assert math.isfinite(float(subspace.per_example_gradients(model, cross_entropy, x, y).sum()))
