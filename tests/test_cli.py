"""Smoke tests of every ``qem`` subcommand on tiny data, through ``qem.cli.main.main``."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch

from cli_files import TINY_FACTORY, write_blobs
from qem.cli.main import main
from qem.io import load
from qem.privacy.gdp import calibrate_gdp_mu, gdp_epsilon


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_preview_json_gives_the_exact_mu(capsys):
    out = run_json(
        capsys,
        [
            "preview",
            "--epsilon",
            "1",
            "--delta",
            "1e-5",
            "--n",
            "49000",
            "--k",
            "2048",
            "--gamma",
            "0.01",
            "--rounds",
            "1",
            "--json",
        ],
    )
    assert round(out["mu"], 4) == 0.2681  # one sequential round: the whole budget's mu
    assert out["k"] == 2048 and out["N"] == 49000
    assert out["expected_excess_loss"] == pytest.approx(2048 / (2 * out["beta"] * 49000))


def test_preview_table_and_eigenvalue_file(capsys, tmp_path):
    eigenvalues = tmp_path / "eig.txt"
    np.savetxt(eigenvalues, [0.5, 1.0, 2.0])
    assert (
        main(
            [
                "preview",
                "--epsilon",
                "2",
                "--n",
                "1000",
                "--eigenvalues",
                str(eigenvalues),
                "--clipping",
                "euclidean",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "qem preview" in text and "mu" in text
    out = run_json(
        capsys,
        [
            "preview",
            "--epsilon",
            "2",
            "--n",
            "1000",
            "--eigenvalues",
            str(eigenvalues),
            "--clipping",
            "euclidean",
            "--json",
        ],
    )
    assert out["k"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epsilon", "0", "--n", "10", "--k", "2"], "epsilon"),
        (["--epsilon", "1", "--delta", "1.5", "--n", "10", "--k", "2"], "delta"),
        (["--epsilon", "1", "--n", "10"], "--k"),
        (["--epsilon", "1", "--n", "10", "--k", "2", "--gamma", "-1"], "positive definite"),
    ],
)
def test_preview_bad_input_exits_2_with_a_message(capsys, argv, message):
    assert main(["preview", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A factory module on sys.path and NPZ files with (x, y)."""
    (tmp_path / "tiny_models.py").write_text(TINY_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sizes = {"public": 60, "private": 90, "valid": 40}
    write_blobs(tmp_path, sizes)
    return tmp_path, {name: tmp_path / f"{name}.npz" for name in sizes}


def test_finetune_writes_model_and_report(capsys, user_files):
    tmp_path, paths = user_files
    out_dir = tmp_path / "run"
    argv = [
        "finetune",
        "--model",
        "tiny_models:build",
        "--public",
        str(paths["public"]),
        "--private",
        str(paths["private"]),
        "--validation",
        str(paths["valid"]),
        "--test",
        str(paths["valid"]),
        "--epsilon",
        "2",
        "--subspace",
        "srht",
        "--k",
        "8",
        "--out",
        str(out_dir),
        "--seed",
        "1",
        "--no-progress",
        "--json",
    ]
    out = run_json(capsys, argv)
    assert out["report"]["epsilon"] == 2.0 and out["report"]["k"] == 8
    assert 0.0 <= out["finetuned_test_accuracy"] <= 1.0
    saved = load(out_dir)
    assert saved.report.to_dict() == out["report"]
    assert main(argv) == 2  # the output directory exists now
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_finetune_accepts_torch_export_and_refuses_torchscript(capsys, user_files):
    tmp_path, paths = user_files
    from tiny_models import build

    model = build()
    program = torch.export.export(
        model, (torch.zeros(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "model.pt2")
    common = [
        "--public",
        str(paths["public"]),
        "--private",
        str(paths["private"]),
        "--epsilon",
        "1",
        "--k",
        "6",
        "--no-progress",
    ]
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tmp_path / "model.pt2"),
                *common,
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (tmp_path / "a" / "privacy_report.json").is_file()
    capsys.readouterr()
    torch.jit.script(model).save(str(tmp_path / "model.ts"))
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tmp_path / "model.ts"),
                *common,
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "torch.export" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_finetune_rejects_bad_data_file(capsys, user_files):
    tmp_path, paths = user_files
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4)))
    assert (
        main(
            [
                "finetune",
                "--model",
                "tiny_models:build",
                "--public",
                str(paths["public"]),
                "--private",
                str(tmp_path / "bad.npz"),
                "--epsilon",
                "1",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "keys" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_demo_mnist_json_on_a_small_slice(capsys, tmp_path):
    out = run_json(
        capsys,
        [
            "demo",
            "mnist",
            "--private-size",
            "300",
            "--test-size",
            "500",
            "--pretrain-epochs",
            "1",
            "--k",
            "64",
            "--rounds",
            "1",
            "--cache-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "--seed",
            "0",
            "--no-progress",
            "--json",
        ],
    )
    assert load(tmp_path / "run").report.to_dict() == out["report"] and out["out"] == str(
        tmp_path / "run"
    )
    for key in ("pretrained_accuracy", "finetuned_accuracy", "epsilon", "delta", "mu"):
        assert key in out
    assert "seconds" in out["diagnostics"] and "seconds" not in out["report"]
    assert out["epsilon"] == 1.0 and round(out["mu"], 4) == 0.2681
    assert out["report"]["subspace"]["type"] == "kronecker"


def test_demo_mimic_synthetic_json_and_table(capsys, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    common = ["--synthetic-subjects", "600", "--cache-dir", str(tmp_path / "cache"), "--seed", "0"]
    argv = ["demo", "mimic", *common, "--epsilon", "2", "--no-progress", "--json"]
    argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "SYNTHETIC" in captured.err
    assert out["synthetic"] is True and out["scenario"] == "synthetic_mimic_mort_icu_MICU"
    assert 0.0 <= out["pretrained_auroc"] <= 1.0 and 0.0 <= out["finetuned_auroc"] <= 1.0
    report = out["report"]
    assert out["epsilon"] == report["epsilon"] == 2.0 and out["delta"] == report["delta"] == 1e-5
    assert out["mu"] == report["mu"] == pytest.approx(calibrate_gdp_mu(2.0, 1e-5))
    assert gdp_epsilon(out["mu"], out["delta"]) == pytest.approx(2.0, rel=1e-6)
    # logistic regression on 8 variables x 24 hours x (value, mask): d = 2 * 385 <= 4096
    assert report["subspace"]["type"] == "identity" and report["k"] == out["parameters"] == 770
    # the synthetic file's temporary directory is gone
    assert not [p for p in scratch.iterdir() if p.name.startswith("qem-synthetic-mimic-")]

    assert load(tmp_path / "run").report.to_dict() == report
    common += ["--out", str(tmp_path / "mlp")]
    assert main(["demo", "mimic", *common, "--model", "mlp", "--k", "16", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("qem demo mimic -- SYNTHETIC data")
    assert "kronecker k=16" in captured.out and "fine-tuned test AUROC" in captured.out


def test_demo_mimic_bad_input_gives_a_message(capsys, tmp_path):
    assert main(["demo", "mimic", "--h5", str(tmp_path / "missing.h5"), "--no-progress"]) == 2
    assert "no MIMIC-Extract file" in capsys.readouterr().err
    not_hdf5 = tmp_path / "all_hourly_data.h5"
    not_hdf5.write_text("not HDF5")
    assert main(["demo", "mimic", "--h5", str(not_hdf5)]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err
    assert main(["demo", "mimic", "--h5", str(not_hdf5), "--synthetic-subjects", "50"]) == 2
    assert "--synthetic-subjects applies only without --h5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "mimic", "--task", "los_7"])
    assert exit_info.value.code == 2 and "invalid choice: 'los_7'" in capsys.readouterr().err
