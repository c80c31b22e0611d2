"""Open a pandas HDF5 file without running code the file brings.

PyTables calls ``pickle.loads`` on file contents in two places, whatever the caller reads:

* ``tables.attributeset``: every node attribute stored as bytes ending in ``"."`` is unpickled
  when the node's attribute set is first touched, and attribute sets are read eagerly (opening
  a file reads the root's; ``HDFStore.keys()`` reads every group's). pandas' table format keeps
  its metadata (column lists, index names) in such pickled attributes.
* ``tables.atom.ObjectAtom``: every row of an object ``VLArray`` is a pickle. pandas' fixed
  format stores object and string columns this way (pandas 3.1 with tables 3.11 included).

A crafted file can therefore run code on open, before any schema check. :func:`open_hdf_store`
points the ``pickle`` name of exactly those two PyTables modules at
:func:`qem.datasets.safe_pickle.loads_arrays` while the store is open, so the only objects a
pickle in the file can rebuild are numpy arrays and plain values (str, numbers, None, lists,
dicts); anything else is refused. A refused attribute is left as raw bytes by PyTables (it
catches the error); a refused object column raises DataError. While a store is open the
restriction holds for every PyTables reader in the process (a lock serialises these stores).
"""

from __future__ import annotations

import pickle
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qem.extras import missing_extra

try:
    import pandas as pd
    import tables
    import tables.atom
    import tables.attributeset
except ImportError as error:
    raise missing_extra(error, "mimic", "reading pandas HDF5 files") from error

from qem.datasets.safe_pickle import loads_arrays
from qem.errors import DataError

__all__ = ["open_hdf_store"]

_UNPICKLING_MODULES = (tables.attributeset, tables.atom)
_RESTRICTED_PICKLE = types.SimpleNamespace(
    loads=loads_arrays,
    dumps=pickle.dumps,
    HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL,
    UnpicklingError=pickle.UnpicklingError,
)
_LOCK = threading.RLock()


@contextmanager
def open_hdf_store(path: str | Path) -> Iterator[pd.HDFStore]:
    """``pd.HDFStore(path, mode="r")`` whose PyTables unpickles only numpy arrays and plain
    values. Raises DataError when the file is not HDF5 or when it holds a pickle of anything
    else."""
    with _LOCK, _restricted_unpickling():
        try:
            store = pd.HDFStore(path, mode="r")
        except (tables.HDF5ExtError, OSError):
            raise DataError(f"{path} is not a readable HDF5 file.") from None
        try:
            with store:
                yield store
        except pickle.UnpicklingError as error:
            raise DataError(
                f"{path} holds a pickled object qem will not load ({error}); store string "
                "columns as pandas writes them (plain str), nothing else."
            ) from None


@contextmanager
def _restricted_unpickling() -> Iterator[None]:
    """Swap the ``pickle`` module of PyTables' unpickling modules for the restricted one."""
    previous = [module.pickle for module in _UNPICKLING_MODULES]
    if any(old is not pickle and old is not _RESTRICTED_PICKLE for old in previous):
        raise DataError(
            "this PyTables version does not unpickle through tables.attributeset.pickle and "
            "tables.atom.pickle, so qem cannot read HDF5 files from it safely."
        )
    for module in _UNPICKLING_MODULES:
        module.pickle = _RESTRICTED_PICKLE
    try:
        yield
    finally:
        for module, old in zip(_UNPICKLING_MODULES, previous, strict=True):
            module.pickle = old
