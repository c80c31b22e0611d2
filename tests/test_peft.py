"""A LoRA model of the ``peft`` package (built from a config, nothing downloaded) is fine-tuned by
``qem.fine_tune`` with its default settings on its adapter weights only, and its release is the
one of an equivalent plain model: the same base weights and the same LoRA matrices as ordinary
``nn.Linear`` layers, with only those trainable (Opacus is known to corrupt LoRA updates
silently; qem must not)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qem
from qem.defaults import SUBSPACE_K
from qem.losses import cross_entropy

peft = pytest.importorskip("peft")

WIDTH, RANK, ALPHA, CLASSES = 32, 8, 16, 3
TARGETS = ("fc1", "fc2")
"""LoRA on two layers: 2 * (8 * 32 + 32 * 8) = 1024 adapter weights, the default subspace
dimension (qem.defaults.SUBSPACE_K), so that fine_tune's defaults (a Kronecker subspace over the
adapters' Linear layers, K-FAC) apply unchanged and span every adapter weight."""


class MLP(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = fc1, fc2, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class PlainLoRA(nn.Module):
    """W x + b + (alpha / r) B A x, as peft's lora.Linear computes it, with the base layer and
    the matrices as ordinary modules (same names, same order of parameters)."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(lora_a.shape[1], lora_a.shape[0], bias=False)
        self.lora_B = nn.Linear(lora_b.shape[1], lora_b.shape[0], bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_a)
            self.lora_B.weight.copy_(lora_b)
        self.scaling = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def base_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, CLASSES)).double()


def lora_model() -> nn.Module:
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
        init_lora_weights=False,  # random A and B: a LoRA model part-way through training
    )
    torch.manual_seed(1)
    return peft.get_peft_model(base_mlp(), config).double().eval()


def plain_twin(lora: nn.Module) -> MLP:
    """The same function as ``lora`` without peft: base weights frozen, LoRA matrices as
    ordinary trainable layers."""
    inner = lora.base_model.model
    layers = {}
    for name in TARGETS:
        wrapped = getattr(inner, name)
        base = nn.Linear(WIDTH, WIDTH).double()
        base.load_state_dict(wrapped.base_layer.state_dict())
        layers[name] = PlainLoRA(
            base,
            wrapped.lora_A["default"].weight.detach(),
            wrapped.lora_B["default"].weight.detach(),
        )
    head = nn.Linear(WIDTH, CLASSES).double()
    head.load_state_dict(inner.head.state_dict())
    twin = MLP(layers["fc1"], layers["fc2"], head).double().eval()
    for name, parameter in twin.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return twin


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = torch.randn(n, WIDTH, generator=generator, dtype=torch.float64)
    x[:, :CLASSES] += 2.0 * nn.functional.one_hot(y, CLASSES)
    return x, y


def test_a_peft_lora_model_moves_only_its_adapters_and_matches_the_plain_model():
    lora = lora_model()
    twin = plain_twin(lora)
    x = blobs(16, 9)[0]
    torch.testing.assert_close(lora(x), twin(x), rtol=0, atol=0)  # the same function
    data = {"public_data": blobs(80, 1), "private_data": blobs(120, 2)}
    before = {name: value.clone() for name, value in lora.state_dict().items()}
    result = qem.fine_tune(lora, cross_entropy, **data, epsilon=4.0, seed=0)
    plain = qem.fine_tune(twin, cross_entropy, **data, epsilon=4.0, seed=0)

    after = result.model.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    adapters = {name for name in before if ".lora_A." in name or ".lora_B." in name}
    assert moved == adapters and len(adapters) == 2 * len(TARGETS)
    # The same subspace, curvature, clip norm and noise on the same trainable coordinates: the
    # releases agree up to float64 rounding of the two graphs (they are the same arithmetic).
    assert result.report.k == plain.report.k == SUBSPACE_K
    assert pytest.approx(plain.report.C, rel=1e-12) == result.report.C
    for w_lora, w_plain in zip(result.releases, plain.releases, strict=True):
        torch.testing.assert_close(
            torch.as_tensor(w_lora), torch.as_tensor(w_plain), rtol=1e-9, atol=1e-12
        )
    assert result.report.step_lengths == pytest.approx(plain.report.step_lengths, rel=1e-9)
    plain_after = plain.model.state_dict()
    for name in TARGETS:
        for matrix in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                after[f"base_model.model.{name}.{matrix}.default.weight"],
                plain_after[f"{name}.{matrix}.weight"],
                rtol=1e-9,
                atol=1e-12,
            )
