"""``qem check``: the curator's listing of the private records qem would zero, by index and
reason, with no release (no noise drawn), and the same records as qem.check_data finds."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import qem.mechanism.quadratic as mechanism_module
from cli_files import TINY_FACTORY
from qem.cli.main import main


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """tmp_path as the current directory with mymod.py and a private NPZ file whose record 3
    has a NaN input and record 7 the label 5 (the model has 3 outputs)."""
    (tmp_path / "mymod.py").write_text(TINY_FACTORY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    x[3, 1], y[7] = np.nan, 5
    np.savez(tmp_path / "private.npz", x=x, y=y)
    np.savez(tmp_path / "clean.npz", x=np.delete(x, [3, 7], 0), y=np.delete(y, [3, 7]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymod", raising=False)
    return tmp_path


def no_draws(monkeypatch) -> list:
    """Record every draw of the mechanism (there must be none)."""
    draws: list = []
    for name in ("sample", "mean"):
        monkeypatch.setattr(
            mechanism_module.QuadraticExponentialMechanism,
            name,
            lambda self, *a, _n=name, **k: draws.append(_n),
        )
    return draws


def test_check_lists_each_invalid_record_by_index_and_reason_and_draws_nothing(
    workdir, capsys, monkeypatch
):
    draws = no_draws(monkeypatch)
    argv = ["check", "--model", "mymod:build", "--private", "private.npz"]
    assert main([*argv, "--json"]) == 1
    invalid = json.loads(capsys.readouterr().out)["invalid"]
    assert [record["index"] for record in invalid] == [3, 7]
    assert "NaN" in invalid[0]["reason"] and "label" in invalid[1]["reason"]
    assert main(argv) == 1
    table = capsys.readouterr().out
    assert "2 invalid record(s)" in table and "record 3:" in table and "record 7:" in table
    assert draws == []


def test_check_of_clean_data_exits_0(workdir, capsys):
    assert main(["check", "--model", "mymod:build", "--private", "clean.npz"]) == 0
    assert "every record of clean.npz is valid" in capsys.readouterr().out


def test_check_names_a_missing_file_before_loading_anything(workdir, capsys):
    assert main(["check", "--model", "mymod:build", "--private", "missing.npz"]) == 2
    assert "no file missing.npz" in capsys.readouterr().err
