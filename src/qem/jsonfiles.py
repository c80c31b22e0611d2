"""Strict JSON and atomic files: the one writer every qem output goes through, and the one
reader of the JSON files qem wrote. Needs neither torch nor numpy, so that the command line
can check and write files before importing either.

Strict JSON: NaN and infinity are refused (they are not JSON), keys are sorted, two-space
indent. Atomic: a reader, or the disk after a crash, sees the old file or the whole new one
(docs/theory.md §14).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from qem.errors import DataError


def json_text(obj: Any) -> str:
    """``obj`` as strict JSON text (raises ValueError on NaN or infinity)."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (:func:`json_text`, newline-terminated) to ``path`` with
    :func:`write_atomically`."""
    write_atomically(path, (json_text(obj) + "\n").encode())


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
    fsync_directory(path.parent)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the renames inside directory ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a file that cannot be read or is not strict JSON (NaN and
    infinity included, which qem never writes) raises DataError naming it and, for broken
    JSON, the line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        ) from None
    except ValueError as error:
        raise DataError(f"{path} is not strict JSON: {error}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which qem never writes")
