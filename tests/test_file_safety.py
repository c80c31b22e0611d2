"""Loading a file never runs code it brings, and never reads more than its header declares.

Each crafted file carries a HARMLESS payload: a pickle whose ``__reduce__`` touches a marker
file in tmp_path. Loading must refuse the file with a qem error or leave the payload inert, and
the marker must not exist afterwards.
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tables

from qem.datasets.mimic import load_mimic_extract
from qem.datasets.mnist import read_idx
from qem.datasets.synthetic_mimic import write_synthetic_mimic
from qem.errors import DataError


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
