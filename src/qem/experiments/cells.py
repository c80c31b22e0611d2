"""Cells of a sweep: one (scenario, method, epsilon, seed) each, planned from the config and run
by :func:`run_cell`.

A cell tunes its method over the grid: every grid point is run on the private training data
with the cell's budget (epsilon, delta) and scored on the PUBLIC validation split; the best
score wins (ties: the first point; a diverged run, NaN, ranks last). Every grid point and its
score are recorded. The noise comes from operating-system entropy (``seed=None``) unless the
config is ``reproducible``; then each grid point of each cell gets a seed of its own
(:meth:`Cell.noise_seed`), so that no two releases of a sweep share a noise draw. The chosen
configuration's model is then scored on the test split with the scenario's metric
(``scenario.metric``: accuracy, or AUROC for MIMIC) and its mean test loss.

With the config's ``tuning`` spec the grid is run in *tuning cells* instead (one per scenario,
method with a grid, and tuning epsilon, at the tuning seed; :func:`plan_tuning_cells`), and each
cell runs only the point chosen by the tuning cell that serves its epsilon
(:meth:`qem.experiments.config.TuningSpec.serving`). Such a cell records the choice, the tuning
grid's size, seconds and composed budget (``tuning``), and in ``budget_spent_by_tuning`` what
the tuning grid and its own release spent together: every grid point is a release on the same
private data, so the cell's epsilon is not the whole cost of its result (docs/theory.md §12).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import qem
from qem.errors import NonFiniteError
from qem.experiments.config import ExperimentConfig, MethodSpec, ScenarioSpec
from qem.experiments.memory import PeakMemory
from qem.experiments.records import jsonable
from qem.experiments.registry import BUDGET_FREE, Method
from qem.experiments.releases import Release, SavedReleases, naming_saved_releases
from qem.metrics import evaluate_loss, evaluate_metric
from qem.privacy.ledger import total_spent
from qem.report import report_as_dict
from qem.subspace.base import LossFn


@dataclass(frozen=True)
class Cell:
    """One (scenario, method, epsilon, seed); ``epsilon`` is None for budget-free methods."""

    scenario: ScenarioSpec
    method: MethodSpec
    epsilon: float | None
    seed: int
    fingerprint: str
    stage: str = "main"
    """"main" (a result) or "tuning" (a grid run whose choice serves main cells)."""

    @property
    def key(self) -> str:
        """File stem, e.g. ``mnist_s1__qem_T2__eps0.5__seed0``."""
        eps = "none" if self.epsilon is None else repr(self.epsilon)
        return f"{self.scenario.label}__{self.method.label}__eps{eps}__seed{self.seed}"

    def noise_seed(self, point: dict[str, Any]) -> int:
        """The noise seed of grid point ``point`` in a reproducible sweep: 63 bits of numpy's
        ``SeedSequence([seed, SHA-256 of (fingerprint, epsilon, point)])``. The fingerprint
        names the scenario and method, so every cell and grid point of a sweep has its own
        seed; a rerun of the same config gets the same ones. A tuning cell adds its stage, so
        that it never shares a draw with the main cell of the same epsilon and seed."""
        parts = [self.fingerprint, self.epsilon, point]
        parts += [] if self.stage == "main" else [self.stage]
        identity = json.dumps(parts, sort_keys=True)
        digest = int.from_bytes(hashlib.sha256(identity.encode()).digest(), "big")
        state = np.random.SeedSequence([self.seed, digest]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))


def plan_cells(config: ExperimentConfig, budget_free: frozenset[str] = BUDGET_FREE) -> list[Cell]:
    """All cells in run order: scenario, method, epsilon, seed; methods named in
    ``budget_free`` get one cell per seed, with epsilon None."""
    cells = []
    for scenario in config.scenarios:
        for method in config.methods:
            fingerprint = config.fingerprint(scenario, method)
            epsilons = (None,) if method.name in budget_free else config.epsilons
            cells += [
                Cell(scenario, method, epsilon, seed, fingerprint)
                for epsilon in epsilons
                for seed in config.seeds
            ]
    return cells


def plan_tuning_cells(
    config: ExperimentConfig, budget_free: frozenset[str] = BUDGET_FREE
) -> list[Cell]:
    """The tuning cells of a config with a ``tuning`` spec (none without one): scenario, method
    with more than one grid point (budget-free methods are never tuned on private data),
    tuning epsilon, at the tuning seed."""
    if config.tuning is None:
        return []
    return [
        Cell(scenario, method, epsilon, config.tuning.seed, config.fingerprint(scenario, method),
             stage="tuning")
        for scenario in config.scenarios
        for method in config.methods
        if method.name not in budget_free and len(method.grid_points()) > 1
        for epsilon in config.tuning.epsilons
    ]  # fmt: skip


def tuning_cell_for(cell: Cell, config: ExperimentConfig) -> Cell | None:
    """The tuning cell whose choice ``cell`` runs (None: the cell tunes, or needs no tuning)."""
    if config.tuning is None or cell.epsilon is None or len(cell.method.grid_points()) < 2:
        return None
    epsilon = config.tuning.serving(cell.epsilon)
    return Cell(cell.scenario, cell.method, epsilon, config.tuning.seed, cell.fingerprint, "tuning")


def chosen_point(method: MethodSpec, tuning_record: dict[str, Any]) -> dict[str, Any]:
    """The grid point a tuning cell's record chose (its hyperparameters on the grid's keys)."""
    chosen = tuning_record["hyperparameters"]  # fixed values and the point; never both
    return {key: chosen[key] for key in method.grid_keys() if key in chosen}


def run_cell(
    cell: Cell,
    method: Method,
    scenario: Any,
    pretrained: nn.Module,
    config: ExperimentConfig,
    loss_fn: LossFn,
    partial_dir: str | os.PathLike,
    progress: bool = False,
    tuning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tune ``method`` on the public validation split over the cell's grid (or, given the
    record of the tuning cell that serves it, run that cell's choice only), then score the
    chosen model on the test split; returns the cell's JSON record. Each release is saved in
    ``partial_dir`` as soon as the method returns (releases saved there by an earlier run are
    loaded instead of recomputed); a later failure raises CellFailedError naming it."""
    start = time.perf_counter()
    saved = SavedReleases(Path(partial_dir), cell)
    grid_scores: list[dict[str, Any]] = []
    releases: list[Release] = []
    best: tuple[Release, float, dict[str, Any]] | None = None
    points = [chosen_point(cell.method, tuning)] if tuning else cell.method.grid_points()
    with PeakMemory() as memory, naming_saved_releases(saved):
        for index, point in enumerate(points):
            hyperparameters = {**cell.method.fixed, **point}
            noise_seed = cell.noise_seed(point) if config.reproducible else None
            release = saved.load(index, point, noise_seed, pretrained)
            if release is None:
                _seed_torch(noise_seed)
                tic = time.perf_counter()
                output = method(
                    copy.deepcopy(pretrained),
                    loss_fn,
                    scenario.public_train,
                    scenario.private_train,
                    epsilon=cell.epsilon,
                    delta=config.delta,
                    adjacency=config.adjacency,
                    validation_data=scenario.public_valid,
                    seed=noise_seed,
                    progress=progress,
                    **hyperparameters,
                )
                seconds = time.perf_counter() - tic
                release = Release(
                    output.model,
                    report_as_dict(output.report),
                    seconds,
                    noise_seed,
                    _diagnostics(output),
                )
                saved.save(index, point, release)
            releases.append(release)
            score = _score(release.model, scenario.public_valid, scenario.metric)
            grid_scores.append(
                {
                    "hyperparameters": point,
                    "valid_metric": score,
                    "seconds": release.seconds,
                    "noise_seed": release.noise_seed,
                }
            )
            if best is None or _rank(score) > _rank(best[1]):
                best = (release, score, hyperparameters)
        assert best is not None  # grid_points() is never empty
        result, valid_metric, hyperparameters = best
        tic = time.perf_counter()
        metric = _score(result.model, scenario.test, scenario.metric)
        loss = evaluate_loss(result.model, loss_fn, scenario.test)
        evaluate_seconds = time.perf_counter() - tic
    accounts = [_account(release.report) for release in releases]
    spent = _tuning_budget(accounts + (tuning or {}).get("grid_accounts", []), config.delta)
    return jsonable(
        {
            "key": cell.key,
            "scenario": cell.scenario.label,
            "scenario_name": cell.scenario.name,
            "method": cell.method.label,
            "method_name": cell.method.name,
            "epsilon": cell.epsilon,
            "delta": None if cell.epsilon is None else config.delta,
            "seed": cell.seed,
            "stage": cell.stage,
            "reproducible": config.reproducible,
            "noise_seed": result.noise_seed,
            "metric": metric,
            "metric_name": scenario.metric,
            "test_class_counts": _class_counts(scenario.test),
            "loss": loss,
            "valid_metric": valid_metric,
            "seconds": {
                "tuning": sum(entry["seconds"] for entry in grid_scores),
                "fine_tune": result.seconds,
                "evaluate": evaluate_seconds,
                "total": time.perf_counter() - start,
            },
            **memory.as_dict(),
            "hyperparameters": hyperparameters,
            "grid_scores": grid_scores,
            "report": result.report,
            "diagnostics": result.diagnostics,
            "grid_accounts": accounts,
            "budget_spent_by_tuning": spent,
            **({"tuning": _tuning_summary(tuning, cell)} if tuning else {}),
            "synthetic": bool(getattr(scenario, "synthetic", False)),
            "fingerprint": cell.fingerprint,
            "qem_version": qem.__version__,
        }
    )


