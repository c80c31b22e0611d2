"""Writing and reading a fine-tuned model with its privacy report, atomically and together
(docs/theory.md §14). Importing this module loads neither torch nor safetensors (the command
line checks an output path before it imports them); files are written by qem.jsonfiles.

The model is a safetensors file (``model.safetensors``: tensors and a JSON header, read back
without pickle); a run saved by an earlier qem holds ``model.pt`` instead, which
:func:`load` still reads with ``torch.load(weights_only=True)`` (tensors and containers only).

All files are written into a hidden staging directory beside the target, flushed and fsynced,
and the staging directory then takes the target's place: by ``rename`` when the target does not
exist, by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) when it does, so that at
every moment the target path holds either the old run or the new one, whole. Where the exchange
is unavailable, the old run is first moved to a hidden backup; a crash between the two renames
leaves that backup, which the next ``save_run`` or ``load`` of the same target restores. Stale
staging directories of dead writers (a save killed by ``kill -9``) are removed by the next save
or output-path check of the same target. The parent directory is fsynced after every rename.
``overwrite`` replaces only an empty directory or a qem run (a privacy report and nothing but
the files of RUN_FILES), so that it never deletes a file qem did not write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qem.errors import DataError, OutputExistsError
from qem.jsonfiles import fsync_directory, json_text, read_json, write_atomically
from qem.report import PrivacyReport

if TYPE_CHECKING:  # torch and safetensors are imported where a model file is read or written
    import torch
    from torch import nn

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"
"""The model file of runs saved before qem wrote safetensors; :func:`load` still reads it."""
REPORT_FILE = "privacy_report.json"
DIAGNOSTICS_FILE = "diagnostics.json"
PT2_FILE = "model.pt2"
"""The torch.export program ``qem finetune --export-pt2`` adds to a run."""
RUN_FILES = frozenset({MODEL_FILE, LEGACY_MODEL_FILE, REPORT_FILE, DIAGNOSTICS_FILE, PT2_FILE})
"""Everything a qem run directory may hold: ``overwrite`` replaces only such a directory."""
_STAGING, _BACKUP = "qem-staging", "qem-backup"


def check_output_path(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that ``save_run`` could not write, BEFORE any private data is
    read: an existing target without ``overwrite``, a symbolic link (dangling or not), an
    existing target that is not a qem run (``overwrite`` never deletes a user's files), or a
    parent that is not a writable directory. Removes stale staging directories of dead
    writers of the same target."""
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
                f"{target} exists; choose another output directory or pass overwrite=True to "
                "replace the run it holds."
            )
        _check_replaceable(target)
    parent = _existing_ancestor(target.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot create {target}: {parent} is not a writable directory.")
    _probe_writable(parent, target)
    _remove_stale(target)
    return target


def _probe_writable(parent: Path, target: Path) -> None:
    """Create and remove a directory where the run's staging directory will go: a permission
    check passes on /proc or /sys, where writing fails (the run would be lost after its draw)."""
    probe = parent / f".{target.name}.qem-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputExistsError(
            f"cannot write {target}: creating a directory in {parent} failed ({reason}); choose "
            "an output directory on a writable file system."
        ) from None


