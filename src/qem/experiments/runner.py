"""Run a privacy-utility sweep (the evaluation protocol of README.md and docs/results.md): every
scenario x method x epsilon x seed is one *cell* (:mod:`qem.experiments.cells`), written as one
JSON file, so an interrupted sweep resumes where it stopped.

Per scenario the data is built once and the model is pretrained once on the PUBLIC training
split (cached on disk by :func:`qem.pretrain.cached_pretrain`); every method starts from a copy
of that same pretrained model. Each cell tunes its method on the PUBLIC validation split and
scores the chosen model on the test split (:func:`qem.experiments.cells.run_cell`).
Caution: each grid point is a separate release computed on the private data, so in reality
this tuning spends privacy (by composition, up to |grid| times the cell's budget); the cell
records what its grid spent together. Only tuning that touches public data alone is free.

Methods in ``Registry.budget_free`` ("nonprivate" fine-tuning, "none" = the pretrained model)
spend no budget: they run once per seed with ``epsilon=None`` (JSON null).

With the config's ``tuning`` spec the grids run once per tuning epsilon instead, in tuning
cells (``tuning/<key>.json``, run before the scenario's cells), and each cell runs the choice
that serves its epsilon (:mod:`qem.experiments.cells`); a cell whose tuning cell has since
chosen otherwise is refused on resume, like a changed configuration.

Layout of ``out_dir``: ``config.json`` (the validated config), ``cells/<key>.json`` (one per
cell, written atomically by :func:`qem.io.write_atomically`), ``tuning/<key>.json`` (tuning
cells, if any) and ``results.json`` (a list of
``{scenario, method, epsilon, seed, metric, seconds}``, seconds = the chosen configuration's
fine-tuning time). A cell's releases are saved in ``cells/<key>.partial/`` as soon as its
method returns (:mod:`qem.experiments.releases`) and deleted once the cell's JSON is written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from qem.errors import OutputExistsError
from qem.experiments.cells import (
    Cell,
    chosen_point,
    plan_cells,
    plan_tuning_cells,
    run_cell,
    tuning_cell_for,
)
from qem.experiments.config import ExperimentConfig, ScenarioSpec, load_config, parse_config
from qem.experiments.registry import Registry, check_registry, default_registry
from qem.jsonfiles import read_json, write_json_atomic
from qem.losses import LOSSES, LossFn
from qem.progress import progress_bar

CELLS_DIR = "cells"
TUNING_DIR = "tuning"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
PARTIAL_SUFFIX = ".partial"


def run_experiment(
    config: ExperimentConfig | dict | str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    registry: Registry | None = None,
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished cell of ``config`` into ``out_dir`` and write ``results.json``.

    ``config`` is an ExperimentConfig, its JSON dict, or a path to a JSON file. Finished cells
    are skipped; one computed under a different configuration of its scenario or method, or
    with the other ``reproducible`` setting, raises OutputExistsError. ``cache_dir`` holds
    pretrained models (default: :func:`qem.pretrain.default_cache_dir`, the user cache
    directory). Returns the rows of ``results.json``. A cell
    that fails after a release was saved raises CellFailedError (qem.experiments.releases).
    """
    if not isinstance(config, ExperimentConfig):
        config = parse_config(config) if isinstance(config, dict) else load_config(config)
    registry = registry if registry is not None else default_registry()
    check_registry(config, registry)
    out = Path(out_dir)
    cells_dir, tuning_dir = out / CELLS_DIR, out / TUNING_DIR
    cells_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CONFIG_FILE, config.to_dict())
    loss_fn = LOSSES[config.loss]
    cells = plan_cells(config, registry.budget_free)
    tuning_cells = plan_tuning_cells(config, registry.budget_free)
    if tuning_cells:
        tuning_dir.mkdir(exist_ok=True)
    pending_tuning = [c for c in tuning_cells if not _finished(c, tuning_dir, config.reproducible)]

    def pending(spec: ScenarioSpec) -> list[Cell]:
        return [
            cell
            for cell in cells
            if cell.scenario is spec
            and not _finished(cell, cells_dir, config.reproducible, _choice(cell, config, out))
        ]

    total = len(cells) + len(tuning_cells)
    done = len(tuning_cells) - len(pending_tuning)
    done += sum((cells_dir / f"{cell.key}.json").exists() for cell in cells)
    bar = progress_bar(total=total, initial=done, desc=config.name, enabled=progress, leave=True)
    with bar:
        for spec in config.scenarios:
            tuning_todo = [cell for cell in pending_tuning if cell.scenario is spec]
            if not tuning_todo and not pending(spec):
                continue
            scenario = registry.scenarios[spec.name](**spec.options)
            pretrained = registry.pretrainer(scenario, spec, config, loss_fn, cache_dir, progress)
            loaded = _Loaded(scenario, pretrained, registry, config, loss_fn, progress)
            for cell in tuning_todo:
                bar.set_postfix_str(cell.key, refresh=True)
                loaded.run(cell, tuning_dir, None)
                bar.update()
            for cell in pending(spec):  # after tuning: each cell's choice is known now
                bar.set_postfix_str(cell.key, refresh=True)
                loaded.run(cell, cells_dir, _choice(cell, config, out))
                bar.update()
    results = [result_row(read_json(cells_dir / f"{cell.key}.json")) for cell in cells]
    write_json_atomic(out / RESULTS_FILE, results)
    return results


