"""Fail before spending (docs/theory.md §12): everything checkable without a release fails
before the first draw, and the private data's checks depend on its structure only."""

from __future__ import annotations

import math

import pytest
import torch

import qem.finetune.engine
from cases import make_model, make_task, run
from qem.errors import DataError, InvalidParameterError, ShapeError


@pytest.fixture
def draws(monkeypatch) -> list:
    """Every draw the engine makes (none may happen before a refused run)."""
    made: list = []
    original = qem.finetune.engine.RoundEngine._draw

    def counted(self, *args, **kwargs):
        made.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(qem.finetune.engine.RoundEngine, "_draw", counted)
    return made


def task(**overrides) -> dict:
    base = {
        "model": make_model(),
        "public": make_task(120, 1),
        "private": make_task(160, 2, shift=0.5),
        "validation": make_task(60, 3, shift=0.5),
    }
    return {**base, **overrides}


def options() -> dict:
    return {"epsilon": 2.0, "subspace": "dense", "k": 8, "progress": False}


x, y = make_task(160, 2, shift=0.5)
vx, vy = make_task(60, 3, shift=0.5)
nan_validation = vx.clone()
nan_validation[7, 2] = math.nan
px, py = make_task(120, 1)
CASES = {
    "targets shaped (n, 1)": (dict(public=(px, py[:, None])), ShapeError, "targets of shape"),
    "private feature count": (dict(private=(x[:, :5], y)), DataError, "fails on private"),
    "private float32": (dict(private=(x.float(), y)), ShapeError, "public data's form"),
    "private labels float": (dict(private=(x, y.double())), ShapeError, "public data's form"),
    "validation feature count": (dict(validation=(vx[:, :4], vy)), DataError, "validation"),
    "NaN in validation data": (dict(validation=(nan_validation, vy)), DataError, "NaN"),
    "validation label out of range": (
        dict(validation=(vx, torch.full_like(vy, 5))),
        DataError,
        "outside",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_input_fails_before_any_noise_is_drawn(name, draws):
    overrides, error, message = CASES[name]
    with pytest.raises(error, match=message):
        run(task(**overrides), **options())
    assert draws == []


def test_delta_none_in_gdp_mode_is_a_one_line_error(draws):
    with pytest.raises(InvalidParameterError, match="delta must be a number"):
        run(task(), **options(), delta=None)
    assert draws == []


def test_private_checks_read_the_structure_only():
    """A private label outside the outputs in the very first rows does not stop the run (it is
    the invalid-record policy's, whatever the record's position), and the message of a failing
    private forward pass never quotes the error's text."""
    bad = y.clone()
    bad[0] = 7
    with pytest.warns(qem.finetune.InvalidRecordsWarning, match="1 private record reads"):
        result = run(task(private=(x, bad)), **options())
    assert result.diagnostics.invalid_records == [1]
    assert "invalid" not in str(result.report.to_dict()).lower().replace("invalid_records", "")

    class Quoting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model()

        def forward(self, inputs):
            if inputs.shape[1] != 6:
                raise RuntimeError(f"secret value {inputs[0, 0].item()}")
            return self.inner(inputs)

    with pytest.raises(DataError) as info:
        run(task(model=Quoting(), private=(x[:, :5], y)), **options())
    assert "secret" not in str(info.value) and "withheld" in str(info.value)