def _check_replaceable(target: Path) -> None:
    """Refuse to overwrite anything but an empty directory or a qem run (a privacy report and
    only files of RUN_FILES): overwriting deletes what the directory holds."""
    if not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a directory; qem will not replace it.")
    entries = sorted(entry.name for entry in target.iterdir())
    foreign = [name for name in entries if name not in RUN_FILES]
    if not foreign and (not entries or REPORT_FILE in entries):
        return
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        what = f"it holds {shown}, which qem did not write"
    else:
        what = f"it has no {REPORT_FILE}"
    raise OutputExistsError(
        f"{target} is not a qem run ({what}); overwriting it would delete those files. Choose "
        "another output directory."
    )


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

    Raises OutputExistsError if ``directory`` exists and ``overwrite`` is False, or if it is
    not a qem run. On any failure the target holds the old run (or nothing, if there was none)
    and no staging is left.
    """
    target = check_output_path(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: state_dict_bytes(state_dict), REPORT_FILE: json_text(report).encode()}
    if diagnostics is not None:
        files[DIAGNOSTICS_FILE] = json_text(diagnostics).encode()
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
class SavedFiles:
    """What :func:`save_run` wrote, as :func:`read_run` reads it back, with the report as its
    JSON object (the experiment runner saves the reports of other methods the same way)."""

    state_dict: dict[str, torch.Tensor]
    report: dict[str, Any]
    diagnostics: dict[str, Any] | None = None

    def into(self, model: nn.Module) -> nn.Module:
        """Load the fine-tuned weights into ``model`` (same architecture) and return it."""
        model.load_state_dict(self.state_dict)
        return model


@dataclass(frozen=True)
class SavedRun(SavedFiles):
    """A qem run as :func:`load` reads it back: the fine-tuned state dict, the typed privacy
    report (``run.report.epsilon``, ``run.report.partial``, ``run.report.spent_epsilon``) and
    the diagnostics (None when the run has none, or when diagnostics.json is unreadable: a
    warning then says so)."""

    report: PrivacyReport


def load(directory: str | os.PathLike) -> SavedRun:
    """Read back a qem run (:func:`read_run`) with its privacy report typed by
    :meth:`PrivacyReport.from_dict`; a report of another kind or schema raises DataError
    naming the file."""
    files = read_run(directory)
    try:
        report = PrivacyReport.from_dict(files.report)
    except DataError as error:
        raise DataError(f"{Path(directory) / REPORT_FILE}: {error}") from None
    return SavedRun(files.state_dict, report, files.diagnostics)


def read_run(directory: str | os.PathLike) -> SavedFiles:
    """Read back what :func:`save_run` wrote (restoring an interrupted overwrite first). The
    model is read from ``model.safetensors`` without pickle, or from the ``model.pt`` of a run
    saved before qem wrote safetensors by ``torch.load(weights_only=True)``. Every error names
    its file. An unreadable diagnostics.json warns and is left out: the model and its report
    do not depend on it."""
    source = Path(directory)
    _recover(source)
    model_path, report_path = source / MODEL_FILE, source / REPORT_FILE
    legacy_path = source / LEGACY_MODEL_FILE
    if not ((model_path.is_file() or legacy_path.is_file()) and report_path.is_file()):
        raise DataError(f"{source} does not hold {MODEL_FILE} and {REPORT_FILE}.")
    report = read_json(report_path)
    if not isinstance(report, dict):
        raise DataError(f"{report_path} holds a JSON {type(report).__name__}, not an object.")
    if model_path.is_file():
        state, _ = read_state_dict(model_path)
    else:
        state = _read_legacy_model(legacy_path)
    return SavedFiles(state, report, _read_diagnostics(source / DIAGNOSTICS_FILE))


def _read_legacy_model(path: Path) -> dict[str, torch.Tensor]:
    """A ``model.pt`` state dict, by ``torch.load(weights_only=True)``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load of arbitrary bytes fails in many ways
        raise DataError(f"{path} is not a readable model file: {error}") from None


def _read_diagnostics(path: Path) -> dict[str, Any] | None:
    """diagnostics.json, or None (with a warning naming the file when it is unreadable)."""
    if not path.is_file():
        return None
    try:
        diagnostics = read_json(path)
    except DataError as error:
        warnings.warn(f"{error} The run is loaded without its diagnostics.", stacklevel=4)
        return None
    if not isinstance(diagnostics, dict):
        warnings.warn(
            f"{path} holds a JSON {type(diagnostics).__name__}, not an object; the run is "
            "loaded without its diagnostics.",
            stacklevel=4,
        )
        return None
    return diagnostics


def state_dict_bytes(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors file of ``state_dict`` (with string ``metadata`` in its header). Each
    tensor is detached, moved to the CPU and copied into storage of its own in contiguous
    layout, because safetensors refuses tensors that share storage (tied weights) or are
    strided views; integer and boolean buffers keep their dtype."""
    import safetensors.torch
    import torch

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
    file that is not one raises DataError naming it. Nothing is unpickled."""
    import safetensors

    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (safetensors.SafetensorError, OSError) as error:
        raise DataError(f"{path} is not a readable safetensors file: {error}") from None
    return tensors, metadata


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
        fsync_directory(target.parent)
        os.rename(staging, target)
        fsync_directory(target.parent)
        shutil.rmtree(backup)
    fsync_directory(target.parent)


def _recover(target: Path) -> None:
    """Restore the backup of an overwrite interrupted between its two renames."""
    backup = _backup_path(target)
    if backup.is_dir() and not target.exists():
        os.rename(backup, target)
        fsync_directory(target.parent)
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
