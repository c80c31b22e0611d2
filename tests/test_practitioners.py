"""Models and data as people have them: DataLoaders and Datasets of dicts, models called with
keyword arguments that return dicts or Hugging Face ModelOutputs, layer selection, frozen
parameters, and a small BERT built from a transformers config (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from cases import blob_task, make_model
from qem.baselines.dpsgd import dpsgd
from qem.baselines.nonprivate import nonprivate
from qem.data import fingerprint
from qem.errors import DataError, InvalidParameterError, UnsupportedModelError
from qem.finetune import FineTuneResult, fine_tune
from qem.losses import cross_entropy
from qem.metrics import evaluate_accuracy, predict
from qem.per_example.generic import _NOT_VMAPPABLE as NOT_VMAPPABLE
from qem.subspace.base import Subspace
from qem.subspace.factory import make_subspace
from qem.subspace.kronecker import Kronecker

RUN = {"epsilon": 4.0, "seed": 7, "k": 12, "batch_size": 32}
"""A private run (noise on, reproducible by its seed)."""


@pytest.fixture(scope="module")
def task():
    """(public, private, validation) blobs of cases' blob task, smaller and less shifted."""
    blobs = blob_task(sizes=(120, 160, 60), shift=0.5)
    return blobs["public"], blobs["private"], blobs["validation"]


