"""Configuration of a privacy-utility sweep (the evaluation protocol of README.md and
docs/results.md), read from JSON and validated up front so that a typo fails before hours of
computing, not after.

Example (``configs/smoke.json``)::

    {"name": "smoke",
     "scenarios": [{"name": "mnist_s1", "options": {"private_size": 2000}}],
     "methods": [{"name": "qem", "label": "qem_T2", "grid": {"k": [512, 2048]},
                  "fixed": {"rounds": 2}}],
     "epsilons": [0.5, 1, 2, 4, 8], "delta": 1e-5, "seeds": [0, 1, 2],
     "model": "cnn", "pretrain": {"epochs": 30, "seed": 0}}

Top-level keys: ``name``, ``scenarios``, ``methods``, ``epsilons``, ``seeds`` and ``pretrain``
are required; ``delta`` (default 1e-5), ``model`` (default "cnn"; a name or
``{"name", "options"}``), ``adjacency`` (default "replace_one"), ``loss`` (default
"cross_entropy"), ``reproducible`` (default false) and ``tuning`` (below) are optional. A
scenario entry has ``name`` and optional ``label``, ``options`` (keyword arguments of the
scenario's constructor) and ``model`` (overrides the top-level model). A method entry has
``name`` and optional ``label``, ``grid`` (hyperparameter -> non-empty list of values, tuned
on public validation data: their Cartesian product; or a list of such objects: the union of
their products, in order, for values that go together such as a batch size and its epochs) and
``fixed`` (the method's keyword-only parameters; see
:func:`qem.experiments.registry.accepted_hyperparameters`).

Tuning. Without ``tuning`` every cell tunes its method over the whole grid at the cell's own
epsilon and seed. With ``"tuning": {"epsilons": [1, 8], "seed": 0}`` each method's grid is run
once per tuning epsilon (at that seed, on the public validation split), in *tuning cells* of
their own; every cell then runs only the point chosen at the tuning epsilon that serves its
epsilon: the nearest on a log scale, ties to the smaller (:meth:`TuningSpec.serving`; with
{1, 8}: epsilon <= 2 is served by 1, epsilon >= 4 by 8). The cell records that choice and what
the tuning grid spent beside its own release (:mod:`qem.experiments.cells`).

Noise: by default every release draws its noise from operating-system entropy (the methods get
``seed=None``); the config's ``seeds`` only number the repetitions. ``"reproducible": true``
(or ``qem experiment run --reproducible``) seeds each release from its cell and grid point
instead (:meth:`qem.experiments.cells.Cell.noise_seed`): reruns give the same numbers, but
anyone who knows the config knows the noise, so never publish releases of a reproducible sweep.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qem.errors import InvalidParameterError
from qem.losses import LOSSES

ADJACENCIES = ("replace_one", "add_remove")
PRETRAIN_KEYS = frozenset({"epochs", "lr", "batch_size", "seed", "weight_decay"})
"""Keyword arguments of :func:`qem.pretrain.pretrain` a config may set."""
RESERVED_HYPERPARAMETERS = frozenset(
    {"epsilon", "delta", "adjacency", "validation_data", "seed", "progress"}
)
"""Arguments the runner passes to every method itself; a grid or fixed value may not set them."""
TEST_ONLY_HYPERPARAMETERS = frozenset({"noise"})
"""Switches that exist for tests only (``noise=False`` releases without noise); a sweep may not
set them."""

_TOP_REQUIRED = frozenset({"name", "scenarios", "methods", "epsilons", "seeds", "pretrain"})
_TOP_OPTIONAL = frozenset({"delta", "model", "adjacency", "loss", "reproducible", "tuning"})
_TUNING_KEYS = frozenset({"epsilons", "seed"})
_SCENARIO_KEYS = frozenset({"name", "label", "options", "model"})
_METHOD_KEYS = frozenset({"name", "label", "grid", "fixed"})
_MODEL_KEYS = frozenset({"name", "options"})
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ModelSpec:
    """``qem.models.build_model(name, **options)``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScenarioSpec:
    """A scenario constructor ``name`` called with ``options``; cells are keyed by ``label``."""

    name: str
    label: str
    options: dict[str, Any]
    model: ModelSpec


@dataclass(frozen=True)
class MethodSpec:
    """A method ``name`` with hyperparameters ``fixed`` plus one point of the ``grid``."""

    name: str
    label: str
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]]
    """A Cartesian product, or a list of them (their union)."""
    fixed: dict[str, Any]

    def grid_points(self) -> list[dict[str, Any]]:
        """The Cartesian product of the grid (or the products of its parts one after another),
        in config order (one empty point if no grid)."""
        parts = self.grid if isinstance(self.grid, list) else [self.grid]
        points: list[dict[str, Any]] = []
        for part in parts:
            product: list[dict[str, Any]] = [{}]
            for key, values in part.items():
                product = [{**point, key: value} for point in product for value in values]
            points += product
        return points

    def grid_keys(self) -> set[str]:
        """Every hyperparameter the grid sets."""
        parts = self.grid if isinstance(self.grid, list) else [self.grid]
        return {key for part in parts for key in part}


