"""Cell records on disk: strict JSON written atomically, read back, and values made JSON-able."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qem.io import write_atomically


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (no NaN) to ``path`` with :func:`qem.io.write_atomically`:
    readers see the old file or the whole new one; serialised first, so an object JSON cannot
    hold leaves nothing behind."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    write_atomically(path, (text + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record written by :func:`write_json_atomic`."""
    return json.loads(path.read_text())


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/torch scalars and arrays become numbers and lists, non-finite
    floats become null (strict JSON has no NaN), anything else its ``str``."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