@dataclass(frozen=True)
class _Loaded:
    """A scenario's data and pretrained model, with what running its cells needs."""

    scenario: Any
    pretrained: nn.Module
    registry: Registry
    config: ExperimentConfig
    loss_fn: LossFn
    progress: bool

    def run(self, cell: Cell, directory: Path, tuning: dict[str, Any] | None) -> None:
        """Run ``cell`` (served by the tuning record ``tuning``, if any) into ``directory``:
        its record atomically, then its saved releases removed."""
        partial = directory / f"{cell.key}{PARTIAL_SUFFIX}"
        record = run_cell(
            cell,
            self.registry.methods[cell.method.name],
            self.scenario,
            self.pretrained,
            self.config,
            self.loss_fn,
            partial,
            self.progress,
            tuning,
        )
        write_json_atomic(directory / f"{cell.key}.json", record)
        shutil.rmtree(partial, ignore_errors=True)


def _choice(cell: Cell, config: ExperimentConfig, out: Path) -> dict[str, Any] | None:
    """The record of the tuning cell that serves ``cell`` (None: the cell tunes itself, or
    needs no tuning, or its tuning cell has not run yet)."""
    tuning = tuning_cell_for(cell, config)
    if tuning is None:
        return None
    path = out / TUNING_DIR / f"{tuning.key}.json"
    return read_json(path) if path.exists() else None


def _finished(
    cell: Cell, cells_dir: Path, reproducible: bool, tuning: dict[str, Any] | None = None
) -> bool:
    """Whether ``cell`` has a record in ``cells_dir`` that this run may keep; OutputExistsError
    for one of another configuration, noise setting or (given the serving tuning cell's record
    ``tuning``) another tuning choice."""
    path = cells_dir / f"{cell.key}.json"
    if not path.exists():
        return False
    record = read_json(path)
    if record.get("fingerprint") != cell.fingerprint:
        raise OutputExistsError(
            f"{path} was computed under a different configuration of scenario "
            f"{cell.scenario.label!r} or method {cell.method.label!r}; use another output "
            "directory, or delete that file to recompute it."
        )
    if "reproducible" not in record:
        raise OutputExistsError(
            f"{path} was computed before cells recorded how their noise was seeded (then by the "
            "cell's seed); use another output directory, or delete it to recompute it."
        )
    if record["reproducible"] != reproducible:
        raise OutputExistsError(
            f"{path} was computed with reproducible = {record['reproducible']}, this run has "
            f"{reproducible}; a sweep's cells all draw their noise one way: resume it as it was "
            "started (with or without --reproducible), or use another output directory."
        )
    if tuning is not None:
        ran = (record.get("tuning") or {}).get("hyperparameters")
        if ran != chosen_point(cell.method, tuning):
            raise OutputExistsError(
                f"{path} ran the tuning choice {ran}, but its tuning cell {tuning['key']} now "
                f"chose {chosen_point(cell.method, tuning)} (it was recomputed); use another "
                "output directory, or delete the cells it serves to recompute them."
            )
    return True


def result_row(record: dict[str, Any]) -> dict[str, Any]:
    """One row of ``results.json``."""
    return {
        "scenario": record["scenario"],
        "method": record["method"],
        "epsilon": record["epsilon"],
        "seed": record["seed"],
        "metric": record["metric"],
        "seconds": record["seconds"]["fine_tune"],
    }