def assert_same_run(a: FineTuneResult, b: FineTuneResult) -> None:
    """Bit-identical releases and fine-tuned parameters, and a release that moved the model."""
    assert len(a.releases) == len(b.releases) >= 1
    for wa, wb in zip(a.releases, b.releases, strict=True):
        np.testing.assert_array_equal(wa, wb)
        assert np.abs(wa).max() > 0
    for (name, pa), (_, pb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(pa, pb), name


def loader(data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> DataLoader:
    """A shuffling DataLoader, as training code builds one: qem must not follow its order."""
    generator = torch.Generator().manual_seed(batch_size)
    return DataLoader(TensorDataset(*data), batch_size, shuffle=True, generator=generator)


@pytest.mark.parametrize("subspace", ["srht", "kronecker"])
def test_dataloaders_give_the_release_of_the_tensors(task, subspace):
    public, private, validation = task
    options = {**RUN, "subspace": subspace, "rounds": 2, "partition_rounds": True}
    tensors = fine_tune(
        make_model(), cross_entropy, public, private, validation_data=validation, **options
    )
    loaders = fine_tune(
        make_model(),
        cross_entropy,
        loader(public, 7),
        loader(private, 5),
        validation_data=loader(validation, 11),
        **options,
    )
    assert_same_run(tensors, loaders)
    assert len(private[1]) == loaders.report.N
    assert loaders.report.curvature["public_data_fingerprint"] == fingerprint(public)


class Stream(IterableDataset):
    """Examples one by one, without __len__ or __getitem__."""

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.inputs, self.targets = data

    def __iter__(self):
        yield from zip(self.inputs, self.targets, strict=True)


def test_public_streams_are_read_once_and_a_private_stream_is_refused(task):
    public, private, validation = task
    tensors = fine_tune(
        make_model(), cross_entropy, public, private, validation_data=validation, **RUN
    )
    streams = fine_tune(
        make_model(),
        cross_entropy,
        DataLoader(Stream(public), batch_size=9),
        private,
        validation_data=Stream(validation),
        **RUN,
    )
    assert_same_run(tensors, streams)
    for stream in (Stream(private), DataLoader(Stream(private), batch_size=8)):
        with pytest.raises(DataError, match=r"private data is a stream.*map-style Dataset"):
            fine_tune(make_model(), cross_entropy, public, stream, **RUN)


class KeywordModel(nn.Module):
    """model(features=x, mask=m) = inner(x * m): a model called with keyword arguments."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner(features * mask)


class DictRows(Dataset):
    """A map-style dataset of dict examples, as tokenised datasets are."""

    def __init__(self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.mask, self.labels = features, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "mask": self.mask[i], "labels": self.labels[i]}


def masked(data: tuple[torch.Tensor, torch.Tensor], seed: int):
    """(x, 0/1 mask, y) with about a third of the features masked out."""
    x, y = data
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) > 0.3).double()
    return x, mask, y


@pytest.mark.parametrize(("subspace", "curvature"), [("kronecker", "kfac"), ("srht", "ggn")])
def test_dict_batches_and_keyword_models_match_the_tensor_run(task, subspace, curvature):
    public, private, validation = (masked(data, seed) for seed, data in enumerate(task))
    options = {**RUN, "subspace": subspace, "curvature": curvature}
    plain = fine_tune(
        make_model(),
        cross_entropy,
        (public[0] * public[1], public[2]),
        (private[0] * private[1], private[2]),
        validation_data=(validation[0] * validation[1], validation[2]),
        **options,
    )
    keywords = fine_tune(
        KeywordModel(make_model()),
        cross_entropy,
        {"features": public[0], "mask": public[1], "labels": public[2]},  # a dict of tensors
        DictRows(*private),  # a Dataset of dicts
        validation_data=({"features": validation[0], "mask": validation[1]}, validation[2]),
        **options,
    )
    for a, b in zip(plain.releases, keywords.releases, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    moved = keywords.model.inner.state_dict()
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(moved[name], value, rtol=1e-10, atol=1e-12)


def test_a_dict_batch_without_labels_and_a_three_tensor_dataset_are_explained(task):
    public, private, _ = (masked(data, seed) for seed, data in enumerate(task))
    no_labels = {"features": private[0], "mask": private[1], "label": private[2]}
    with pytest.raises(DataError, match=r"'labels' entry.*'label'"):
        fine_tune(KeywordModel(make_model()), cross_entropy, no_labels, no_labels, **RUN)
    three = TensorDataset(*public)  # (features, mask, labels) items
    with pytest.raises(DataError, match=r"(tuple|list) of 3.*should yield dicts"):
        fine_tune(KeywordModel(make_model()), cross_entropy, three, DictRows(*private), **RUN)


class BranchingKeywordModel(KeywordModel):
    """Applies the mask only when it masks something: data-dependent control flow (as in Hugging
    Face's check whether an attention mask pads anything), which torch.func.vmap cannot batch."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not bool(mask.all()):
            features = features * mask
        return self.inner(features)


@pytest.mark.parametrize("kind", ["srht", "dense"])
def test_models_vmap_cannot_batch_get_their_gradients_one_example_at_a_time(task, kind):
    x, mask, y = masked(task[1], 0)
    mask[:3] = 1.0  # some examples unmasked: the branch differs between examples
    inputs = {"features": x[:10], "mask": mask[:10]}
    branching, plain = BranchingKeywordModel(make_model()), KeywordModel(make_model())
    subspace = make_subspace(kind, plain, k=8, seed=0)
    expected = subspace.per_example_gradients(plain, cross_entropy, inputs, y[:10])
    got = subspace.per_example_gradients(branching, cross_entropy, inputs, y[:10])
    assert branching in NOT_VMAPPABLE and plain not in NOT_VMAPPABLE
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["nonprivate", "dpsgd"])
def test_the_baselines_take_dict_batches_and_keyword_models(task, method):
    public, private, _ = (masked(data, seed) for seed, data in enumerate(task))
    train = nonprivate if method == "nonprivate" else dpsgd
    options = {"epochs": 2, "batch_size": 16, "progress": False, "seed": 0}
    if method == "dpsgd":
        options.update(epsilon=4.0, delta=1e-5)
    plain = train(
        make_model(),
        cross_entropy,
        (public[0] * public[1], public[2]),
        (private[0] * private[1], private[2]),
        **options,
    )
    keywords = train(
        KeywordModel(make_model()),
        cross_entropy,
        {"features": public[0], "mask": public[1], "labels": public[2]},
        DataLoader(DictRows(*private), batch_size=5, shuffle=True),
        **options,
    )
    moved = keywords.model.inner.state_dict()
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(moved[name], value, rtol=1e-10, atol=1e-12)
    assert not torch.equal(moved["0.weight"], make_model().state_dict()["0.weight"])


class MixingKeywordModel(KeywordModel):
    """Subtracts the batch mean: example i's output depends on the others."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.inner(features * mask)
        return out - out.mean(dim=0)


def test_the_mixing_check_probes_dict_inputs(task):
    x, mask, y = masked(task[1], 0)
    inputs = {"features": x[:8], "mask": mask[:8]}
    honest = KeywordModel(make_model())
    subspace = Kronecker(honest, 6, seed=0)
    grads = subspace.per_example_gradients(honest, cross_entropy, inputs, y[:8])
    assert grads.shape == (8, subspace.k) and torch.isfinite(grads).all()
    mixing = MixingKeywordModel(make_model())
    with pytest.raises(UnsupportedModelError, match="mixes examples"):
        Kronecker(mixing, 6, seed=0).per_example_gradients(mixing, cross_entropy, inputs, y[:8])


class MaskedMean(nn.Module):
    """Token embeddings averaged over the positions the attention mask keeps, then a Linear
    head: an example whose mask keeps nothing gives 0/0 = NaN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * keep).sum(1) / keep.sum(1))


