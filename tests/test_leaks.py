"""What reaches the output besides the Gaussian draw (docs/theory.md §12, §14): forward passes
on private data, the report's contents, warnings, and files that must never be lost."""

from __future__ import annotations

import json
import os
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qem.io
from cases import blob_task, make_linear, make_task, run, with_options
from qem.checks import MAX_EPSILON
from qem.cli.main import main
from qem.errors import InvalidParameterError, OutputExistsError, PrivacyWarning, SpentBudgetError
from qem.finetune import ZeroStepWarning
from qem.io import load, read_run, save_run
from qem.report import REPORT_SCHEMA, PrivacyReport


@pytest.fixture(scope="module")
def task():
    """Softmax regression on 80 public, 50 private and 40 validation blobs; the common
    arguments of this file's runs: epsilon 1 in the dense subspace of k = 12, gamma = 0.1,
    C = 0.5, seed 0."""
    blobs = blob_task(sizes=(80, 50, 40), shift=0.0, model=make_linear)
    return with_options(
        blobs, epsilon=1.0, subspace="dense", k=12, damping=0.1, clip_norm=0.5, seed=0
    )


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model = model.double()
    with torch.no_grad():  # give the running statistics values a private batch would move
        model(torch.randn(64, 6, dtype=torch.float64) * 3 + 1)
    return model.train()


def test_no_private_forward_in_train_mode_and_the_callers_model_is_untouched(task):
    """A BatchNorm model in train mode: every forward pass on private data must run on a copy
    in eval mode, so the caller's model (weights, running statistics, mode) is bit-identical
    afterwards and every buffer of the released model equals the input's."""
    model = batchnorm_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    # private data far from the running mean: a train-mode pass would move it
    result = run(task, model=model, private=make_task(120, 2, shift=5.0), epsilon=4.0)
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in result.model.named_buffers():
        assert torch.equal(value, before[name]), name


