"""Everyday mistakes at the command line and in saved runs: each gets a one-line qem error (exit
status 2, no traceback, nothing written) or the right behaviour, before any noise is drawn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qem
import qem.finetune
import qem.io
from cli_files import TINY_FACTORY, write_blobs
from qem.cli.main import main
from qem.cli.options import cli_spelling
from qem.data import as_dataset
from qem.errors import DataError, OutputExistsError
from qem.io import check_output_path, load, save_run

SRC = str(Path(qem.__file__).parents[1])

MODELS = TINY_FACTORY + textwrap.dedent("""
    def wider():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def broken():
        raise RuntimeError("the config file is missing")

    def sized(width):
        return torch.nn.Linear(4, width)
""")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The current directory, with models.py and public/private NPZ files."""
    (tmp_path / "models.py").write_text(MODELS)
    write_blobs(tmp_path, {"public": 60, "private": 80})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "models", raising=False)
    return tmp_path


def finetune(*extra: str, model: str = "models:build", private: str = "private.npz") -> list[str]:
    return ["finetune", "--model", model, "--public", "public.npz", "--private", private,
            "--epsilon", "2", "--k", "6", "--seed", "0", "--no-progress", "--out", "run",
            *extra]  # fmt: skip


def refused(capsys, argv: list[str], *phrases: str) -> str:
    """Run ``argv``: exit status 2, one line on stderr holding every phrase, no run written."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qem "), err
    for phrase in phrases:
        assert phrase in err, err
    assert "Traceback" not in err and not Path("run").exists()
    return err


@pytest.mark.parametrize(
    ("model", "phrases"),
    [
        ("models:broken", ["--model models:broken", "raised RuntimeError: the config file"]),
        ("models:sized", ["needs the arguments width", "give them defaults"]),
        ("models:absent", ["has no callable 'absent'"]),
    ],
)
def test_a_factory_that_raises_or_needs_arguments(workdir, capsys, model, phrases):
    refused(capsys, finetune(model=model), *phrases)


def test_a_module_that_fails_on_import(workdir, capsys):
    (workdir / "bad_import.py").write_text("raise ValueError('no GPU here')\n")
    refused(capsys, finetune(model="bad_import:build"), "importing bad_import raised ValueError")


def test_a_corrupt_or_mismatched_state_dict(workdir, capsys):
    (workdir / "garbage.pt").write_bytes(b"this is not a checkpoint at all")
    refused(capsys, finetune("--state-dict", "garbage.pt"), "--state-dict garbage.pt", "readable")
    namespace: dict = {}
    exec(MODELS, namespace)
    torch.save(namespace["wider"]().state_dict(), workdir / "wider.pt")
    refused(
        capsys,
        finetune("--state-dict", "wider.pt"),
        "does not fit the model",
        "shapes differ: 0.bias (8,) (the model's is (6,))",
    )
    save_file(namespace["build"]().state_dict(), str(workdir / "weights.safetensors"))
    assert main(finetune("--state-dict", "weights.safetensors")) == 0  # safetensors is read


def test_data_files_that_are_not_npz_archives(workdir, capsys):
    Path("notes.npz").write_text("x,y\n1,2\n")
    err = refused(capsys, finetune(private="notes.npz"), "notes.npz is not an NPZ archive")
    assert "allow_pickle" not in err  # never numpy's advice to unpickle
    whole = Path("private.npz").read_bytes()
    Path("cut.npz").write_bytes(whole[: len(whole) // 2])
    refused(capsys, finetune(private="cut.npz"), "cut.npz is a damaged NPZ archive")
    np.savez("objects.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, int))
    err = refused(capsys, finetune(private="objects.npz"), "array of Python objects")
    assert "allow_pickle" not in err
    refused(capsys, finetune(private="missing.npz"), "--private missing.npz: no file missing.npz")


def test_float64_and_integer_npz_arrays_are_converted_as_help_says(workdir, capsys):
    data = np.load("private.npz")
    np.savez("wide.npz", x=data["x"].astype(np.float64), y=data["y"].astype(np.int32))
    assert main([*finetune(private="wide.npz"), "-v"]) == 0
    err = capsys.readouterr().err
    assert "wide.npz[x]: float64 converted to torch.float32" in err
    assert "wide.npz[y]: int32 converted to int64 (class labels)" in err


def test_finetune_help_names_the_files_it_writes_and_every_conversion(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "model.safetensors" in text and "model.pt " not in text
    assert "divided by 255 into floats only with --scale-uint8" in text
    assert "floating inputs take the model's floating dtype" in text


def test_a_list_of_inputs_and_targets_is_read_as_the_pair():
    x, y = torch.randn(5, 3), torch.arange(5)
    as_list, as_tuple = as_dataset([x, y]), as_dataset((x, y))
    assert len(as_list) == len(as_tuple) == 5
    assert torch.equal(as_list[2][0], as_tuple[2][0]) and as_list[2][1] == as_tuple[2][1]
    as_numpy = as_dataset([x.numpy(), y.numpy()])
    assert torch.equal(as_numpy[4][0], x[4])
    examples = [(x[0], y[0]), (x[1], y[1])]  # a list of two examples stays a dataset of two
    assert len(as_dataset(examples)) == 2


def test_cli_errors_use_option_spellings(workdir, capsys):
    Path("run").mkdir()
    assert main(finetune()) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    Path("run").rmdir()
    np.savez("four.npz", x=np.zeros((4, 4), np.float32), y=np.zeros(4, np.int64))
    argv = finetune()
    argv[argv.index("public.npz")] = "four.npz"  # too few to hold out a validation split
    refused(capsys, argv, "pass --validation (public) or --prior-weight")
    assert cli_spelling("pass clip_norm, or mode='pure' with secure_noise=True") == (
        "pass --clip-norm, or --mode pure with --secure-noise"
    )
    assert cli_spelling("the subspace dimension k and the mode") == (
        "the subspace dimension k and the mode"  # plain words stay words
    )
    path = "/data/clip_norm.npz and m:batch_size"
    assert cli_spelling(f"cannot read {path}") == f"cannot read {path}"  # names stay names


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        (["--epsilon", "-1"], "epsilon must be a finite number > 0"),
        (["--delta", "2"], "delta must lie strictly between 0 and 1"),
        (["--damping", "0"], "--damping must be a finite number > 0"),
        (["--k", "0"], "--k must be an integer >= 1"),
        (["--clip-quantile", "1.5"], "--clip-quantile must lie in (0, 1]"),
        (["--momentum", "1"], "--momentum must lie in [0, 1)"),
        (["--epochs", "2"], "--epochs: only with --schedule"),
    ],
)
def test_argument_errors_are_one_line_before_any_file_is_read(
    tmp_path, capsys, monkeypatch, option, phrase
):
    monkeypatch.chdir(tmp_path)  # no model module, no data files: the options fail first
    argv = finetune()
    position = argv.index("--epsilon")
    del argv[position : position + 2]
    refused(capsys, [*argv, "--epsilon", "2", *option], phrase)


def test_overwrite_refuses_a_directory_that_is_not_a_qem_run(workdir, capsys):
    Path("run").mkdir()
    Path("run/notes.txt").write_text("my notes")
    assert main(finetune("--overwrite")) == 2
    assert "run is not a qem run (it holds notes.txt" in capsys.readouterr().err
    assert Path("run/notes.txt").read_text() == "my notes"
    Path("run/notes.txt").unlink()
    Path("run/model.safetensors").write_bytes(b"")  # run files, but no privacy report
    with pytest.raises(OutputExistsError, match=r"it has no privacy_report\.json"):
        check_output_path("run", overwrite=True)
    Path("run/model.safetensors").unlink()
    assert main(finetune("--overwrite")) == 0  # an empty directory holds nothing to lose
    assert main(finetune("--overwrite", "--export-pt2")) == 0  # a qem run is replaced
    assert sorted(p.name for p in Path("run").iterdir()) == [
        "diagnostics.json",
        "model.pt2",
        "model.safetensors",
        "privacy_report.json",
    ]
    assert main(finetune("--overwrite")) == 0  # model.pt2 is a run file too


def test_a_save_killed_midway_leaves_staging_that_the_next_save_removes(tmp_path):
    """kill -9 between writing the staging directory and installing it."""
    code = textwrap.dedent(f"""
        import os, signal, torch, qem.io
        qem.io._install = lambda staging, target: os.kill(os.getpid(), signal.SIGKILL)
        qem.io.save_run({str(tmp_path / "run")!r}, {{"w": torch.ones(2)}}, {{"run": 1}})
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    killed = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".run.qem-staging.*")
    assert (stale / "privacy_report.json").is_file() and not (tmp_path / "run").exists()
    save_run(tmp_path / "run", {"w": torch.zeros(2)}, {"run": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert qem.io.read_run(tmp_path / "run").report == {"run": 2}


@pytest.fixture
def saved_run(workdir):
    assert main(finetune()) == 0
    return workdir / "run"


def test_a_saved_run_loads_typed(saved_run):
    run = qem.load(saved_run)
    assert run.report.epsilon == 2.0 and run.report.k == 6 and not run.report.partial
    assert run.report.spent_epsilon == run.report.accountant["epsilon"]
    assert run.diagnostics["warning"].startswith("NOT FOR PUBLICATION")


def test_broken_json_in_a_saved_run_names_the_file(saved_run):
    diagnostics = saved_run / "diagnostics.json"
    diagnostics.write_text('{"seconds": {')
    with pytest.warns(UserWarning, match=f"{diagnostics} is not valid JSON.*without its diag"):
        run = load(saved_run)
    assert run.diagnostics is None and run.report.epsilon == 2.0 and run.state_dict
    diagnostics.unlink()
    report = saved_run / "privacy_report.json"
    text = report.read_text()
    report.write_text(text[:-20])
    with pytest.raises(DataError, match=f"{report} is not valid JSON \\(line"):
        load(saved_run)
    report.write_text(json.dumps({**json.loads(text), "schema": "qem.privacy_report/1"}))
    with pytest.raises(DataError, match=f"{report}: not a qem privacy report of schema"):
        load(saved_run)
    report.write_text(json.dumps({**json.loads(text), "epsilon": float("nan")}))
    with pytest.raises(DataError, match=f"{report} is not strict JSON: it holds NaN"):
        load(saved_run)
    report.write_text(text)
    (saved_run / "model.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(DataError, match=r"model\.safetensors is not a readable safetensors file"):
        load(saved_run)


def interrupting_fine_tune(monkeypatch, after_releases: int) -> None:
    """fine_tune, interrupted (Ctrl-C) right after its ``after_releases``-th release was handed
    to on_release (0: before the first)."""
    real = qem.finetune.fine_tune

    def interrupted(*args, on_release, **kwargs):
        if after_releases == 0:
            raise KeyboardInterrupt
        seen = []

        def release_then_interrupt(result):
            on_release(result)
            seen.append(result)
            if len(seen) == after_releases:
                raise KeyboardInterrupt

        return real(*args, on_release=release_then_interrupt, **kwargs)

    monkeypatch.setattr(qem.finetune, "fine_tune", interrupted)


def test_ctrl_c_after_a_release_is_one_line_and_leaves_a_partial_run(workdir, capsys, monkeypatch):
    interrupting_fine_tune(monkeypatch, after_releases=1)
    assert main(finetune("--rounds", "2")) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Traceback" not in err
    assert err.startswith("qem finetune: interrupted: the releases drawn so far are saved in run")
    run = load("run")
    assert run.report.partial and run.report.guarantee.startswith("PARTIAL RUN (1 round(s)")
    assert len(run.report.rounds) == 1 and run.report.schedule["rounds"] == 2
    assert run.report.spent_epsilon < run.report.epsilon  # one of two rounds spent


def test_ctrl_c_before_any_release_saves_nothing(workdir, capsys, monkeypatch):
    interrupting_fine_tune(monkeypatch, after_releases=0)
    assert main(finetune()) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "qem finetune: interrupted: nothing was saved (it came before the first release was saved)"
    )
    assert not Path("run").exists()


def test_no_warning_for_a_healthy_load(saved_run):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(saved_run)
