"""What ``qem`` prints: formatted numbers, the preview's inputs and applicable fields, the
round bar and the ``qem`` logger; and a start-up that does not load torch or pandas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qem
import qem.progress
from qem.cli.common import format_value
from qem.cli.main import main


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.9484591844702315, "1.948"),
        (0.2680508, "0.2681"),
        (1e-5, "1e-05"),
        (49000.0, "49000"),
        (2.0, "2"),
        (float("nan"), "nan"),
        (7, "7"),
        (True, "True"),
        ("srht", "srht"),
        ([1450.3, 2900.0, 0.0], "1.45e+03, 2.9e+03, 0"),
        ([0.123456] * 6, ", ".join(["0.123"] * 6)),
        (
            [float(i) for i in range(1, 51)],
            "1, 2, 3, ..., 49, 50 (50 values)",
        ),
        ([], "[]"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def preview_table(capsys, *argv: str) -> dict[str, str]:
    assert main(["preview", "--epsilon", "1", "--n", "1000", "--k", "10", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(None, 1) for line in lines if line.startswith("  ")]  # not the titles
    return {name: value.strip() for name, value in rows}


def test_preview_echoes_every_input_and_hides_what_gdp_does_not_use(capsys):
    table = preview_table(capsys, "--gamma", "0.5", "--lam", "2", "-C", "3")
    assert table["epsilon"] == "1" and table["delta"] == "1e-05" and table["mode"] == "gdp"
    assert table["adjacency"] == "replace_one" and table["clipping"] == "dual"
    assert table["N"] == "1000" and table["k"] == "10" and table["lam"] == "2"
    assert table["clip_norm"] == "3" and table["gamma"] == "(A = gamma I)  0.5"
    assert table["mu"] == "0.2681"
    assert "radius" not in table and "worst_case_acceptance" not in table


def test_preview_hides_what_pure_mode_does_not_use(capsys):
    table = preview_table(capsys, "--mode", "pure")
    assert table["mode"] == "pure" and table["epsilon"] == "1"
    assert "mu" not in table and "delta" not in table
    assert float(table["radius"]) > 0 and 0 < float(table["worst_case_acceptance"]) <= 1


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """argv of a two-round `qem finetune` on tiny files, without --no-progress."""
    (tmp_path / "tiny.py").write_text(
        "import torch\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Linear(4, 3)\n"
    )
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 4)).astype(np.float32), y=y)
    monkeypatch.chdir(tmp_path)
    return ["finetune", "--model", "tiny:build", "--public", "d.npz", "--private", "d.npz",
            "--epsilon", "1", "--k", "4", "--rounds", "2", "--out", "run"]  # fmt: skip


def test_progress_bar_over_rounds_and_logger(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(qem.progress, "on_terminal", lambda: True)  # capsys is not a terminal
    assert main([*tiny_run, "-v"]) == 0
    err = capsys.readouterr().err
    assert "qem round 2/2" in err  # the outer bar
    assert "qem.finetune INFO: round 1/2: N_t = 60, z = " in err
    assert "clip norm C = " in err and "step length " in err
    assert "seconds" not in err  # timings are diagnostics: DEBUG only


def test_debug_logs_timings_as_diagnostics_and_no_progress_hides_bars(tiny_run, capsys):
    assert main([*tiny_run, "-vv", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "qem.finetune DEBUG: round 2 seconds per phase (diagnostics, not for publication" in err
    assert "private_pass" in err and "qem round" not in err


def test_no_bars_when_stderr_is_not_a_terminal(tiny_run, capsys):
    """A log file or a pipe gets the log lines, never a bar's escape codes."""
    assert main([*tiny_run, "-v"]) == 0
    err = capsys.readouterr().err
    assert "qem round" not in err and "\r" not in err and "\x1b" not in err
    assert "qem.finetune INFO: round 1/2" in err


FINETUNE = ["finetune", "--model", "m:f", "--public", "p.npz", "--private", "q.npz", "--out", "o"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["preview", "--help"],
        ["preview", "--epsilon", "1", "--n", "1000", "--k", "10"],
        ["preview", "--epsilon", "1", "--n", "49000", "--k", "100000", "--mode", "pure"],
        ["finetune", "--help"],
        [*FINETUNE, "--epsilon", "-1"],  # an argument error
        [*FINETUNE, "--epsilon", "1", "--damping", "0"],
        [*FINETUNE, "--epsilon", "1"],  # the data files do not exist
    ],
)
def test_start_up_does_not_import_torch_or_pandas(argv):
    """``--help``, the preview without a model and every argument error answer before torch
    is imported (they take well under a second; see README, How long things take)."""
    code = (
        "import sys\nfrom qem.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    )
    src = str(Path(qem.__file__).parents[1])
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PATH": ""},
        timeout=120,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "LOADED []"
