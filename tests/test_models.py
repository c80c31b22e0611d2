"""Reference models, pretraining, evaluation and the pretrained-weights cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import qem.pretrain
from cases import make_task
from qem.errors import InvalidParameterError, NonFiniteError
from qem.losses import cross_entropy
from qem.metrics import evaluate_accuracy, evaluate_loss
from qem.models import MLP, LogisticRegression, SmallCNN, build_model, num_parameters
from qem.pretrain import cached_pretrain, pretrain


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian classes in 20 dimensions, float32 (qem's models' dtype)."""
    x, y = make_task(n, seed, dim=20, separation=3.0)
    return x.float(), y


class _ListDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_parameter_counts_and_layers() -> None:
    cnn = SmallCNN()
    assert num_parameters(cnn) == 46_730
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cnn.modules())
    assert num_parameters(MLP()) == 784 * 128 + 128 + 128 * 10 + 10
    assert num_parameters(MLP(20, (8, 4), 3)) == 20 * 8 + 8 + 8 * 4 + 4 + 4 * 3 + 3
    assert num_parameters(LogisticRegression(784, 10)) == 7850
    assert isinstance(cnn[-1], nn.Linear) and "fc2.weight" in dict(cnn.named_parameters())
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_accepts_images_or_flat_inputs() -> None:
    mlp = build_model("mlp", seed=0)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(mlp(x), mlp(x.reshape(3, 784)))


def test_build_model_registry_and_seed() -> None:
    state = torch.random.get_rng_state()
    a, b = build_model("cnn", seed=1), build_model("cnn", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, build_model("cnn", seed=2).conv1.weight)
    model = build_model("logreg", in_features=5, out_features=2, dtype=torch.float64)
    assert model.linear.weight.dtype == torch.float64
    with pytest.raises(InvalidParameterError, match="choose one of"):
        build_model("resnet")
    with pytest.raises(InvalidParameterError, match="positive"):
        MLP(784, (0,), 10)


def test_pretrain_improves_accuracy_and_is_seeded() -> None:
    train, test = _blobs(300, 0), _blobs(300, 1)
    model = build_model("logreg", seed=0, in_features=20, out_features=3)
    before = evaluate_accuracy(model, test)
    pretrain(model, train, epochs=3, lr=0.1, batch_size=64, seed=0, progress=False)
    after = evaluate_accuracy(model, test)
    assert before < 0.6 and after > 0.9
    again = build_model("logreg", seed=0, in_features=20, out_features=3)
    pretrain(again, train, epochs=3, lr=0.1, batch_size=64, seed=0, progress=False)
    assert torch.equal(again.linear.weight, model.linear.weight)
    other = build_model("logreg", seed=0, in_features=20, out_features=3)
    pretrain(other, train, epochs=3, lr=0.1, batch_size=64, seed=1, progress=False)
    assert not torch.equal(other.linear.weight, model.linear.weight)
    assert not model.training


def test_pretrain_casts_inputs_and_rejects_divergence() -> None:
    x, y = _blobs(64, 0)
    model = build_model("mlp", seed=0, in_features=20, hidden=(8,), out_features=3)
    model = model.to(torch.float64)
    pretrain(model, (x, y), epochs=1, seed=0, progress=False)  # float32 data, float64 model
    with pytest.raises(NonFiniteError, match="lower lr"):
        pretrain(model, (x * float("inf"), y), epochs=1, seed=0, progress=False)
    with pytest.raises(InvalidParameterError, match="epochs"):
        pretrain(model, (x, y), epochs=0, seed=0)


def test_evaluate_loss_and_generic_datasets() -> None:
    x, y = _blobs(50, 2)
    model = build_model("logreg", seed=0, in_features=20, out_features=3)
    with torch.no_grad():
        manual = cross_entropy(model(x), y).mean().item()
        manual_accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert evaluate_loss(model, cross_entropy, (x, y), batch_size=7) == pytest.approx(manual)
    assert evaluate_accuracy(model, _ListDataset(x, y), batch_size=7) == pytest.approx(
        manual_accuracy
    )


def test_cached_pretrain_reuses_and_rekeys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _blobs(100, 0)

    def factory() -> nn.Module:
        return build_model("logreg", seed=0, in_features=20, out_features=3)

    hyper = {"epochs": 2, "lr": 0.05, "batch_size": 32, "seed": 0, "progress": False}
    first = cached_pretrain(tmp_path, "blobs/logreg", factory, data, **hyper)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("blobs_logreg-")
    assert not torch.equal(first.linear.weight, factory().linear.weight)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrain ran although the cache holds the model")

    monkeypatch.setattr(qem.pretrain, "pretrain", refuse)
    second = cached_pretrain(tmp_path, "blobs/logreg", factory, data, **{**hyper, "progress": True})
    assert torch.equal(second.linear.weight, first.linear.weight)
    with pytest.raises(AssertionError, match="pretrain ran"):
        cached_pretrain(tmp_path, "blobs/logreg", factory, data, **{**hyper, "epochs": 3})
    with pytest.raises(AssertionError, match="pretrain ran"):
        cached_pretrain(tmp_path, "blobs/logreg", factory, (data[0] + 1, data[1]), **hyper)
    assert len(list(tmp_path.iterdir())) == 1  # no temporary files left behind
