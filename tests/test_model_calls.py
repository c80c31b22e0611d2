"""How qem calls a model and reads its outputs (qem.model_calls): model(x) or model(**inputs),
a Tensor, a dict with "logits" or a ModelOutput as outputs, batches moved to the model's device,
the device a run uses, and the functional call torch.func transforms go through, each compared
with a direct call of the model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from cases import loss_fn, make_model, make_task
from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.model_calls import (
    call_functional,
    call_model,
    model_device,
    model_outputs,
    on_model_device,
    resolve_device,
)

X, Y = make_task(9, 0)
MASK = (X > 0).double()


class Keywords(nn.Module):
    """model(features=x, mask=m) = inner(x * m), recording the keywords it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_model()
        self.called_with: list[str] = []

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.called_with = ["features", "mask"]
        return self.inner(features * mask)


class Returns(nn.Module):
    """The MLP's logits wrapped as ``form``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.inner, self.form = make_model(), form

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        if self.form == "dict":
            return {"hidden": x, "logits": logits}
        if self.form == "attribute":
            return SimpleNamespace(logits=logits, loss=None)
        if self.form == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits)
        return logits


def test_a_tensor_is_passed_positionally_and_a_dict_as_keywords():
    model = make_model()
    torch.testing.assert_close(call_model(model, X), model(X), rtol=0, atol=0)
    keywords = Keywords()
    out = call_model(keywords, {"mask": MASK, "features": X})
    assert keywords.called_with == ["features", "mask"]
    torch.testing.assert_close(out, keywords.inner(X * MASK), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["tensor", "dict", "attribute", "model_output"])
def test_the_logits_are_read_from_every_output_form(form):
    model = Returns(form)
    expected = model.inner(X)
    torch.testing.assert_close(call_model(model, X), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "returned",
    [
        {"scores": torch.zeros(2, 3)},  # a dict without logits
        {"logits": [[0.0, 1.0]]},  # logits that are not a tensor
        SimpleNamespace(scores=torch.zeros(2, 3)),
        (torch.zeros(2, 3), torch.zeros(2)),  # a tuple (return_dict=False)
        None,
    ],
    ids=["dict-without-logits", "list-logits", "object", "tuple", "none"],
)
def test_outputs_without_logits_are_refused(returned):
    with pytest.raises(UnsupportedModelError, match=r"return_dict=True") as info:
        model_outputs(returned)
    assert type(returned).__name__ in str(info.value)


def test_batches_move_to_the_models_device():
    """A model on the meta device (no GPU needed): every input entry and the targets go there;
    on the model's own device the tensors are returned as they are."""
    meta = make_model().to("meta")
    assert model_device(meta) == torch.device("meta")
    inputs, targets = on_model_device(meta, {"features": X, "mask": MASK}, Y)
    assert {t.device.type for t in (*inputs.values(), targets)} == {"meta"}
    assert inputs["features"].shape == X.shape and targets.dtype == Y.dtype
    x, y = on_model_device(make_model(), X, Y)
    assert x is X and y is Y
    assert model_device(nn.Identity()) == torch.device("cpu")  # no parameters: the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_move_to_a_gpu_model_and_outputs_match_the_cpu():
    model = make_model()
    gpu = copy.deepcopy(model).cuda()
    inputs, targets = on_model_device(gpu, X, Y)
    assert inputs.is_cuda and targets.is_cuda
    # float64 on both devices: the same sums up to reassociation (~1e-16 relative per term)
    torch.testing.assert_close(call_model(gpu, inputs).cpu(), model(X), rtol=1e-12, atol=1e-12)


def test_resolve_device(monkeypatch):
    meta = make_model().to("meta")
    assert resolve_device(None, meta) == torch.device("meta")  # the model's own
    assert resolve_device("cpu", meta) == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), meta) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", meta) == torch.device("cpu")
    with pytest.raises(InvalidParameterError, match="no GPU"):
        resolve_device("cuda", meta)
    with pytest.raises(InvalidParameterError, match="no GPU"):
        resolve_device("cuda:1", meta)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", meta) == torch.device("cuda")
    assert resolve_device("cuda:1", meta) == torch.device("cuda", 1)
    for bad in ("gpu", "cuda:x", 3.5, ""):
        with pytest.raises(InvalidParameterError, match="device must be"):
            resolve_device(bad, meta)


def test_call_functional_is_the_model_with_its_tensors_replaced():
    """functional_call with new parameters equals the model with those parameters loaded, for
    Tensor and dict inputs; the model itself is not changed."""
    model = Keywords()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    moved = {n: p.detach() + 0.1 * torch.ones_like(p) for n, p in model.named_parameters()}
    loaded = copy.deepcopy(model)
    loaded.load_state_dict(moved)
    inputs = {"features": X, "mask": MASK}
    torch.testing.assert_close(
        call_functional(model, moved, inputs), loaded(**inputs), rtol=0, atol=0
    )
    inner = {n.removeprefix("inner."): p for n, p in moved.items()}
    torch.testing.assert_close(
        call_functional(model.inner, inner, X), loaded.inner(X), rtol=0, atol=0
    )
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_call_functional_replaces_buffers_too():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double().eval()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors["1.running_mean"] = torch.full((4,), 0.5, dtype=torch.float64)
    loaded = copy.deepcopy(model)
    loaded[1].running_mean.fill_(0.5)
    torch.testing.assert_close(call_functional(model, tensors, X), loaded(X), rtol=0, atol=0)


def test_per_example_gradients_through_call_functional_equal_an_autograd_loop():
    """vmap(grad(...)) over call_functional, the path of qem's generic per-example gradients,
    against one backward pass per example (float64: the same arithmetic up to reassociation)."""
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(theta, x, y):
        return loss_fn(call_functional(model, theta, x[None]), y[None]).sum()

    per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, X, Y)
    for i in range(len(Y)):
        model.zero_grad()
        loss_fn(model(X[i : i + 1]), Y[i : i + 1]).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-12, atol=1e-14)
