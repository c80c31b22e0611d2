"""Unpickling that cannot run code: numpy arrays and plain Python values only.

A pickle runs code by naming a callable (opcodes GLOBAL, STACK_GLOBAL, INST and the extension
registry, all resolved by ``Unpickler.find_class``) and then calling it. :class:`ArrayUnpickler`
resolves only numpy's array reconstruction (``ndarray``, ``dtype``, ``_reconstruct``), so a
pickle can still rebuild str, bytes, numbers, None, lists, tuples, dicts and numpy arrays of
those, and nothing else. Used for the deeplearning.net MNIST pickle and for the pickles that
PyTables reads from HDF5 files (:mod:`qem.datasets.hdf5`).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

__all__ = ["ARRAY_GLOBALS", "ArrayUnpickler", "loads_arrays"]

ARRAY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain values; any other global is refused
    with ``pickle.UnpicklingError``."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def loads_arrays(data: bytes, **options: Any) -> object:
    """``pickle.loads`` through :class:`ArrayUnpickler` (same keyword options)."""
    return ArrayUnpickler(io.BytesIO(data), **options).load()
