"""Packaging: what importing qem loads, the optional extras and their errors, the license and
type marker in the built package, and where the pretrained-model cache lives."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import platformdirs
import pytest
import torch

import qem
from qem.baselines.dpsgd import dpsgd
from qem.errors import MissingExtraError
from qem.experiments.report import write_report
from qem.losses import cross_entropy
from qem.models import build_model
from qem.pretrain import CACHE_DIR_VARIABLE, cached_pretrain, default_cache_dir

REPO = Path(__file__).parent.parent
SRC = Path(qem.__file__).parents[1]
EXPERIMENT_FIXTURES = Path(__file__).parent / "fixtures" / "experiments"
EXTRA_PACKAGES = ("opacus", "pandas", "tables", "matplotlib", "transformers", "peft")


def modules_loaded_by(code: str) -> set[str]:
    """The names in ``sys.modules`` of a fresh interpreter after it ran ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_privacy_and_mechanism_import_without_torch_pandas_or_scipy_stats() -> None:
    loaded = modules_loaded_by(
        "import numpy as np, qem.privacy\n"
        "from qem.mechanism import QuadraticExponentialMechanism\n"
        "m = QuadraticExponentialMechanism(np.eye(3), N=100, lam=1.0, clip_norm=1.0)\n"
        "m.calibrate(1.0, 1e-5)\n"
        "m.preview().to_dict()"
    )
    assert "qem.mechanism" in loaded and "scipy.optimize" in loaded  # the probe ran
    heavy = {"torch", "pandas", "scipy.stats", "sklearn", "dp_accounting", *EXTRA_PACKAGES}
    assert heavy & loaded == set()


def test_the_core_imports_without_the_extras() -> None:
    loaded = modules_loaded_by(
        "import qem.baselines.registry, qem.datasets, qem.datasets.scenarios, qem.experiments, "
        "qem.finetune, qem.io, qem.metrics, qem.pretrain"
    )
    assert "qem.baselines.dpsgd" in loaded and "qem.experiments.report" in loaded
    assert set(EXTRA_PACKAGES) & loaded == set()


def block_imports(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make ``import <package>`` (and of its submodules) fail as if it were not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def test_dpsgd_without_opacus_names_the_baselines_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    block_imports(monkeypatch, "opacus")
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    model = build_model("logreg", seed=0, in_features=4, out_features=2)
    with pytest.raises(MissingExtraError, match=r"pip install 'qem\[baselines\]'"):
        dpsgd(model, cross_entropy, (x, y), (x, y), epsilon=1.0, delta=1e-5, progress=False)


@pytest.mark.parametrize(
    "module", ["qem.datasets.mimic", "qem.datasets.hdf5", "qem.datasets.synthetic_mimic"]
)
def test_mimic_modules_without_pandas_name_the_mimic_extra(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    block_imports(monkeypatch, "pandas", "tables")
    for name in ("qem.datasets.mimic", "qem.datasets.hdf5", "qem.datasets.synthetic_mimic"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'qem\[mimic\]'") as caught:
        importlib.import_module(module)
    assert isinstance(caught.value, ImportError)


def test_report_plots_without_matplotlib_name_the_bench_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    block_imports(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r"pip install 'qem\[bench\]'"):
        write_report(EXPERIMENT_FIXTURES, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_extras_hold_the_optional_packages_and_test_pulls_them_all() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for package in EXTRA_PACKAGES:
        assert package not in core
    assert any(r.startswith("opacus") for r in extras["baselines"])
    assert {r.split(">")[0] for r in extras["mimic"]} == {"pandas", "tables"}
    assert any(r.startswith("matplotlib") for r in extras["bench"])
    assert any(r.startswith("transformers") for r in extras["text"])
    assert any(r.startswith("peft") for r in extras["text"])
    assert "qem[baselines,mimic,bench,text]" in extras["test"]
    torch_requirement = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert "==" not in torch_requirement and "<" in torch_requirement


def test_license_and_type_marker_are_in_the_source_tree_and_the_wheel(tmp_path: Path) -> None:
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert (SRC / "qem" / "py.typed").is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["tool"]["setuptools"]["package-data"]["qem"] == ["py.typed"]

    pytest.importorskip("setuptools", minversion="77")  # license-files (PEP 639)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(SRC / "qem", tmp_path / "src" / "qem", ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("qem-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert "qem/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert b"License-Expression: Apache-2.0" in metadata


def test_default_cache_dir_is_the_variable_else_the_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "chosen"))
    assert default_cache_dir() == tmp_path / "chosen"
    monkeypatch.delenv(CACHE_DIR_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("qem"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "qem"


def test_cached_pretrain_without_a_directory_writes_to_the_default_cache_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = (torch.randn(20, 4), torch.randint(0, 2, (20,)))

    def factory() -> torch.nn.Module:
        return build_model("logreg", seed=0, in_features=4, out_features=2)

    cached_pretrain(None, "toy", factory, data, epochs=1, seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing in the cwd
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith("toy-") and entry.suffix == ".safetensors"
