"""Loading a file never runs code it brings, and never reads more than its header declares.

Each crafted file carries a HARMLESS payload: a pickle whose ``__reduce__`` touches a marker
file in tmp_path (or a Python expression doing the same). Loading must refuse the file with a
qem error, and the marker must not exist afterwards.
"""

from __future__ import annotations

import gzip
import io
import json
import pathlib
import pickle
import shutil
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tables
import torch

from qem.cli.main import main
from qem.datasets.mimic import load_mimic_extract
from qem.datasets.mnist import read_idx
from qem.datasets.synthetic_mimic import write_synthetic_mimic
from qem.errors import DataError, UnsupportedModelError
from qem.model_files import load_exported_model


class TouchOnUnpickle:
    """Unpickling this object creates the file at ``path`` (the harmless stand-in for code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return pathlib.Path.touch, (pathlib.Path(self.path),)


# ---------------------------------------------------------------- MIMIC-Extract HDF5 files


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mimic(tmp_path_factory.mktemp("h5") / "all.h5", 120, seed=0)


def _fixed_format_copy(source: Path, target: Path) -> Path:
    """``source`` with ``patients`` in pandas' fixed format: its string columns become object
    VLArrays whose rows PyTables stores as pickles."""
    with pd.HDFStore(source, "r") as store:
        frames = {key: store[key] for key in store}
    with pd.HDFStore(target, "w") as store, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the level name "Aggregation Function"
        for key, frame in frames.items():
            store.put(key, frame)
    return target


def test_fixed_format_string_columns_still_load(h5: Path, tmp_path: Path) -> None:
    fixed = _fixed_format_copy(h5, tmp_path / "fixed.h5")
    with tables.open_file(fixed) as handle:
        assert any(isinstance(node.atom, tables.ObjectAtom) for node in handle.walk_nodes(
            "/patients", classname="VLArray"
        ))  # fmt: skip
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        table_cohort, fixed_cohort = load_mimic_extract(h5), load_mimic_extract(fixed)
    assert np.array_equal(table_cohort.care_unit, fixed_cohort.care_unit)
    assert np.array_equal(table_cohort.raw, fixed_cohort.raw, equal_nan=True)


def test_h5_object_column_pickle_is_refused_without_running(h5: Path, tmp_path: Path) -> None:
    crafted = _fixed_format_copy(h5, tmp_path / "crafted.h5")
    marker = tmp_path / "ran"
    with tables.open_file(crafted, "a") as handle:
        node = next(
            node
            for node in handle.walk_nodes("/patients", classname="VLArray")
            if isinstance(node.atom, tables.ObjectAtom)
        )
        attributes = {name: node._v_attrs[name] for name in node._v_attrs._f_list("user")}
        where, name = node._v_parent, node._v_name
        node.remove()
        evil = handle.create_vlarray(where, name, tables.ObjectAtom())
        evil.append(TouchOnUnpickle(marker))
        for key, value in attributes.items():
            evil._v_attrs[key] = value
    with pytest.raises(DataError, match="pickled object"):
        load_mimic_extract(crafted)
    assert not marker.exists()


def test_h5_attribute_pickle_does_not_run(h5: Path, tmp_path: Path) -> None:
    """PyTables unpickles attributes when a node's attributes are first read (the root's on
    open): the payload must stay inert bytes and the file load as usual."""
    crafted = tmp_path / "attribute.h5"
    shutil.copy(h5, crafted)
    marker = tmp_path / "ran"
    payload = np.bytes_(pickle.dumps(TouchOnUnpickle(marker), protocol=0))
    with tables.open_file(crafted, "a") as handle:
        for where in ("/", "/patients", "/vitals_labs"):
            handle.get_node(where)._v_attrs["payload"] = payload
    marker.unlink(missing_ok=True)  # setting an attribute reads the node's attributes back
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        cohort = load_mimic_extract(crafted)
    assert len(cohort.raw) > 0
    assert not marker.exists()


# ---------------------------------------------------------------- torch.export archives


def _export(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    program = torch.export.export(
        model, (torch.zeros(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, path)
    return model


def _pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _program(members: dict[str, bytes], edit: Callable[[dict], None]) -> None:
    program = json.loads(members["models/model.json"])
    edit(program)
    members["models/model.json"] = json.dumps(program).encode()


def _first_expression(program: dict, code: str) -> None:
    stack: list = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict) and "expr_str" in item:
            item["expr_str"] = code
            return
        stack.extend(
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else []
        )
    raise AssertionError("the export has no symbolic expression")


def _sample_inputs(members: dict[str, bytes], marker: Path) -> None:
    members["data/sample_inputs/model.pt"] = _pickled(TouchOnUnpickle(marker))


def _pickled_weight(members: dict[str, bytes], marker: Path) -> None:
    config = json.loads(members["data/weights/model_weights_config.json"])
    entry = config["config"]["0.weight"]
    entry["use_pickle"] = True
    members["data/weights/" + entry["path_name"]] = _pickled(TouchOnUnpickle(marker))
    members["data/weights/model_weights_config.json"] = json.dumps(config).encode()


def _sympy_expression(members: dict[str, bytes], marker: Path) -> None:
    code = f"__import__('pathlib').Path('{marker}').touch()"
    _program(members, lambda program: _first_expression(program, code))


def _guard(members: dict[str, bytes], marker: Path) -> None:
    code = f"__import__('pathlib').Path('{marker}').touch() is None"
    _program(members, lambda program: program.update(guards_code=[code]))


@pytest.mark.parametrize("craft", [_sample_inputs, _pickled_weight, _sympy_expression, _guard])
def test_pt2_payload_is_refused_without_running(
    tmp_path: Path, craft: Callable[[dict[str, bytes], Path], None]
) -> None:
    """Each payload runs under ``torch.export.load(...).module()`` (torch 2.13): a pickle that
    torch loads with weights_only=False, a shape expression that sympy.sympify evaluates, a
    guard that .module() executes."""
    model = _export(tmp_path / "plain.pt2")
    marker = tmp_path / "ran"
    with zipfile.ZipFile(tmp_path / "plain.pt2") as archive:
        root = archive.namelist()[0].split("/")[0]
        members = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    craft(members, marker)
    with zipfile.ZipFile(tmp_path / "crafted.pt2", "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)
    with pytest.raises(UnsupportedModelError, match=r"refuses this torch\.export archive"):
        load_exported_model(tmp_path / "crafted.pt2")
    assert not marker.exists()
    loaded = load_exported_model(tmp_path / "plain.pt2")  # the untouched export loads
    x = torch.randn(5, 4)
    assert torch.allclose(loaded(x), model(x))


def test_finetune_cli_refuses_a_crafted_pt2(tmp_path: Path, capsys) -> None:
    _export(tmp_path / "plain.pt2")
    marker = tmp_path / "ran"
    with (
        zipfile.ZipFile(tmp_path / "plain.pt2") as source,
        zipfile.ZipFile(tmp_path / "crafted.pt2", "w") as target,
    ):
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("data/sample_inputs/model.pt"):
                data = _pickled(TouchOnUnpickle(marker))
            target.writestr(name, data)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((8, 4), np.float32), y=np.arange(8) % 3)
    argv = ["finetune", "--model", str(tmp_path / "crafted.pt2"), "--public", str(data)]
    argv += ["--private", str(data), "--epsilon", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "refuses this torch.export archive" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pt2_with_unknown_members_or_not_a_zip_is_refused(tmp_path: Path) -> None:
    _export(tmp_path / "plain.pt2")
    with (
        zipfile.ZipFile(tmp_path / "plain.pt2") as source,
        zipfile.ZipFile(tmp_path / "aoti.pt2", "w") as target,
    ):
        root = source.namelist()[0].split("/")[0]
        for name in source.namelist():
            target.writestr(name, source.read(name))
        target.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsupportedModelError, match="aotinductor"):
        load_exported_model(tmp_path / "aoti.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(UnsupportedModelError, match=r"not a torch\.export archive"):
        load_exported_model(tmp_path / "text.pt2")


# ---------------------------------------------------------------- IDX files


def test_idx_gzip_bomb_is_refused_after_reading_its_declared_size(tmp_path: Path) -> None:
    """A header declaring 10 labels followed by 64 MB of zeros (64 kB compressed) is refused
    after decompressing about 10 bytes past the header, not 64 MB."""
    bomb = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as handle:
        handle.write((2049).to_bytes(4, "big") + (10).to_bytes(4, "big"))
        for _ in range(64):
            handle.write(bytes(2**20))
    assert bomb.stat().st_size < 2**17
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="trailing data"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**21  # a full read would hold the 64 MB


def test_idx_declared_size_is_capped_and_truncation_is_reported(tmp_path: Path) -> None:
    huge = tmp_path / "images-idx3-ubyte"
    huge.write_bytes(b"".join(v.to_bytes(4, "big") for v in (2051, 2**16, 2**16, 2**16)))
    with pytest.raises(DataError, match="more than the"):
        read_idx(huge)
    short = tmp_path / "labels-idx1-ubyte.gz"
    short.write_bytes(gzip.compress((2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"ab"))
    with pytest.raises(DataError, match="holds 2: the file is truncated"):
        read_idx(short)
    cut = tmp_path / "cut-idx1-ubyte.gz"
    cut.write_bytes(
        gzip.compress((2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(10))[:-12]
    )
    with pytest.raises(DataError, match="truncated"):
        read_idx(cut)