def _class_counts(data: Any) -> list[int] | None:
    """How many test examples each class has (for the standard error of the test metric);
    None when the targets are not a tensor of class indices."""
    targets = data[1] if isinstance(data, tuple | list) and len(data) == 2 else None
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.ndim != 1:
        return None
    if len(targets) == 0 or targets.min() < 0:
        return None
    return torch.bincount(targets).tolist()


def _diagnostics(output: Any) -> dict[str, Any] | None:
    """A method's diagnostics (not publishable: timings) as a dict, if it has any."""
    diagnostics = getattr(output, "diagnostics", None)
    return diagnostics.to_dict() if hasattr(diagnostics, "to_dict") else diagnostics


def _account(report: dict[str, Any]) -> dict[str, Any]:
    """What a release spent, as :func:`qem.privacy.ledger.total_spent` reads it: its target
    epsilon and its accountant block (the DpEvent and neighbouring relation; public)."""
    return {"epsilon": report.get("epsilon"), "accountant": report.get("accountant")}


def _tuning_budget(accounts: list[dict[str, Any]], delta: float) -> dict[str, Any]:
    """What a list of releases spent together (composed by dp-accounting's PLD accountant):
    every grid point is a release on the private data, so the chosen cell's epsilon is not
    the whole cost of tuning (docs/theory.md §12)."""
    return {**total_spent(accounts, delta), "releases": len(accounts)}


