"""Files shipped inside installed Python distributions (pretrained weights, corpora), located
without importing the distribution and without any network access.

A distribution's files are found through its metadata (``importlib.metadata``), which knows
where it was installed; nothing is downloaded, so a missing distribution is a clear error naming
the package to install.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from qem.errors import DataError


def packaged_path(distribution: str, relative: str | Path, what: str, version: str) -> Path:
    """The path of ``relative`` (a file or directory) inside the installed ``distribution``.

    ``what`` names the content for the error message, ``version`` the release the caller was
    written for (the one to install). DataError when the distribution is not installed or does
    not hold ``relative``.
    """
    install = f"pip install {distribution}=={version}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"{what} is read from the package {distribution!r}, which is not installed; "
            f"install it ({install}, or qem's extra 'text'). qem never downloads it."
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise DataError(
            f"the installed {distribution!r} {dist.version} has no {relative} ({what}); "
            f"reinstall it ({install})."
        )
    return path
