"""qem.check_data: the curator's list of the private records the private pass would zero, by
index and reason, from a copy of the model (nothing released, the model untouched)."""

from __future__ import annotations

import math

import pytest
import torch

import qem
from cases import loss_fn, make_model, make_task, run
from qem.data_check import InvalidRecord


def test_every_kind_of_invalid_record_is_listed_by_index_and_reason():
    x, y = make_task(50, 2)
    x, y = x.clone(), y.clone()
    x[3, 1] = math.nan
    y[10], y[41] = 7, -1
    x[20, 0] = math.inf
    model = make_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    found = qem.check_data(model, loss_fn, (x, y), batch_size=16)
    assert [r.index for r in found] == [3, 10, 20, 41]
    reasons = {r.index: r.reason for r in found}
    assert "NaN" in reasons[3] and "label 7" in reasons[10] and "label -1" in reasons[41]
    assert "NaN or infinity" in reasons[20]
    assert all(torch.equal(model.state_dict()[n], v) for n, v in before.items())


def test_clean_data_has_no_invalid_record_and_a_failing_batch_is_resolved_per_record():
    x, y = make_task(30, 2)
    model = make_model()
    assert qem.check_data(model, loss_fn, (x, y)) == []
    found = qem.check_data(model, loss_fn, (x, y.double()))  # float labels: cross_entropy raises
    assert len(found) == 30
    assert all(isinstance(r, InvalidRecord) and "raises" in r.reason for r in found)


def test_fine_tune_counts_invalid_records_for_the_curator_only():
    x, y = make_task(160, 2, shift=0.5)
    y = y.clone()
    y[[5, 50, 90]] = 9
    task = {
        "model": make_model(),
        "public": make_task(120, 1),
        "private": (x, y),
        "validation": make_task(60, 3, shift=0.5),
    }
    with pytest.warns(
        qem.finetune.InvalidRecordsWarning, match="6 private record reads in 2 of 2 round"
    ):
        result = run(task, epsilon=2.0, subspace="dense", k=8, rounds=2)
    assert result.diagnostics.invalid_records == [3, 3]
    assert "invalid_records" in result.diagnostics.to_dict()
    assert result.report.to_dict()["invalid_records"] == "zero"  # the policy, never a count