@dataclass(frozen=True)
class TuningSpec:
    """Grids tuned once per epsilon in ``epsilons`` at repetition ``seed``; each cell's epsilon
    is served by the nearest of them on a log scale (:meth:`serving`)."""

    epsilons: tuple[float, ...]
    seed: int

    def serving(self, epsilon: float) -> float:
        """The tuning epsilon whose choice serves ``epsilon``: the one nearest in log epsilon,
        the smaller on a tie (the boundary between t_i < t_j is sqrt(t_i t_j), so {1, 8}
        serves epsilon <= 2.83 by 1 and the rest by 8)."""
        return min(sorted(self.epsilons), key=lambda t: abs(math.log(epsilon / t)))


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated sweep: every scenario x method x epsilon x seed is one cell."""

    name: str
    scenarios: tuple[ScenarioSpec, ...]
    methods: tuple[MethodSpec, ...]
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    pretrain: dict[str, Any]
    delta: float = 1e-5
    adjacency: str = "replace_one"
    loss: str = "cross_entropy"
    reproducible: bool = False
    tuning: TuningSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``parse_config(config.to_dict()) == config``."""
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self, scenario: ScenarioSpec, method: MethodSpec) -> str:
        """SHA-256 of everything a cell of (scenario, method) depends on besides epsilon and
        seed; a finished cell is reused only if its fingerprint still matches. ``reproducible``
        is not part of it: the runner compares it on its own, with a message of its own. The
        tuning spec is, when there is one (a sweep without one keeps its fingerprints)."""
        relevant = {
            "scenario": asdict(scenario),
            "method": asdict(method),
            "delta": self.delta,
            "adjacency": self.adjacency,
            "loss": self.loss,
            "pretrain": self.pretrain,
        }
        if self.tuning is not None:
            relevant["tuning"] = asdict(self.tuning)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate a JSON config file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise InvalidParameterError(f"cannot read config {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise InvalidParameterError(f"config {path} is not valid JSON: {error}") from error
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a config given as parsed JSON; errors name the offending entry and key."""
    top = _mapping(raw, source, _TOP_REQUIRED, _TOP_OPTIONAL)
    model = _model(top.get("model", "cnn"), f"{source}: model")
    scenarios = tuple(
        _scenario(entry, f"{source}: scenarios[{i}]", model)
        for i, entry in enumerate(_nonempty_list(top["scenarios"], f"{source}: scenarios"))
    )
    methods = tuple(
        _method(entry, f"{source}: methods[{i}]")
        for i, entry in enumerate(_nonempty_list(top["methods"], f"{source}: methods"))
    )
    _unique([s.label for s in scenarios], f"{source}: scenario labels")
    _unique([m.label for m in methods], f"{source}: method labels")
    epsilons = _epsilons(top["epsilons"], f"{source}: epsilons")
    seeds = tuple(
        _seed(seed, f"{source}: seeds[{i}]")
        for i, seed in enumerate(_nonempty_list(top["seeds"], f"{source}: seeds"))
    )
    _unique(list(seeds), f"{source}: seeds")
    tuning = _tuning(top.get("tuning"), f"{source}: tuning")
    delta = _number(top.get("delta", 1e-5), f"{source}: delta")
    if not 0 < delta < 1:
        raise InvalidParameterError(f"{source}: delta must lie in (0, 1), got {delta}.")
    adjacency = top.get("adjacency", "replace_one")
    if adjacency not in ADJACENCIES:
        raise InvalidParameterError(
            f"{source}: adjacency must be one of {list(ADJACENCIES)}, got {adjacency!r}."
        )
    loss = top.get("loss", "cross_entropy")
    if loss not in LOSSES:
        raise InvalidParameterError(
            f"{source}: loss must be one of {sorted(LOSSES)}, got {loss!r}."
        )
    reproducible = top.get("reproducible", False)
    if not isinstance(reproducible, bool):
        raise InvalidParameterError(
            f"{source}: reproducible must be true or false, got {reproducible!r}."
        )
    name = top["name"]
    if not isinstance(name, str) or not _LABEL.fullmatch(name):
        raise InvalidParameterError(
            f"{source}: name must be a non-empty string of letters, digits, '_', '.', '-'; "
            f"got {name!r}."
        )
    return ExperimentConfig(
        name=name,
        scenarios=scenarios,
        methods=methods,
        epsilons=epsilons,
        seeds=seeds,
        pretrain=_pretrain(top["pretrain"], f"{source}: pretrain"),
        delta=delta,
        adjacency=adjacency,
        loss=loss,
        reproducible=reproducible,
        tuning=tuning,
    )


def _epsilons(raw: Any, where: str) -> tuple[float, ...]:
    epsilons = tuple(
        _positive(eps, f"{where}[{i}]") for i, eps in enumerate(_nonempty_list(raw, where))
    )
    _unique(list(epsilons), where)
    return epsilons


def _tuning(raw: Any, where: str) -> TuningSpec | None:
    if raw is None:  # absent, or to_dict's form of a config without one
        return None
    entry = _mapping(raw, where, _TUNING_KEYS, frozenset())
    return TuningSpec(
        _epsilons(entry["epsilons"], f"{where}: epsilons"), _seed(entry["seed"], f"{where}: seed")
    )


def _mapping(raw: Any, where: str, required: frozenset, optional: frozenset) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidParameterError(f"{where} must be a JSON object, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - required - optional)
    if unknown:
        raise InvalidParameterError(
            f"{where}: unknown key(s) {unknown}; allowed: {sorted(required | optional)}."
        )
    missing = sorted(required - set(raw))
    if missing:
        raise InvalidParameterError(f"{where}: missing required key(s) {missing}.")
    return raw


def _nonempty_list(raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise InvalidParameterError(f"{where} must be a non-empty list, got {raw!r}.")
    return raw


def _unique(values: list[Any], where: str) -> None:
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise InvalidParameterError(f"{where} must be unique; repeated: {duplicates}.")


def _number(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise InvalidParameterError(f"{where} must be a finite number, got {raw!r}.")
    return float(raw)


def _positive(raw: Any, where: str) -> float:
    value = _number(raw, where)
    if value <= 0:
        raise InvalidParameterError(f"{where} must be > 0, got {raw!r}.")
    return value


def _seed(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise InvalidParameterError(f"{where} must be an integer >= 0, got {raw!r}.")
    return raw


def _label(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not _LABEL.fullmatch(raw) or "__" in raw:
        raise InvalidParameterError(
            f"{where} must be letters, digits, '_', '.', '-' (no '__', which separates the parts "
            f"of a cell's file name), got {raw!r}."
        )
    return raw


def _options(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidParameterError(f"{where} must be a JSON object, got {raw!r}.")
    return dict(raw)


def _model(raw: Any, where: str) -> ModelSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    entry = _mapping(raw, where, frozenset({"name"}), _MODEL_KEYS - {"name"})
    if not isinstance(entry["name"], str) or not entry["name"]:
        raise InvalidParameterError(f"{where}: name must be a non-empty string.")
    return ModelSpec(entry["name"], _options(entry.get("options", {}), f"{where}: options"))


def _scenario(raw: Any, where: str, default_model: ModelSpec) -> ScenarioSpec:
    entry = _mapping(raw, where, frozenset({"name"}), _SCENARIO_KEYS - {"name"})
    name = _label(entry["name"], f"{where}: name")
    model = _model(entry["model"], f"{where}: model") if "model" in entry else default_model
    return ScenarioSpec(
        name=name,
        label=_label(entry.get("label", name), f"{where}: label"),
        options=_options(entry.get("options", {}), f"{where}: options"),
        model=model,
    )


def _method(raw: Any, where: str) -> MethodSpec:
    entry = _mapping(raw, where, frozenset({"name"}), _METHOD_KEYS - {"name"})
    name = _label(entry["name"], f"{where}: name")
    raw_grid = entry.get("grid", {})
    if isinstance(raw_grid, list):
        grid: dict | list = [
            _grid(part, f"{where}: grid[{i}]")
            for i, part in enumerate(_nonempty_list(raw_grid, f"{where}: grid"))
        ]
        keys = {key for part in grid for key in part}
    else:
        grid = _grid(raw_grid, f"{where}: grid")
        keys = set(grid)
    fixed = _options(entry.get("fixed", {}), f"{where}: fixed")
    for key in sorted(keys | set(fixed)):
        if key in RESERVED_HYPERPARAMETERS:
            raise InvalidParameterError(
                f"{where}: {key!r} is set by the runner for every cell; remove it from "
                "grid/fixed (epsilons, delta, adjacency and seeds are top-level keys)."
            )
        if key in TEST_ONLY_HYPERPARAMETERS:
            raise InvalidParameterError(
                f"{where}: {key!r} is a switch for tests only (noise=False releases the private "
                "data without noise); remove it from grid/fixed."
            )
    overlap = sorted(keys & set(fixed))
    if overlap:
        raise InvalidParameterError(f"{where}: {overlap} appear in both grid and fixed; keep one.")
    return MethodSpec(
        name=name, label=_label(entry.get("label", name), f"{where}: label"), grid=grid, fixed=fixed
    )


def _grid(raw: Any, where: str) -> dict[str, list[Any]]:
    grid = _options(raw, where)
    for key, values in grid.items():
        _nonempty_list(values, f"{where}[{key!r}]")
    return grid


def _pretrain(raw: Any, where: str) -> dict[str, Any]:
    entry = _mapping(raw, where, frozenset({"epochs", "seed"}), PRETRAIN_KEYS)
    _seed(entry["seed"], f"{where}: seed")
    return dict(entry)
