"""Loading a file never runs code it brings, and never reads more than its header declares."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import pytest

from qem.datasets.mnist import read_idx
from qem.errors import DataError

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
