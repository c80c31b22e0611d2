"""K-FAC curvature: the projection into a Kronecker subspace against a dense computation, the
factors against a naive loop, exactness where K-FAC is exact, the refresh schedule and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.utils.data import Dataset

from qem.curvature import KFAC, GaussNewton, make_curvature
from qem.errors import InvalidParameterError
from qem.losses import cross_entropy, squared_error
from qem.parameters import unflatten
from qem.subspace import Kronecker
from qem.subspace.factory import make_subspace

F64 = torch.float64
GAMMA = 0.3


def tiny_model() -> nn.Module:
    """A Conv2d with 16 output positions, then a Linear: both factor kinds, biases trained."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
    ).double()


def tiny_data(n: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 2, 4, 4, generator=gen, dtype=F64)
    return inputs, torch.randint(0, 4, (n,), generator=gen)


def gradient_matrices(subspace: Kronecker, model: nn.Module, name: str) -> torch.Tensor:
    """S (d, out*in_dim) with vec_row([W | b]) of layer ``name`` = S^T theta, built by
    unflattening each coordinate of the spanned parameters."""
    like = subspace.parameters_of(model)
    columns = []
    for e in torch.eye(subspace.d, dtype=F64):
        tensors = unflatten(e, like)
        weight = tensors[f"{name}.weight"]
        matrix = weight.reshape(weight.shape[0], -1)
        if f"{name}.bias" in tensors:
            matrix = torch.cat([matrix, tensors[f"{name}.bias"][:, None]], dim=1)
        columns.append(matrix.reshape(-1))
    return torch.stack(columns)


def test_projection_equals_the_dense_kronecker_blocks_in_the_subspace():
    model = tiny_model()
    x, y = tiny_data()
    subspace = Kronecker(model, seed=3, shapes=[(2, 3), (3, 4)])  # k_out > 1: kron's order shows
    curvature = KFAC(GAMMA, batch_size=4, progress=False)
    A = curvature.matrix(model, cross_entropy, subspace, (x, y))
    dense = torch.zeros(subspace.d, subspace.d, dtype=F64)
    for layer in subspace.layers:
        factors = curvature.factors[layer.module]
        S = gradient_matrices(subspace, model, layer.module)
        dense += S @ torch.kron(factors.output, factors.input) @ S.T
    P = subspace.materialize()
    expected = (P.T @ dense @ P).numpy() + GAMMA * np.eye(subspace.k)
    assert A.dtype == np.float64 and A.shape == (subspace.k, subspace.k)
    assert np.abs(A - GAMMA * np.eye(subspace.k)).max() > 1e-3
    np.testing.assert_allclose(A, expected, atol=1e-12, rtol=0)
    info = curvature.describe()
    assert info["type"] == "kfac" and info["n_public"] == 9 and info["data_passes"] == 1


def test_factors_match_a_naive_loop():
    """KFC for the conv: F sums the patches' outer products over positions, G averages the
    backprops' J_t^T H_L J_t over them; the Linear gets plain K-FAC."""
    model = tiny_model()
    x, y = tiny_data()
    subspace = Kronecker(model, 12, seed=0)
    curvature = KFAC(GAMMA, batch_size=4, progress=False)
    curvature.matrix(model, cross_entropy, subspace, (x, y))
    conv, rest = model[0], model[1:]
    n, positions = len(x), 16
    G_conv, F_conv = torch.zeros(3, 3, dtype=F64), torch.zeros(19, 19, dtype=F64)
    G_lin, F_lin = torch.zeros(4, 4, dtype=F64), torch.zeros(49, 49, dtype=F64)
    with torch.no_grad():
        for xi, yi in zip(x, y, strict=True):
            padded = F.pad(xi, (1, 1, 1, 1))
            z = conv(xi[None])[0]
            h = torch.cat([rest[:2](z[None])[0], torch.ones(1, dtype=F64)])
            out = rest(z[None])[0]
            H = hessian(lambda o, yi=yi: cross_entropy(o[None], yi[None]).sum(), out)
            J = jacobian(lambda z: rest(z[None])[0], z)  # (4, 3, 4, 4)
            for r in range(4):
                for c in range(4):
                    a = torch.cat([padded[:, r : r + 3, c : c + 3].reshape(-1), torch.ones(1)])
                    F_conv += torch.outer(a, a)
                    Jt = J[:, :, r, c]
                    G_conv += Jt.T @ H @ Jt
            F_lin += torch.outer(h, h)
            G_lin += H
    expected = {"0": (G_conv / (n * positions), F_conv / n), "3": (G_lin / n, F_lin / n)}
    for name, (G, F_) in expected.items():
        torch.testing.assert_close(curvature.factors[name].output, G, atol=1e-12, rtol=0)
        torch.testing.assert_close(curvature.factors[name].input, F_, atol=1e-12, rtol=0)