def test_no_private_forward_in_train_mode_through_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "bn_models.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        def build():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
            with torch.no_grad():
                model(torch.randn(64, 6) * 3 + 1)
            return model.train()
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, (x, y) in {"public": make_task(80, 1), "private": make_task(120, 2, 5.0)}.items():
        np.savez(tmp_path / f"{name}.npz", x=x.float().numpy(), y=y.numpy())
    from bn_models import build

    expected = build().state_dict()
    argv = [
        "finetune", "--model", "bn_models:build", "--public", str(tmp_path / "public.npz"),
        "--private", str(tmp_path / "private.npz"), "--epsilon", "4", "--subspace", "dense",
        "--k", "12", "--clip-norm", "0.5", "--out", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    saved = load(tmp_path / "run").state_dict
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(saved[name], expected[name]), name


def test_report_is_typed_with_one_schema_and_no_private_measurements(task):
    runs = [run(task, private=make_task(120, 2), epsilon=2.0, rounds=rounds) for rounds in (1, 2)]
    for result in runs:
        data = result.report.to_dict()
        assert data["schema"] == REPORT_SCHEMA
        assert isinstance(data["C"], list) and len(data["C"]) == len(data["rounds"])
        assert {"source", "generator"} <= set(data["noise"]) and "seed" not in data["noise"]
        assert result.diagnostics.seed is not None  # the seed is a diagnostic only
        assert not any("second" in key for key in json.dumps(data).split('"'))
        assert PrivacyReport.from_dict(json.loads(result.report.to_json())) == result.report
        assert set(result.diagnostics.seconds) >= {"private_pass", "mechanism"}
    # the same keys whatever the number of rounds
    assert set(runs[0].report.to_dict()) == set(runs[1].report.to_dict())


def test_delta_at_least_one_over_n_warns_from_fine_tune(task):
    with pytest.warns(PrivacyWarning, match="1/N"):
        run(task, delta=0.05)


def test_huge_or_string_epsilon_is_refused_before_the_private_data(task):
    """epsilon = 1e9 once made the report's accounting allocate terabytes after the release:
    it is refused up front, and the largest accepted epsilon is accounted before any private
    row is read, with a bounded grid."""
    for bad in (1e9, "1"):
        with pytest.raises(InvalidParameterError, match="epsilon"):
            run(task, epsilon=bad)
    result = run(task, epsilon=MAX_EPSILON)
    assert result.report.accountant["epsilon"] == pytest.approx(MAX_EPSILON, rel=1e-6)


def test_zero_step_rounds_warn_and_are_counted(task):
    """Validation labels that contradict the private data make the exact mean step an ascent
    direction on public validation data: the round is skipped, warned about and counted."""
    x, y = make_task(60, 3)
    options = dict(private=make_task(150, 2), validation_data=(x, (y + 1) % 3), noise=False)
    with pytest.warns(ZeroStepWarning, match="did not lower the public validation loss"):
        result = run(task, rounds=2, **options)
    assert result.report.zero_step_rounds == 2 and result.report.step_lengths == [0.0, 0.0]


def test_default_validation_is_a_held_out_public_split(task):
    result = run(task, public=make_task(100, 1), validation_data=None)
    assert result.report.validation["n"] == 20
    assert "held-out public split" in result.report.validation["source"]
    assert result.report.curvature["n_public"] == 80


def test_a_failure_after_the_draw_keeps_the_release(task, monkeypatch):
    """An error in the line search (after the noise was drawn) raises SpentBudgetError carrying
    the releases and a report that accounts for the spent round; on_release saw it first."""
    import qem.finetune.step

    def broken(*args, **kwargs):
        raise RuntimeError("validation file vanished (injected)")

    monkeypatch.setattr(qem.finetune.step, "line_search_step", broken)
    seen = []
    with pytest.raises(SpentBudgetError, match="spent") as info:
        run(task, on_release=seen.append)
    partial = info.value.result
    assert len(partial.releases) == 1 and len(seen) == 1
    assert partial.report.guarantee.startswith("PARTIAL RUN")
    assert partial.report.accountant["epsilon"] == pytest.approx(1.0, abs=0.02)


def test_cli_checks_the_output_path_before_reading_private_data(tmp_path, monkeypatch, capsys):
    """A dangling symlink as --out fails before fine_tune runs (so no budget is spent)."""
    import qem.finetune

    called = []
    monkeypatch.setattr(qem.finetune, "fine_tune", lambda *a, **k: called.append(1))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 6), np.float32), y=np.zeros(10, np.int64))
    (tmp_path / "m.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(6, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = str(tmp_path / "d.npz")
    argv = ["finetune", "--model", "m:build", "--public", data, "--private", data,
            "--epsilon", "1", "--out", str(tmp_path / "dangling")]  # fmt: skip
    assert main(argv) == 2
    assert "symbolic link" in capsys.readouterr().err and not called


def test_save_recovers_from_a_crash_between_the_renames(tmp_path, monkeypatch):
    """Without an atomic exchange the overwrite renames twice; a kill between the renames
    leaves the old run in a backup, which the next load or save restores."""
    target = tmp_path / "run"
    save_run(target, {"w": torch.ones(1)}, {"run": "old"})
    monkeypatch.setattr(qem.io, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_second(src, dst):
        real_rename(src, dst)
        if str(dst) == str(qem.io._backup_path(target)):
            raise KeyboardInterrupt("kill -9 (injected)")

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_run(target, {"w": torch.zeros(1)}, {"run": "new"}, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()  # the moment the issue describes
    assert read_run(target).report == {"run": "old"}  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_exchanges_atomically_and_stale_staging_is_cleaned(tmp_path):
    target = tmp_path / "run"
    save_run(target, {"w": torch.ones(1)}, {"run": "old"})
    stale = tmp_path / f".run.{qem.io._STAGING}.999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half-written")
    save_run(target, {"w": torch.zeros(1)}, {"run": "new"}, overwrite=True)
    assert read_run(target).report == {"run": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(OutputExistsError, match="exists"):
        save_run(target, {}, {})
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        save_run(link, {}, {})


def test_warnings_are_quiet_for_a_healthy_run(task):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroStepWarning)
        warnings.simplefilter("error", PrivacyWarning)
        run(
            task, private=make_task(300, 2), validation_data=make_task(60, 4), epsilon=8.0,
            seed=None,  # a seeded run warns that it is not private against the seed's holder
        )  # fmt: skip


def test_secure_noise_through_fine_tune(task):
    secure = dict(private=make_task(100, 2), epsilon=2.0, secure_noise=True)
    result = run(task, seed=None, **secure)
    assert result.report.noise["source"] == "os_csprng" and result.report.noise["snapped"]
    assert result.report.rounds[0].snapping["float_tv_bound"] < 1e-9
    with pytest.raises(InvalidParameterError, match="no seed"):
        run(task, **secure)
