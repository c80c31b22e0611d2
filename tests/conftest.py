"""Set-up shared by every test: pretrained-model caches go to a temporary directory, never to
the user cache directory (qem.pretrain.default_cache_dir reads $QEM_CACHE_DIR first); and each
pytest worker runs torch on one thread (``make test`` runs two workers on two cores: two threads
each made the suite about 35% slower by contention)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from qem.pretrain import CACHE_DIR_VARIABLE

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("qem-cache")))
        yield