def single_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    if kind == "linear":
        return nn.Linear(5, 4).double(), torch.randn(3, 5, dtype=F64)
    # one output position: the conv is a Linear on the flattened patch
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten()).double()
    return model, torch.randn(3, 2, 3, 3, dtype=F64)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("loss_fn", [cross_entropy, squared_error])
def test_exact_for_one_layer_and_one_example(kind, loss_fn):
    """GGN = sum_c (u_c (x) a)(u_c (x) a)^T = (sum_c u_c u_c^T) (x) a a^T for one example of one
    layer, so K-FAC equals the exact GGN ("ggn") in the full Kronecker basis (k = d)."""
    model, x = single_layer(kind)
    gen = torch.Generator().manual_seed(3)
    if loss_fn is cross_entropy:
        y = torch.randint(0, 4, (len(x),), generator=gen)
    else:
        y = torch.randn(len(x), 4, generator=gen, dtype=F64)
    subspace = Kronecker(model, seed=0, shapes=[(4, 19 if kind == "conv" else 6)])
    assert subspace.k == subspace.d
    one = (x[:1], y[:1])
    kfac = KFAC(GAMMA, progress=False).matrix(model, loss_fn, subspace, one)
    ggn = GaussNewton(GAMMA, progress=False).matrix(model, loss_fn, subspace, one)
    assert np.abs(ggn - GAMMA * np.eye(subspace.k)).max() > 1e-2
    np.testing.assert_allclose(kfac, ggn, atol=1e-12, rtol=0)
    # several examples: G (x) F stays exact when the backprops do not depend on the example
    # (squared error: G = I), and is an approximation otherwise (cross-entropy)
    kfac = KFAC(GAMMA, progress=False).matrix(model, loss_fn, subspace, (x, y))
    ggn = GaussNewton(GAMMA, progress=False).matrix(model, loss_fn, subspace, (x, y))
    if loss_fn is squared_error:
        np.testing.assert_allclose(kfac, ggn, atol=1e-12, rtol=0)
    else:
        assert np.abs(kfac - ggn).max() > 1e-3


