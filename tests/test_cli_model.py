"""``qem finetune`` and ``qem demo`` with the user's model: a module in the current
directory, torch.export programs in and out, and a saved run whenever anything fails after the
release."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import qem.cli.demo
import qem.datasets.files
import qem.finetune
import qem.metrics
from cli_files import TINY_FACTORY
from qem.cli.main import main
from qem.errors import UnsupportedModelError
from qem.io import load
from qem.model_files import load_exported_model


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """tmp_path as the current directory, holding mymod.py and public/private NPZ files; not on
    sys.path."""
    (tmp_path / "mymod.py").write_text(TINY_FACTORY)
    rng = np.random.default_rng(0)
    for name, n in (("public", 60), ("private", 80)):
        y = rng.integers(0, 3, n)
        x = (rng.normal(size=(n, 4)) + np.eye(4)[y] * 2).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymod", raising=False)
    return tmp_path


def finetune_argv(model: str, out: str, *extra: str) -> list[str]:
    data = ["--public", "public.npz", "--private", "private.npz"]
    options = ["--epsilon", "2", "--k", "6", "--seed", "0", "--no-progress", "--out", out]
    return ["finetune", "--model", model, *data, *options, *extra]


def build_mymod() -> torch.nn.Module:
    namespace: dict = {}
    exec(TINY_FACTORY, namespace)
    return namespace["build"]()


def test_module_is_found_in_the_current_directory(workdir, capsys):
    path_before = list(sys.path)
    assert main(finetune_argv("mymod:build", "run")) == 0
    assert (workdir / "run" / "privacy_report.json").is_file()
    assert sys.path == path_before  # the current directory was on it for the import only


def test_module_elsewhere_gives_an_error_that_says_how(
    workdir, tmp_path_factory, capsys, monkeypatch
):
    other = tmp_path_factory.mktemp("elsewhere")
    argv = finetune_argv("mymod:build", str(other / "run"))
    argv[argv.index("public.npz")] = str(workdir / "public.npz")
    argv[argv.index("private.npz")] = str(workdir / "private.npz")
    monkeypatch.chdir(other)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "module 'mymod' not found in the current directory" in err
    assert "run qem from the directory holding mymod.py" in err and "PYTHONPATH" in err


def export(model: torch.nn.Module, path, batch: int, dynamic: bool) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(model, (torch.zeros(batch, 4),), dynamic_shapes=shapes)
    torch.export.save(program, path)


def record_calls(monkeypatch) -> list[str]:
    """Record fine_tune calls and every data file the command reads."""
    calls: list[str] = []
    monkeypatch.setattr(qem.finetune, "fine_tune", lambda *a, **k: calls.append("fine_tune"))
    real_load = qem.datasets.files.load_supervised_file

    def load_file(spec, **conversions):
        calls.append(spec)
        return real_load(spec, **conversions)

    monkeypatch.setattr(qem.datasets.files, "load_supervised_file", load_file)
    return calls


def test_a_fixed_batch_export_is_refused_before_private_data_is_read(workdir, capsys, monkeypatch):
    export(build_mymod().eval(), workdir / "static.pt2", batch=2, dynamic=False)
    calls = record_calls(monkeypatch)
    assert main(finetune_argv("static.pt2", "run")) == 2
    err = capsys.readouterr().err
    assert "re-export it with a dynamic batch dimension" in err
    assert "dynamic_shapes=({0: torch.export.Dim('batch')},)" in err
    assert calls == ["public.npz"] and not (workdir / "run").exists()


def test_a_train_mode_export_is_refused(workdir, capsys, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 3))
    export(model.train(), workdir / "train.pt2", batch=2, dynamic=True)
    calls = record_calls(monkeypatch)
    assert main(finetune_argv("train.pt2", "run")) == 2
    assert "exported in train mode" in capsys.readouterr().err and calls == []


def test_the_torchscript_refusal_gives_a_recipe_that_works(workdir, capsys):
    torch.jit.script(build_mymod()).save("model.ts")
    assert main(finetune_argv("model.ts", "run")) == 2
    err = capsys.readouterr().err
    recipe = err[err.index("model.eval(); ") : err.index(" with x a batch")]
    model, x = build_mymod(), torch.zeros(2, 4)
    exec(recipe, {"model": model, "x": x, "torch": torch})  # writes m.pt2
    assert main(finetune_argv("m.pt2", "run", "--test", "public.npz")) == 0


def test_export_pt2_round_trip(workdir, capsys):
    argv = finetune_argv("mymod:build", "run", "--export-pt2", "--json", "--prior-weight", "1")
    assert main(argv) == 0  # lam given: the step is applied (no line search)
    assert '"model_pt2"' in capsys.readouterr().out
    exported = load_exported_model(workdir / "run" / "model.pt2")
    finetuned = load(workdir / "run").into(build_mymod()).eval()
    assert not torch.equal(finetuned[0].weight, build_mymod()[0].weight)  # a step was taken
    for rows in (1, 5, 300):  # any batch size
        x = torch.randn(rows, 4)
        torch.testing.assert_close(exported(x), finetuned(x))
    # the written program is itself a model qem fine-tunes (and evaluates: eval() on it works)
    argv = finetune_argv(str(workdir / "run" / "model.pt2"), "again", "--test", "public.npz")
    assert main(argv) == 0


def test_an_error_after_the_release_names_the_saved_run(workdir, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(qem.metrics, "evaluate_accuracy", fail)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        main(finetune_argv("mymod:build", "run", "--test", "public.npz"))
    assert "saved in run" in capsys.readouterr().err
    assert load(workdir / "run").report.epsilon == 2.0


def test_demo_saves_before_evaluating(tmp_path, capsys, monkeypatch):
    """Without --out the demo saves to runs/demo-mimic-<UTC time> in the current directory,
    before the fine-tuned model is evaluated."""
    monkeypatch.chdir(tmp_path)
    evaluated: list[object] = []

    def evaluate_once(model, data, metric):
        evaluated.append(model)
        if len(evaluated) == 2:  # the fine-tuned model
            raise RuntimeError("evaluation broke")
        return 0.5

    monkeypatch.setattr(qem.cli.demo, "evaluate_metric", evaluate_once)
    argv = ["demo", "mimic", "--synthetic-subjects", "300", "--pretrain-epochs", "1"]
    argv += ["--k", "8", "--subspace", "kronecker", "--no-progress"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(RuntimeError, match="evaluation broke"):
        main(argv)
    (saved,) = (tmp_path / "runs").iterdir()
    assert saved.name.startswith("demo-mimic-") and saved.name.endswith("Z")
    assert f"saved in {saved.relative_to(tmp_path)}" in capsys.readouterr().err
    assert load(saved).report.k == 8


def test_probe_names_the_rows_for_a_module_that_fails(workdir):
    from qem.cli.user_model import probe_public

    with pytest.raises(UnsupportedModelError, match="public batch of 2 rows of shape"):
        probe_public(build_mymod(), torch.zeros(10, 5), "mymod:build")
