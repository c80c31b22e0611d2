"""Kronecker subspace: the hook-based per-example path, layer coverage, allocation, errors.

The hook path is checked against the generic ``torch.func`` path of the base class, which
test_subspace.py checks against a per-example loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qem.errors import InvalidParameterError, ShapeError, UnsupportedModelError
from qem.losses import cross_entropy
from qem.subspace import Kronecker, Subspace
from qem.subspace.kronecker import allocate

F64 = torch.float64


class Shared(nn.Module):
    """One Linear applied twice (summed over calls), and a layer whose output is unused."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Sequence(nn.Module):
    """Linear layers on (B, T, C) inputs: several positions per example."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x))).mean(dim=1)


def conv_model(padding, padding_mode: str = "zeros") -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 4, padding=padding, padding_mode=padding_mode, bias=False),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=(2, 1), padding=(1, 2), padding_mode=padding_mode),
        nn.Flatten(),
        nn.LazyLinear(3),
    )


CASES = {
    "shared_and_unused": (Shared, (5, 4)),
    "sequence": (Sequence, (5, 6, 3)),
    "same_even_kernel": (lambda: conv_model("same"), (5, 2, 7, 6)),
    "reflect": (lambda: conv_model(1, "reflect"), (5, 2, 7, 6)),
    "circular": (lambda: conv_model(0, "circular"), (5, 2, 7, 6)),
}


def build(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = factory()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=F64)
    model(x.float())  # materialise lazy layers
    return model.double(), x, torch.randint(0, 3, (shape[0],), generator=gen)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", list(CASES))
def test_hook_path_matches_generic_path(case):
    model, x, y = build(case)
    subspace = Kronecker(model, 12, seed=0)
    got = subspace.per_example_gradients(model, cross_entropy, x, y)
    expected = Subspace.per_example_gradients(subspace, model, cross_entropy, x, y)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    p = subspace.materialize()
    torch.testing.assert_close(p.T @ p, torch.eye(subspace.k, dtype=F64), atol=1e-10, rtol=0)


def test_frozen_bias_float32_model_and_parameter_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    subspace = Kronecker(model, 10, seed=1)
    assert subspace.parameter_names == ("0.weight", "2.weight", "2.bias")
    assert [(m.out_dim, m.in_dim) for m in subspace.layers] == [(6, 4), (3, 7)]
    got = subspace.per_example_gradients(model, cross_entropy, x, y)
    assert got.dtype == F64
    reference = Subspace.per_example_gradients(
        subspace, model.double(), cross_entropy, x.double(), y
    )
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_layers_restrict_the_span_and_eval_batchnorm_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(12)
    )
    model.append(nn.Linear(12, 2))
    model.double()
    with pytest.raises(UnsupportedModelError, match=r"1\.weight.*4\.bias|LayerNorm"):
        Kronecker(model, 6, seed=0)
    subspace = Kronecker(model, 6, seed=0, layers=["0", "5"])
    assert subspace.parameter_names == ("0.weight", "0.bias", "5.weight", "5.bias")
    x, y = torch.randn(4, 1, 4, 4, dtype=F64), torch.tensor([0, 1, 1, 0])
    with pytest.raises(UnsupportedModelError, match="BatchNorm2d"):
        subspace.per_example_gradients(model, cross_entropy, x, y)
    model.eval()
    got = subspace.per_example_gradients(model, cross_entropy, x, y)
    expected = Subspace.per_example_gradients(subspace, model, cross_entropy, x, y)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_unsupported_layers():
    with pytest.raises(UnsupportedModelError, match="groups=2"):
        Kronecker(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), 4, seed=0)
    with pytest.raises(UnsupportedModelError, match="Conv1d"):
        Kronecker(nn.Sequential(nn.Conv1d(2, 4, 3)), 4, seed=0)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        Kronecker(model, 4, seed=0, layers=["1"])
    with pytest.raises(UnsupportedModelError, match="no modules"):
        Kronecker(model, 4, seed=0, layers=["9"])
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedModelError, match="shares parameters"):
        Kronecker(tied, 4, seed=0)


def test_layer_bypassing_its_forward_is_refused():
    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.fc.weight, self.fc.bias)

    model = Bypass().double()
    subspace = Kronecker(model, 2, seed=0)
    with pytest.raises(UnsupportedModelError, match="not called"):
        subspace.per_example_gradients(
            model, cross_entropy, torch.ones(2, 3, dtype=F64), torch.ones(2).long()
        )
    with pytest.raises(ShapeError, match="one loss per example"):
        Kronecker(nn.Linear(3, 2).double(), 2, seed=0).per_example_gradients(
            nn.Linear(3, 2).double(), lambda o, t: o.sum(), torch.ones(2, 3, dtype=F64), None
        )


def bench_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.mark.parametrize("k", [4, 64, 512, 2048, 5000])
def test_allocation_meets_k_within_bounds(k):
    model = bench_cnn()
    subspace = Kronecker(model, k, seed=0)
    assert subspace.requested_k == k
    assert abs(subspace.k - k) <= 0.001 * k  # exact unless no product k_out*k_in fits
    if k in (512, 2048):
        assert subspace.k == k
    sizes = []
    for layer in subspace.layers:
        assert 1 <= layer.k_out <= layer.out_dim and 1 <= layer.k_in <= layer.in_dim
        sizes.append(layer.k_out * layer.k_in)
    if k >= 64:  # the 512x64 Linear holds most of the parameters, so most of k
        assert sizes.index(max(sizes)) == 2


def test_allocation_rules_and_explicit_shapes():
    assert allocate([(3, 2), (5, 100)], 2) == [(1, 1), (1, 1)]
    with pytest.raises(InvalidParameterError, match="number of spanned layers"):
        allocate([(3, 2), (5, 100)], 1)
    assert sum(a * b for a, b in allocate([(3, 2), (5, 100)], 506)) == 506  # everything
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    subspace = Kronecker(model, seed=0, shapes=[(2, 3), (3, 7)])
    assert subspace.k == 27 and [(m.k_out, m.k_in) for m in subspace.layers] == [(2, 3), (3, 7)]
    with pytest.raises(InvalidParameterError, match="k_out"):
        Kronecker(model, seed=0, shapes=[(7, 1), (1, 1)])
    with pytest.raises(InvalidParameterError, match="entries"):
        Kronecker(model, seed=0, shapes=[(1, 1)])
    with pytest.raises(InvalidParameterError, match="disagrees"):
        Kronecker(model, 5, seed=0, shapes=[(1, 1), (1, 1)])
    # no k, no shapes: every spanned entry, bias columns included, up to SUBSPACE_K
    # (here 6 x (4 + 1) + 3 x (6 + 1) = 51 < 1024)
    assert Kronecker(model, seed=0).k == 51


class BatchCentre(nn.Module):
    """x - mean over the batch: example i's output depends on every example of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class Recorder(nn.Module):
    """Identity that keeps every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x


MIXING = {
    "centre_before_linear": lambda: nn.Sequential(
        BatchCentre(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)
    ),
    # mixing behind the last layer: the activations are per example, only the backprops mix
    "centre_after_last_linear": lambda: nn.Sequential(nn.Linear(6, 3), BatchCentre()),
}


@pytest.mark.parametrize("case", list(MIXING))
def test_batch_mixing_is_refused_and_the_generic_path_cannot_mix(case):
    torch.manual_seed(0)
    model = MIXING[case]().double()
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    subspace = Kronecker(model, 6, seed=0)
    # what the hooked path would release differs from the ground truth (each example run as
    # its own batch of one by torch.func.vmap), and its g_0 moves when another example moves
    hooked = subspace._hooked_gradients(model, lambda out: cross_entropy(out, y), x)
    truth = Subspace.per_example_gradients(subspace, model, cross_entropy, x, y)
    assert (hooked - truth).abs().max() > 1e-3
    moved_x = x.clone()
    moved_x[1:] = torch.randn(7, 6, dtype=F64)
    moved = subspace._hooked_gradients(model, lambda out: cross_entropy(out, y), moved_x)
    assert (moved[0] - hooked[0]).abs().max() > 1e-3
    with pytest.raises(UnsupportedModelError, match="mixes examples"):
        subspace.per_example_gradients(model, cross_entropy, x, y)
    moved_truth = Subspace.per_example_gradients(subspace, model, cross_entropy, moved_x, y)
    torch.testing.assert_close(moved_truth[0], truth[0], atol=0, rtol=0)


def ordinary_models() -> dict[str, tuple[nn.Module, torch.Tensor, list[str] | None]]:
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4, affine=False),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.LayerNorm(16, elementwise_affine=False),
        nn.Linear(16, 3),
    )
    embedded = nn.Sequential(nn.Embedding(7, 5), nn.Flatten(), nn.Linear(15, 3))
    return {
        "cnn": (cnn, torch.randn(40, 2, 4, 4), None),
        "token_ids": (embedded, torch.randint(0, 7, (40, 3)), ["2"]),
    }


@pytest.mark.parametrize("case", ["cnn", "token_ids"])
def test_ordinary_models_pass_the_check_once(case):
    torch.manual_seed(0)
    model, x, layers = ordinary_models()[case]
    model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (len(x),))
    recorder = Recorder()
    model.insert(0, recorder)
    layers = None if layers is None else [str(int(n) + 1) for n in layers]
    subspace = Kronecker(model, 8, seed=0, layers=layers)
    model.eval()
    got = subspace.per_example_gradients(model, cross_entropy, x, y)
    assert len(recorder.seen) == 3  # two probe passes, then the batch
    subspace.per_example_gradients(model, cross_entropy, x, y)
    assert len(recorder.seen) == 4  # verified once per model configuration
    model.train()  # another configuration is checked again; train-mode dropout still passes
    subspace.per_example_gradients(model, cross_entropy, x, y)
    assert len(recorder.seen) == 7
    model.eval()
    expected = Subspace.per_example_gradients(subspace, model, cross_entropy, x, y)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_the_check_never_reads_the_batch():
    """The probe is a function of the batch's shape and dtype: whether the check raises cannot
    depend on the data being processed."""
    probes = []
    for seed in (1, 2):
        torch.manual_seed(0)
        recorder = Recorder()
        model = nn.Sequential(recorder, nn.Linear(6, 3)).double()
        x = torch.randn(50, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
        Kronecker(model, 4, seed=0).per_example_gradients(
            model, cross_entropy, x, torch.zeros(50).long()
        )
        first, second, batch = recorder.seen
        assert len(first) == len(second) == 32 and not torch.equal(first, x[:32])
        torch.testing.assert_close(batch, x, atol=0, rtol=0)
        probes.append((first, second))
    for a, b in zip(*probes, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_loss_that_mixes_examples_is_applied_per_example():
    """A loss scaled by the batch's mean loss would couple the examples through the backprops;
    the hooked path applies it to each example as a batch of one, like the generic path."""

    def scaled(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = cross_entropy(outputs, targets)
        return losses * losses.mean()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    subspace = Kronecker(model, 6, seed=0)
    got = subspace.per_example_gradients(model, scaled, x, y)
    expected = Subspace.per_example_gradients(subspace, model, scaled, x, y)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    plain = subspace.per_example_gradients(model, cross_entropy, x, y)
    loss = cross_entropy(model(x), y).detach()
    torch.testing.assert_close(got, 2 * loss[:, None] * plain, atol=1e-10, rtol=0)
    batched = subspace._hooked_gradients(model, lambda out: scaled(out, y), x)
    assert (batched - got).abs().max() > 1e-3  # what summing the batched loss would give
