"""Writing and reading a fine-tuned model with its privacy report, atomically and together
(DESIGN.md §4): both files are written into a temporary sibling directory, flushed, and the
directory is renamed into place, so a reader never sees one file without the other."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qem.errors import DataError, OutputExistsError

MODEL_FILE = "model.pt"
REPORT_FILE = "privacy_report.json"


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_run(
    directory: str | os.PathLike, state_dict: dict, report: dict, overwrite: bool = False
) -> Path:
    """Write ``model.pt`` (a state dict) and ``privacy_report.json`` into ``directory``.

    Raises OutputExistsError if ``directory`` exists and ``overwrite`` is False. On any failure
    nothing is left behind and an existing directory is untouched.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} exists; choose another output directory or pass overwrite=True "
            "(--overwrite on the command line)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        report_bytes = json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode()
        _write_file(staging / MODEL_FILE, lambda h: torch.save(state_dict, h))
        _write_file(staging / REPORT_FILE, lambda h: h.write(report_bytes))
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, backup / target.name)
            os.replace(staging, target)
            shutil.rmtree(backup)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@dataclass(frozen=True)
class SavedRun:
    """A fine-tuned state dict and its privacy report, as read back by :func:`load`."""

    state_dict: dict
    report: dict

    def into(self, model: nn.Module) -> nn.Module:
        """Load the fine-tuned weights into ``model`` (same architecture) and return it."""
        model.load_state_dict(self.state_dict)
        return model


def load(directory: str | os.PathLike) -> SavedRun:
    """Read back what :func:`save_run` wrote."""
    source = Path(directory)
    model_path, report_path = source / MODEL_FILE, source / REPORT_FILE
    if not (model_path.is_file() and report_path.is_file()):
        raise DataError(f"{source} does not hold {MODEL_FILE} and {REPORT_FILE}.")
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    report = json.loads(report_path.read_text())
    return SavedRun(state_dict=state, report=report)
