"""The releases of a cell, saved as soon as each method returns, so that a failure afterwards
loses none and a rerun loads them instead of drawing new noise on the private data.

Grid point i of a cell goes to ``cells/<key>.partial/point<i>.json`` (key, fingerprint,
hyperparameters, seconds, noise seed) and ``cells/<key>.partial/point<i>/``
(``model.safetensors`` and ``privacy_report.json``, by :func:`qem.io.save_run`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qem.errors import OutputExistsError
from qem.experiments.records import jsonable
from qem.io import read_run, save_run
from qem.jsonfiles import read_json, write_json_atomic

if TYPE_CHECKING:
    from qem.experiments.cells import Cell


@dataclass(frozen=True)
class Release:
    """What one grid point released: the model and its report, the seconds the method took and
    the noise seed it was given (None: operating-system entropy)."""

    model: nn.Module
    report: dict[str, Any]
    seconds: float
    noise_seed: int | None
    diagnostics: dict[str, Any] | None = None


class CellFailedError(RuntimeError):
    """A cell failed after some of its releases were saved; ``saved`` is their directory."""

    def __init__(self, message: str, saved: Path) -> None:
        super().__init__(message)
        self.saved = saved


class SavedReleases:
    """The releases of one cell on disk, so that a failure after a method returned loses none:
    grid point i is ``point<i>.json`` (its key, fingerprint, hyperparameters, seconds and noise
    seed; written first) and ``point<i>/`` (model and report, :func:`qem.io.save_run`)."""

    def __init__(self, directory: Path, cell: Cell) -> None:
        self.directory = directory
        self.cell = cell
        self.points: list[int] = []
        """The grid points saved or loaded so far."""

    def save(self, index: int, point: dict[str, Any], release: Release) -> None:
        """Write grid point ``index``'s release, each file atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {**self._identity(point, release.noise_seed), "seconds": release.seconds}
        write_json_atomic(self._record(index), record)
        save_run(
            self._run(index),
            release.model.state_dict(),
            jsonable(release.report),
            diagnostics=release.diagnostics,
        )
        self.points.append(index)

    def load(
        self, index: int, point: dict[str, Any], noise_seed: int | None, pretrained: nn.Module
    ) -> Release | None:
        """The release an earlier run saved for grid point ``index`` (None if there is none);
        OutputExistsError if it was computed for another configuration or noise seed."""
        run = self._run(index)
        if not run.is_dir():
            return None
        record = read_json(self._record(index)) if self._record(index).is_file() else {}
        expected = self._identity(point, noise_seed)
        if {key: record.get(key) for key in expected} != expected:
            raise OutputExistsError(
                f"{run} holds a release of another configuration or noise seed than grid point "
                f"{index} of {self.cell.key}; move it away, or delete it to recompute (which "
                "spends that release's privacy budget again)."
            )
        stored = read_run(run)
        model = stored.into(copy.deepcopy(pretrained))
        self.points.append(index)
        return Release(model, stored.report, record["seconds"], noise_seed, stored.diagnostics)

    def _identity(self, point: dict[str, Any], noise_seed: int | None) -> dict[str, Any]:
        return jsonable(
            {
                "key": self.cell.key,
                "fingerprint": self.cell.fingerprint,
                "hyperparameters": point,
                "noise_seed": noise_seed,
            }
        )

    def _record(self, index: int) -> Path:
        return self.directory / f"point{index}.json"

    def _run(self, index: int) -> Path:
        return self.directory / f"point{index}"


@contextmanager
def naming_saved_releases(saved: SavedReleases) -> Iterator[None]:
    """Turn a failure after a release was saved into a CellFailedError that says where."""
    try:
        yield
    except Exception as error:
        if not saved.points:
            raise
        raise CellFailedError(
            f"cell {saved.cell.key} failed ({type(error).__name__}: {error}); its releases so "
            f"far are saved in {saved.directory}, and rerunning the sweep resumes from them "
            "without drawing new noise.",
            saved.directory,
        ) from error
