"""``qem finetune`` on a Hugging Face transformer from the command line: a tiny BERT built from
a config (nothing downloaded), token ids in an NPZ of named inputs, and data sets returned by a
``module:factory``."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qem.cli.main import main
from qem.io import load

pytest.importorskip("transformers")

BERT = textwrap.dedent("""
    import torch
    from torch.utils.data import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    def build():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, num_labels=2)
        return BertForSequenceClassification(config).eval()

    class Tokens(Dataset):
        # items as a Hugging Face dataset in torch format gives them
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(1, 100, (n, 8), generator=g)
            self.labels = (self.ids[:, 0] > 50).long()
        def __len__(self):
            return len(self.ids)
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                    "labels": self.labels[i]}

    def public_set():
        return Tokens(48, 1)

    def private_set():
        return Tokens(64, 2)
""")

OPTIONS = ["--epsilon", "8", "--subspace", "srht", "--k", "16", "--layers", "classifier",
           "bert.pooler.dense", "--prior-weight", "1", "--batch-size", "16", "--seed", "0",
           "--no-progress", "--json"]  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "bert.py").write_text(BERT)
    rng = np.random.default_rng(0)
    for name, n in (("public", 48), ("private", 64)):
        ids = rng.integers(1, 100, (n, 8)).astype(np.int32)  # stored narrow: read as int64
        lengths = rng.integers(4, 9, n)
        mask = (np.arange(8) < lengths[:, None]).astype(np.int8)
        np.savez(
            tmp_path / f"{name}.npz",
            input_ids=ids * mask,
            attention_mask=mask,
            token_type_ids=np.zeros((n, 8), np.int64),
            labels=(ids[:, 0] > 50).astype(np.int64),
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "bert", raising=False)
    return tmp_path


def finetuned(capsys, public: str, private: str) -> dict:
    argv = ["finetune", "--model", "bert:build", "--public", public, "--private", private]
    assert main([*argv, *OPTIONS, "--out", "run"]) == 0
    return json.loads(capsys.readouterr().out)


def moved(run_dir: Path) -> set[str]:
    namespace: dict = {}
    exec(BERT, namespace)
    before = namespace["build"]().state_dict()
    after = load(run_dir).state_dict
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over torch's sdpa
def test_a_bert_is_fine_tuned_on_an_npz_of_token_ids(workdir, capsys):
    out = finetuned(capsys, "public.npz", "private.npz")
    assert out["report"]["N"] == 64 and out["report"]["k"] == 16
    expected = {f"{m}.{p}" for m in ("classifier", "bert.pooler.dense") for p in ("weight", "bias")}
    assert moved(workdir / "run") == expected


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_factories_may_return_datasets(workdir, capsys):
    out = finetuned(capsys, "bert:public_set", "bert:private_set")
    assert out["report"]["N"] == 64
    assert moved(workdir / "run") <= {
        f"{m}.{p}" for m in ("classifier", "bert.pooler.dense") for p in ("weight", "bias")
    }


def test_export_of_a_model_with_named_inputs_is_refused_before_the_run(workdir, capsys):
    argv = ["finetune", "--model", "bert:build", "--public", "public.npz", "--private"]
    assert main([*argv, "private.npz", *OPTIONS, "--out", "run", "--export-pt2"]) == 2
    assert "--export-pt2 traces the model on tensor inputs" in capsys.readouterr().err
    assert not (workdir / "run").exists()