class SquareRoot(nn.Module):
    """sqrt of the inputs: finite on positive data, NaN on a standard normal probe."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.sqrt())


def test_the_mixing_probe_keeps_a_position_of_every_mask_and_refuses_non_finite_probes():
    ids = torch.randint(5, 100, (12, 2), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1], [1, 0]]).repeat(6, 1)}
    labels = ids[:, 0] % 3
    model = MaskedMean()  # short sequences: a random 0/1 mask would often keep nothing
    subspace = Kronecker(model, 6, seed=0, layers=[nn.Linear])
    grads = subspace.per_example_gradients(model, cross_entropy, batch, labels)
    assert torch.isfinite(grads).all()
    positive = torch.rand(8, 6, dtype=torch.float64) + 0.5
    model = SquareRoot()
    with pytest.raises(UnsupportedModelError, match="non-finite gradients"):
        Kronecker(model, 6, seed=0).per_example_gradients(
            model, cross_entropy, positive, torch.zeros(8, dtype=torch.long)
        )


class Wrapped(nn.Module):
    """The MLP returning its logits in a dict or in a Hugging Face ModelOutput."""

    def __init__(self, inner: nn.Module, form: str) -> None:
        super().__init__()
        self.inner, self.form = inner, form

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        if self.form == "dict":
            return {"logits": logits, "hidden": x}
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=logits)


@pytest.mark.parametrize(
    ("form", "curvature", "subspace"),
    [
        ("dict", "ggn", "srht"),
        ("model_output", "kfac", "kronecker"),
        ("model_output", "hessian", "dense"),
        ("model_output", "fisher", "identity"),
    ],
)
def test_dict_and_model_output_outputs_match_the_tensor_model(task, form, curvature, subspace):
    public, private, validation = task
    options = {**RUN, "curvature": curvature, "subspace": subspace}
    if subspace == "identity":
        options.pop("k")
    plain = fine_tune(
        make_model(), cross_entropy, public, private, validation_data=validation, **options
    )
    wrapped = fine_tune(
        Wrapped(make_model(), form),
        cross_entropy,
        public,
        private,
        validation_data=validation,
        **options,
    )
    for a, b in zip(plain.releases, wrapped.releases, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    outputs, _ = predict(wrapped.model, validation)
    torch.testing.assert_close(outputs, predict(plain.model, validation)[0])
    assert evaluate_accuracy(wrapped.model, validation) == evaluate_accuracy(
        plain.model, validation
    )


def deep_model(seed: int = 0) -> nn.Sequential:
    """Three Linear layers and a LayerNorm (trainable, not a Linear)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


SELECTIONS = [
    ("kronecker", ["5"], {"5.weight", "5.bias"}),
    ("kronecker", [nn.Linear], {"0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"}),
    ("kronecker", ["0", nn.LayerNorm, "3"], None),  # a LayerNorm has no Linear to span
    ("dense", ["0", "5"], {"0.weight", "0.bias", "5.weight", "5.bias"}),
    ("dense", [nn.LayerNorm], {"1.weight", "1.bias"}),
    ("srht", ["3", nn.LayerNorm], {"1.weight", "1.bias", "3.weight", "3.bias"}),
    ("identity", ["5"], {"5.weight", "5.bias"}),
]


@pytest.mark.parametrize(("subspace", "layers", "moved"), SELECTIONS)
def test_layers_select_what_moves_and_resampling_rebuilds_them(task, subspace, layers, moved):
    public, private, validation = task
    options = {**RUN, "subspace": subspace, "prior_weight": 1.0, "layers": layers}
    options.update({"rounds": 2, "resample_subspace": subspace != "identity"})
    if subspace == "identity":
        options.pop("k")
    model = deep_model()
    if moved is None:
        with pytest.raises(UnsupportedModelError, match="LayerNorm; Kronecker spans only"):
            fine_tune(model, cross_entropy, public, private, **options)
        return
    result = fine_tune(model, cross_entropy, public, private, validation_data=validation, **options)
    before, after = model.state_dict(), result.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == moved
    described = result.report.subspace
    assert set(described["parameters"]) == moved
    assert len(described["layer_selection"]) == len(layers)
    if subspace != "identity":
        assert [r.subspace_seed for r in result.report.rounds] == [0, 1]  # resampled


def test_layers_are_refused_with_a_built_subspace(task):
    public, private, _ = task
    model = make_model()
    with pytest.raises(InvalidParameterError, match="built Subspace"):
        fine_tune(
            model,
            cross_entropy,
            public,
            private,
            epsilon=1.0,
            subspace=Kronecker(model, 4),
            layers=["2"],
        )