def _tuning_summary(tuning: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """The choice a main cell ran and what its tuning grid spent and took (tuning cell's
    record ``tuning``)."""
    return {
        "key": tuning["key"],
        "epsilon": tuning["epsilon"],
        "seed": tuning["seed"],
        "grid_points": len(tuning["grid_scores"]),
        "hyperparameters": chosen_point(cell.method, tuning),
        "valid_metric": tuning["valid_metric"],
        "seconds": tuning["seconds"]["tuning"],
        "budget": tuning["budget_spent_by_tuning"],
    }


def _seed_torch(noise_seed: int | None) -> None:
    """Seed torch's global generator with ``noise_seed``, or from operating-system entropy when
    it is None: whatever a method draws from it is then never predictable from the config."""
    if noise_seed is None:
        torch.seed()
    else:
        torch.manual_seed(noise_seed)


def _score(model: nn.Module, data: Any, metric: str) -> float:
    """``metric`` of ``model`` on ``data``; NaN when the model's outputs are not finite (a
    diverged run), so that one bad grid point does not stop the sweep."""
    try:
        return evaluate_metric(model, data, metric)
    except NonFiniteError:
        return math.nan


def _rank(score: float) -> float:
    """Selection order of validation scores: NaN (a diverged run) ranks last."""
    return score if math.isfinite(score) else -math.inf