class CountingDataset(Dataset):
    """(inputs, targets) that counts the examples read."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets, self.reads = inputs, targets, 0

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.inputs[index], self.targets[index]


def test_refresh_false_projects_the_stored_factors_without_reading_the_data():
    """The public side asks for an estimate on rounds 1 and 4 (curvature_every = 3); the calls
    in between project the stored factors into their new subspace with no data pass."""
    model = tiny_model()
    x, y = tiny_data(n=8)
    data = CountingDataset(x, y)
    curvature = make_curvature("kfac", GAMMA, batch_size=3, progress=False)
    reads, matrices, at_estimate = [], [], None
    for call in range(4):
        refresh = call in (0, 3)
        if refresh:
            at_estimate = copy.deepcopy(model)
        subspace = Kronecker(model, 10, seed=call)  # a new subspace every round
        matrices.append(curvature.matrix(model, cross_entropy, subspace, data, refresh=refresh))
        reads.append(data.reads)
        info = curvature.describe()
        assert (info["calls"], info["data_passes"]) == (call + 1, 1 + (call == 3))
        # the stored factors are those of the last estimate, projected into this subspace
        fresh = KFAC(GAMMA, progress=False).matrix(at_estimate, cross_entropy, subspace, (x, y))
        np.testing.assert_allclose(matrices[-1], fresh, atol=1e-12, rtol=0)
        with torch.no_grad():  # the model moves between rounds
            model[3].weight.add_(0.5)
    assert reads == [8, 8, 8, 16]
    assert info["public_data_fingerprint"] is not None


def test_a_subspace_over_other_layers_forces_an_estimate():
    model = tiny_model()
    x, y = tiny_data()
    curvature = KFAC(GAMMA, progress=False)
    curvature.matrix(model, cross_entropy, Kronecker(model, 4, seed=0, layers=["3"]), (x, y))
    kept = dict(refresh=False)
    curvature.matrix(
        model, cross_entropy, Kronecker(model, 4, seed=1, layers=["3"]), (x, y), **kept
    )
    assert curvature.describe()["data_passes"] == 1
    curvature.matrix(model, cross_entropy, Kronecker(model, 8, seed=2), (x, y), **kept)
    assert curvature.describe()["data_passes"] == 2 and set(curvature.factors) == {"0", "3"}


def test_refuses_other_subspaces_and_bad_options():
    model = tiny_model()
    x, y = tiny_data()
    for kind in ("dense", "srht"):
        subspace = make_subspace(kind, model, k=4, seed=0)
        with pytest.raises(InvalidParameterError, match="needs a Kronecker subspace"):
            KFAC(GAMMA, progress=False).matrix(model, cross_entropy, subspace, (x, y))
    with pytest.raises(InvalidParameterError, match="no options"):
        make_curvature("kfac", GAMMA, basis_chunk=3)


def test_fine_tune_passes_curvature_every_to_kfac_and_reprojects_each_round(monkeypatch):
    """By name, 'kfac' refreshes its factors every curvature_every rounds and projects them
    into each round's new subspace (one public data pass for three rounds here)."""
    import qem.public.side
    from qem.finetune import fine_tune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(90, 6)
    y = torch.randint(0, 3, (90,))
    made = []
    original = qem.public.side.make_curvature

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(qem.public.side, "make_curvature", spy)
    result = fine_tune(
        model, cross_entropy, (x[:40], y[:40]), (x[40:], y[40:]), epsilon=2.0,
        subspace="kronecker", k=12, curvature="kfac", curvature_every=3, rounds=3,
        resample_subspace=True, clip_norm=0.5, prior_weight=1.0, seed=0,
    )  # fmt: skip
    assert result.report.curvature["refresh_every"] == 3
    assert result.report.curvature["data_passes"] == 1
    assert [r.subspace_seed for r in result.report.rounds] == [0, 1, 2]
    assert result.report.curvature["calls"] == 3  # one projection per new subspace


def test_a_kept_subspace_reuses_the_quadratic_between_refreshes():
    """With one subspace for the run, A and C are computed only when the curvature is due
    (rounds 1 and 3 of 4 with curvature_every = 2): between refreshes the stored factors would
    project to the same A, so nothing is recomputed."""
    from qem.finetune import fine_tune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(90, 6)
    y = torch.randint(0, 3, (90,))
    result = fine_tune(
        model, cross_entropy, (x[:40], y[:40]), (x[40:], y[40:]), epsilon=2.0,
        subspace="kronecker", k=12, curvature="kfac", curvature_every=2, rounds=4,
        resample_subspace=False, prior_weight=1.0, seed=0,
    )  # fmt: skip
    assert result.report.curvature["calls"] == 2 and result.report.curvature["data_passes"] == 2
    assert len(set(result.report.C)) <= 2  # the public clip norm on the same cadence