def frozen_model() -> nn.Sequential:
    """deep_model with its first Linear, its LayerNorm (so that Kronecker can span every
    trainable parameter) and the last bias frozen."""
    model = deep_model()
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    model[5].bias.requires_grad_(False)
    return model


FROZEN = ("0.weight", "0.bias", "1.weight", "1.bias", "5.bias")


@pytest.mark.parametrize(
    "subspace", ["identity", "last_layer", "biases", "dense", "srht", "kronecker"]
)
def test_frozen_parameters_are_left_alone_by_every_subspace(task, subspace):
    public, private, validation = task
    model = frozen_model()
    options = {**RUN, "subspace": subspace, "prior_weight": 1.0}
    if subspace in ("identity", "last_layer", "biases"):
        options.pop("k")
    result = fine_tune(model, cross_entropy, public, private, validation_data=validation, **options)
    assert not set(FROZEN) & set(result.report.subspace["parameters"])
    before, after = model.state_dict(), result.model.state_dict()
    for name in FROZEN:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in result.report.subspace["parameters"])
    assert all(not p.requires_grad for n, p in result.model.named_parameters() if n in FROZEN)


@pytest.mark.parametrize("method", ["nonprivate", "dpsgd"])
def test_frozen_parameters_are_left_alone_by_the_baselines(task, method):
    public, private, _ = task
    model = frozen_model()
    if method == "nonprivate":
        result = nonprivate(
            model,
            cross_entropy,
            public,
            private,
            epochs=2,
            weight_decay=0.1,
            progress=False,
            seed=0,
        )
    else:
        result = dpsgd(
            model,
            cross_entropy,
            public,
            private,
            epsilon=4.0,
            delta=1e-5,
            epochs=2,
            batch_size=32,
            progress=False,
            seed=0,
        )
    before, after = model.state_dict(), result.model.state_dict()
    for name in FROZEN:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["3.weight"], after["3.weight"])


# -- a small BERT from a transformers config ----------------------------------------------------

PAD = 0


def token_examples(n: int, seed: int) -> list[dict]:
    """Sequences of 3 to 9 token ids in [5, 100); the label says whether the first token is
    below 50. Dicts of Python lists, as a tokenizer returns them."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        ids = torch.randint(5, 100, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": int(ids[0] < 50)})
    return examples


def pad(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest sequence of the batch, with its attention mask (what
    transformers' DataCollatorWithPadding does)."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    labels = torch.tensor([e["labels"] for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def bert_task():
    public, private, validation = (
        token_examples(n, seed) for n, seed in ((48, 1), (64, 2), (32, 3))
    )
    return (
        DataLoader(public, batch_size=16, collate_fn=pad),
        DataLoader(private, batch_size=8, shuffle=True, collate_fn=pad),
        DataLoader(validation, batch_size=16, collate_fn=pad),
    )


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over torch's sdpa
def test_kronecker_per_example_gradients_of_padded_batches_are_exact():
    model = tiny_bert().double()
    subspace = Kronecker(model, 64, seed=0, layers=[nn.Linear])
    batch = pad(token_examples(6, 4))
    labels = batch.pop("labels")
    got = subspace.per_example_gradients(model, cross_entropy, batch, labels)
    for i, mask in enumerate(batch["attention_mask"]):
        length = int(mask.sum())
        alone = {"input_ids": batch["input_ids"][i : i + 1, :length]}  # unpadded, no mask
        expected = Subspace.per_example_gradients(
            subspace, model, cross_entropy, alone, labels[i : i + 1]
        )
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("subspace", "layers", "k"),
    [
        ("kronecker", [nn.Linear], 96),
        ("srht", ["classifier", "bert.pooler.dense"], 16),
        ("dense", ["bert.encoder.layer.1.output.dense"], 8),
    ],
)
def test_a_small_bert_is_fine_tuned_on_the_chosen_layers(bert_task, subspace, layers, k):
    public, private, validation = bert_task
    model = tiny_bert()
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        validation_data=validation,
        epsilon=8.0,
        seed=0,
        subspace=subspace,
        layers=layers,
        k=k,
        prior_weight=1.0,
        batch_size=16,
    )
    before, after = model.state_dict(), result.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    spanned = set(result.report.subspace["parameters"])
    assert changed == spanned
    linear = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        for p in ("weight", "bias")
    }
    if subspace == "kronecker":
        assert spanned == linear  # every Linear, no embedding or LayerNorm
    else:
        assert spanned == {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    assert result.report.N == 64
    assert np.isfinite(result.releases[0]).all()
