"""Writing and reading a fine-tuned model with its privacy report, atomically and together
(docs/theory.md §14), and the atomic file writer every qem output goes through.

The model is a safetensors file (``model.safetensors``: tensors and a JSON header, read back
without pickle); a run saved by an earlier qem holds ``model.pt`` instead, which
:func:`load` still reads with ``torch.load(weights_only=True)`` (tensors and containers only).

All files are written into a hidden staging directory beside the target, flushed and fsynced,
and the staging directory then takes the target's place: by ``rename`` when the target does not
exist, by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) when it does, so that at
every moment the target path holds either the old run or the new one, whole. Where the exchange
is unavailable, the old run is first moved to a hidden backup; a crash between the two renames
leaves that backup, which the next ``save_run`` or ``load`` of the same target restores. Stale
staging directories of dead writers are removed by the next save. The parent directory is
fsynced after every rename.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from qem.errors import DataError, OutputExistsError

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"
"""The model file of runs saved before qem wrote safetensors; :func:`load` still reads it."""
REPORT_FILE = "privacy_report.json"
DIAGNOSTICS_FILE = "diagnostics.json"
_STAGING, _BACKUP = "qem-staging", "qem-backup"


def check_output_path(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that ``save_run`` could not write, BEFORE any private data is
    read: an existing target without ``overwrite``, a symbolic link (dangling or not), a target
    that is not a directory, or a parent that is not a writable directory."""
    target = Path(directory)
    if target.is_symlink():
        raise OutputExistsError(
            f"{target} is a symbolic link; qem writes a run into a real directory (pass the "
            "link's destination, or another path)."
        )
    _recover(target)
    if target.exists():
        if not overwrite:
            raise OutputExistsError(
                f"{target} exists; choose another output directory or pass overwrite=True "
                "(--overwrite on the command line)."
            )
        if not target.is_dir():
            raise OutputExistsError(f"{target} exists and is not a directory.")
    parent = _existing_ancestor(target.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot create {target}: {parent} is not a writable directory.")
    return target


def save_run(
    directory: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    report: dict,
    *,
    diagnostics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` (a state dict), ``privacy_report.json`` and, when given,
    ``diagnostics.json`` into ``directory`` (see the module docstring).

    Raises OutputExistsError if ``directory`` exists and ``overwrite`` is False. On any failure
    the target holds the old run (or nothing, if there was none) and no staging is left.
    """
    target = check_output_path(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    files = {MODEL_FILE: state_dict_bytes(state_dict), REPORT_FILE: _json_bytes(report)}
    if diagnostics is not None:
        files[DIAGNOSTICS_FILE] = _json_bytes(diagnostics)
    staging = target.parent / f".{target.name}.{_STAGING}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, data in files.items():
            write_atomically(staging / name, data)
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@dataclass(frozen=True)
class SavedRun:
    """A fine-tuned state dict, its privacy report (a dict; ``qem.report.PrivacyReport.
    from_dict`` types it) and its diagnostics, as read back by :func:`load`."""

    state_dict: dict
    report: dict
    diagnostics: dict | None = None

    def into(self, model: nn.Module) -> nn.Module:
        """Load the fine-tuned weights into ``model`` (same architecture) and return it."""
        model.load_state_dict(self.state_dict)
        return model


def load(directory: str | os.PathLike) -> SavedRun:
    """Read back what :func:`save_run` wrote (restoring an interrupted overwrite first). The
    model is read from ``model.safetensors`` without pickle, or from the ``model.pt`` of a run
    saved before qem wrote safetensors by ``torch.load(weights_only=True)``."""
    source = Path(directory)
    _recover(source)
    model_path, report_path = source / MODEL_FILE, source / REPORT_FILE
    legacy_path = source / LEGACY_MODEL_FILE
    if not ((model_path.is_file() or legacy_path.is_file()) and report_path.is_file()):
        raise DataError(f"{source} does not hold {MODEL_FILE} and {REPORT_FILE}.")
    if model_path.is_file():
        state, _ = read_state_dict(model_path)
    else:
        state = torch.load(legacy_path, map_location="cpu", weights_only=True)
    report = json.loads(report_path.read_text())
    diagnostics_path = source / DIAGNOSTICS_FILE
    diagnostics = json.loads(diagnostics_path.read_text()) if diagnostics_path.is_file() else None
    return SavedRun(state_dict=state, report=report, diagnostics=diagnostics)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader, or the disk after a crash, holds the old
    file or the whole new one: ``data`` goes to a temporary sibling (``.<name>.<random>.tmp``,
    created exclusively), is flushed and fsynced, replaces ``path`` by ``os.replace``, and the
    parent directory is fsynced so the rename itself is durable. On any failure the temporary
    is removed and ``path`` is untouched."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def state_dict_bytes(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors file of ``state_dict`` (with string ``metadata`` in its header). Each
    tensor is detached, moved to the CPU and copied into storage of its own in contiguous
    layout, because safetensors refuses tensors that share storage (tied weights) or are
    strided views; integer and boolean buffers keep their dtype."""
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; a qem "
                "model file (safetensors) holds tensors only."
            )
        tensors[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return safetensors.torch.save(tensors, metadata={"format": "pt", **(metadata or {})})


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the header metadata of the safetensors file ``path``; a
    file that is not one raises DataError. Nothing is unpickled."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except safetensors.SafetensorError as error:
        raise DataError(f"{path} is not a readable safetensors file: {error}") from error
    return tensors, metadata


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _backup_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{_BACKUP}"


def _install(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``: never a moment without a whole run there."""
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # now the old run
    else:
        backup = _backup_path(target)
        os.rename(target, backup)
        _fsync_directory(target.parent)
        os.rename(staging, target)
        _fsync_directory(target.parent)
        shutil.rmtree(backup)
    _fsync_directory(target.parent)


def _recover(target: Path) -> None:
    """Restore the backup of an overwrite interrupted between its two renames."""
    backup = _backup_path(target)
    if backup.is_dir() and not target.exists():
        os.rename(backup, target)
        _fsync_directory(target.parent)
    elif backup.is_dir():
        shutil.rmtree(backup)  # the new run was installed; the old one is no longer needed


def _remove_stale(target: Path) -> None:
    """Remove staging directories of writers that are no longer running."""
    for stale in target.parent.glob(f".{target.name}.{_STAGING}.*"):
        pid = stale.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    return result == 0
