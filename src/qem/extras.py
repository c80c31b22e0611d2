"""Optional dependencies: the packages of qem's extras are imported where they are used, so
that the core (``qem.privacy``, ``qem.mechanism``, ``qem.fine_tune``) installs and imports
without them.

Extras (``pip install 'qem[NAME]'``): ``baselines`` (Opacus, for the DP-SGD baseline),
``mimic`` (pandas and PyTables, for the MIMIC-Extract loader and its synthetic file), ``bench``
(matplotlib, for the plots of an experiment report), ``text`` (transformers and the packages
shipping all-MiniLM-L6-v2 and the tweet corpus, for the text scenario); ``test`` installs all of
them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qem.errors import MissingExtraError


def missing_extra(error: ImportError, extra: str, needed_for: str) -> MissingExtraError:
    """The error to raise when an import for ``needed_for`` failed with ``error``: it names
    the package and ``pip install 'qem[extra]'``."""
    package = (error.name or "a package").split(".")[0]
    return MissingExtraError(
        f"{needed_for} needs {package}, which cannot be imported ({error}); install qem's "
        f"optional extra {extra!r}: pip install 'qem[{extra}]'"
    )


def import_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    """``importlib.import_module(module)``, or the :func:`missing_extra` error."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(error, extra, needed_for) from error
