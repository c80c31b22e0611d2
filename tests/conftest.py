"""Set-up shared by every test: pretrained-model caches go to a temporary directory, never to
the user cache directory (qem.pretrain.default_cache_dir reads $QEM_CACHE_DIR first); and each
pytest worker runs torch on ``$QEM_TEST_THREADS`` threads, 1 unless set (``make test`` runs two
workers on two cores: two threads each made the suite about 35% slower by contention).
``QEM_TEST_THREADS=default`` leaves torch's own default (one thread per core): the suite must
pass either way, since a float32 kernel may split its work, and so round, differently with the
thread count (tests compare float32 results with tolerances derived from float32 rounding)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from qem.pretrain import CACHE_DIR_VARIABLE

THREADS_VARIABLE = "QEM_TEST_THREADS"


def suite_threads(value: str | None) -> int | None:
    """Torch threads for the suite from $QEM_TEST_THREADS: unset -> 1, "default" -> None
    (torch's default), else a positive integer."""
    if value is None or value == "":
        return 1
    if value == "default":
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_VARIABLE} must be a positive integer or 'default'.")
    return int(value)


THREADS = suite_threads(os.environ.get(THREADS_VARIABLE))
if THREADS is not None:
    torch.set_num_threads(THREADS)


def pytest_report_header() -> str:
    return f"torch threads: {torch.get_num_threads()} ({THREADS_VARIABLE}; cpu capability " + (
        f"{torch.backends.cpu.get_cpu_capability()})"
    )


@pytest.fixture(autouse=True, scope="session")
def isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("qem-cache")))
        yield
