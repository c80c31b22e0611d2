"""qem.io: the atomic file writer, and model files as safetensors read back without pickle."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import qem.io
from qem.errors import DataError, OutputExistsError
from qem.io import (
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    read_run,
    read_state_dict,
    save_run,
    state_dict_bytes,
    write_atomically,
)


def test_atomic_write_replaces_whole_and_fsyncs_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    synced: list[bool] = []  # True for a directory
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_atomically(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert synced == [False, True]  # the file before the rename, the directory after
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("failure", ["fsync", "replace", "interrupt"])
def test_atomic_write_failing_midway_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "cell.json"
    path.write_bytes(b'{"old": true}')
    written: list[bytes] = []

    def fail(*args: object) -> None:
        written.extend(p.read_bytes() for p in tmp_path.glob(".cell.json.*.tmp"))
        if failure == "interrupt":
            raise KeyboardInterrupt("killed (injected)")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(os, "fsync" if failure != "replace" else "replace", fail)
    error = KeyboardInterrupt if failure == "interrupt" else OSError
    with pytest.raises(error, match="injected"):
        write_atomically(path, b'{"new": true}')
    assert written == [b'{"new": true}']  # the failure came after the data was written
    assert path.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["cell.json"]


class TiedBatchNormNet(nn.Module):
    """BatchNorm (float running statistics and an int64 num_batches_tracked) and an output
    layer whose weight is the input layer's (shared storage), and a buffer that is a transposed
    view of it (shared and non-contiguous)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(4, 4, bias=False)
        self.norm = nn.BatchNorm1d(4)
        self.decode = nn.Linear(4, 4, bias=False)
        self.decode.weight = self.encode.weight  # tied (same tensor)
        self.register_buffer("view", self.encode.weight.detach().t(), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.norm(self.encode(x)))


def trained_net() -> TiedBatchNormNet:
    torch.manual_seed(0)
    net = TiedBatchNormNet()
    net.train()
    for _ in range(3):
        net(torch.randn(8, 4))  # moves the running statistics, counts 3 batches
    return net.eval()


def test_safetensors_round_trip_keeps_values_dtypes_and_integer_buffers(tmp_path: Path) -> None:
    net = trained_net()
    state = net.state_dict()
    assert state["encode.weight"].data_ptr() == state["decode.weight"].data_ptr()
    assert not state["view"].is_contiguous()
    save_run(tmp_path / "run", state, {"epsilon": 1.0})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "model.safetensors",
        "privacy_report.json",
    ]
    saved = read_run(tmp_path / "run")
    assert saved.state_dict.keys() == state.keys()
    for name, value in state.items():
        assert saved.state_dict[name].dtype == value.dtype, name
        assert torch.equal(saved.state_dict[name], value), name
    assert saved.state_dict["norm.num_batches_tracked"].dtype == torch.int64
    assert saved.state_dict["norm.num_batches_tracked"].item() == 3
    restored = saved.into(TiedBatchNormNet().eval())
    x = torch.randn(5, 4)
    assert torch.equal(restored(x), net(x))


def test_load_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_run(tmp_path / "run", trained_net().state_dict(), {"epsilon": 1.0}, diagnostics={})

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    saved = read_run(tmp_path / "run")
    assert saved.report == {"epsilon": 1.0} and saved.diagnostics == {}
    assert saved.state_dict["norm.num_batches_tracked"].item() == 3


def test_a_run_saved_as_model_pt_is_still_read(tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    run.mkdir()
    state = trained_net().state_dict()
    torch.save(state, run / LEGACY_MODEL_FILE)
    (run / "privacy_report.json").write_text(json.dumps({"epsilon": 2.0}))
    saved = read_run(run)
    assert saved.report == {"epsilon": 2.0}
    assert all(torch.equal(saved.state_dict[k], v) for k, v in state.items())


def test_bad_model_files_and_state_dicts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a tensor"):
        save_run(tmp_path / "run", {"w": torch.ones(1), "step": 3}, {})
    assert list(tmp_path.iterdir()) == []
    save_run(tmp_path / "run", {"w": torch.ones(2)}, {})
    (tmp_path / "run" / MODEL_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        read_run(tmp_path / "run")
    (tmp_path / "run" / MODEL_FILE).unlink()
    with pytest.raises(DataError, match="does not hold"):
        read_run(tmp_path / "run")


def test_state_dict_bytes_keep_metadata(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    qem.io.write_atomically(path, state_dict_bytes({"w": torch.arange(3)}, {"digest": "abc"}))
    tensors, metadata = read_state_dict(path)
    assert torch.equal(tensors["w"], torch.arange(3)) and metadata["digest"] == "abc"


@pytest.mark.parametrize("target", ["/proc/qem-run", "/sys/qem-run"])
def test_an_output_path_on_a_file_system_that_refuses_writes_fails_before_the_run(target):
    """/proc and /sys pass a permission check but refuse a new directory: the output check
    creates and removes one where the run will go, before any private data is read."""
    if not Path(target).parent.is_dir():
        pytest.skip(f"no {Path(target).parent} here")
    with pytest.raises(OutputExistsError, match="writable file system"):
        qem.io.check_output_path(target)
