"""DP-SGD (Abadi et al. 2016) through Opacus, the baseline qem is compared with.

Each of the T = epochs * floor(1/q) steps draws a Poisson sample B of the n private records,
each record independently with probability q = 1 / ceil(n / batch_size) (Opacus' DPDataLoader),
clips every per-example gradient to norm C = ``max_grad_norm`` and steps with

    g = ( sum_{i in B} clip_C(grad loss(theta; z_i)) + Normal(0, sigma^2 C^2 I) ) / (n q).

Training runs in Opacus itself: ``PrivacyEngine.make_private`` on a deep copy of the model
(GradSampleModule, hooks), its DPOptimizer and its Poisson loader, with
two torch generators, for the Poisson sampling and the noise, seeded from OS entropy unless a
seed is given (the report says which). ``secure_mode`` is passed to Opacus.

Calibration. The noise multiplier sigma is the smallest (to 0.1%) with which T-fold
self-composition of PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) is (epsilon, delta)-DP
under dp_accounting's PLD accountant for the requested neighbouring relation: the routine of
``qem.privacy.calibration``, which qem's Poisson schedule calls too (one routine, two callers;
its docstring explains the replace-one relation). At q = 1, replace-one is add/remove at
sensitivity 2C (sigma_effective = sigma / 2), the s = 2 of docs/theory.md §2
(tests/test_baselines.py checks this); for q < 1 it needs less noise than that doubled
sensitivity (q = 0.25, T = 20, epsilon = 8: sigma 1.34 against 2 x 1.01).
Opacus' ``make_private_with_epsilon`` is not used: it converts epochs to steps as
int(epochs / q), which for some batch counts is one step short of what its loader runs (75
batches x 3 epochs -> 224 of 225 steps), its bisection stops up to 0.01 below the target
(measured: up to 3% more noise), and it was up to 8 times slower (38 s against 5 s at
epsilon = 8, q = 1/192, T = 5760). The reported ``epsilon`` is the dp_accounting epsilon of the
run (<= the target), with the run's DpEvent as JSON; Opacus' own PRV accountant's epsilon for
the steps it counted, which accounts add/remove neighbours and is an upper estimate within its
eps_error = 0.01, is reported beside it as a cross-check.

Models must be Opacus-compatible (no BatchNorm: use GroupNorm). The report holds no statistic
of the private data. Opacus comes with the optional extra ``qem[baselines]`` and is imported on
the first call.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from qem.baselines import baseline_result, torch_generators
from qem.baselines.nonprivate import train_epochs
from qem.checks import (
    check_count,
    check_delta,
    check_epsilon,
    check_in_interval,
    check_positive,
    parse_option,
)
from qem.data import DataLike, as_dataset, batches, training_loader
from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.extras import import_extra
from qem.finetune import FineTuneResult
from qem.losses import LossFn, check_per_example_loss
from qem.model_calls import call_model
from qem.parameters import check_finite_parameters
from qem.privacy.calibration import (
    accountant_epsilon,
    calibrate_noise_multiplier,
    poisson_gaussian_event,
)
from qem.privacy.gdp import warn_large_delta
from qem.privacy.ledger import accountant_block
from qem.privacy.pld import PLD_DISCRETIZATION, neighboring_relation
from qem.privacy.sensitivity import Adjacency
from qem.timing import PhaseTimer

if TYPE_CHECKING:
    from opacus import PrivacyEngine


def _opacus(module: str = "opacus") -> ModuleType:
    """Opacus (or its submodule ``module``), or MissingExtraError naming ``qem[baselines]``."""
    return import_extra(module, "baselines", "the DP-SGD baseline")


def _check_opacus_compatible(model: nn.Module) -> None:
    """Opacus' validator on a training-mode copy (a pretrained model usually arrives in eval
    mode, which Opacus flags although DP-SGD will train it in training mode)."""
    validator = _opacus("opacus.validators").ModuleValidator
    errors = validator.validate(copy.deepcopy(model).train(), strict=False)
    if errors:
        raise UnsupportedModelError(
            f"DP-SGD (Opacus) cannot train this model: {errors}. Replace BatchNorm by GroupNorm "
            "(opacus.validators.ModuleValidator.fix does it) before pretraining."
        )


def _privacy_engine(secure_mode: bool) -> PrivacyEngine:
    """Opacus' PrivacyEngine; its warning that secure_mode is off is expected here (the report
    records the setting) and kept out of the output."""
    engine = _opacus().PrivacyEngine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure.*")
        try:
            return engine(accountant="prv", secure_mode=bool(secure_mode))
        except ImportError as error:
            raise InvalidParameterError(
                f"Opacus' secure_mode needs the torchcsprng package ({error}); install it or "
                "run without secure_mode."
            ) from error


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum: torch.optim.SGD(params, lr=lr, momentum=momentum),
    "adam": lambda params, lr, momentum: torch.optim.Adam(params, lr=lr),
}
"""DP-SGD's inner optimizer by name: (parameters, lr, momentum) -> optimizer."""


def dpsgd(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    epsilon: float,
    delta: float,
    adjacency: str = "replace_one",
    validation_data: DataLike | None = None,
    seed: int | None = None,
    progress: bool = True,
    lr: float = 0.1,
    batch_size: int = 256,
    epochs: int = 5,
    max_grad_norm: float = 1.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    secure_mode: bool = False,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``private_data`` with DP-SGD at (epsilon, delta).

    ``batch_size`` is the expected Poisson batch; ``optimizer`` is 'sgd' (with ``momentum``) or
    'adam'. ``secure_mode`` is Opacus' own (a CSPRNG and noise hardened against floating-point
    attacks; it needs the ``torchcsprng`` package). ``public_data`` (only to probe the loss's
    shape) and ``validation_data`` are not used (DP-SGD trains on the private
    data only); they are accepted for the common signature. Returns the last iterate.
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    adjacency = parse_option(Adjacency, adjacency, "adjacency")
    check_positive("lr", lr)
    check_positive("max_grad_norm", max_grad_norm, "It is the per-example clip norm C.")
    batch_size = check_count("batch_size", batch_size)
    epochs = check_count("epochs", epochs)
    if optimizer not in OPTIMIZERS:
        raise InvalidParameterError(
            f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}."
        )
    check_in_interval("momentum", momentum, 0.0, 1.0, closed="low")
    check_finite_parameters(model)
    _check_opacus_compatible(model)
    private = as_dataset(private_data, "private data", addressable=True)
    warn_large_delta(delta, len(private))
    probe_x, probe_y = next(iter(batches(as_dataset(public_data, "public data"), 2)))
    with torch.no_grad():  # on PUBLIC examples and an eval copy: the caller's model is untouched
        outputs = call_model(copy.deepcopy(model).eval(), probe_x)
        check_per_example_loss(loss_fn, outputs, probe_y)

    timer = PhaseTimer()
    device = next(model.parameters()).device
    sampling, noise = torch_generators(seed, ["cpu", device])
    loader = training_loader(private, batch_size, generator=sampling)
    sample_rate = 1.0 / len(loader)
    steps_per_epoch = int(1.0 / sample_rate)  # what Opacus' UniformWithReplacementSampler runs
    steps = epochs * steps_per_epoch

    with timer.phase("calibration"):
        sigma = calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, adjacency=adjacency)
        event = poisson_gaussian_event(sigma, sample_rate, steps)
        certified = accountant_epsilon(event, delta, adjacency)

    with timer.phase("training"):
        trained = copy.deepcopy(model).train()
        engine = _privacy_engine(secure_mode)
        module, dp_optimizer, dp_loader = engine.make_private(
            module=trained,
            optimizer=OPTIMIZERS[optimizer](
                [p for p in trained.parameters() if p.requires_grad], lr, momentum
            ),
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            grad_sample_mode="hooks",
        )
        if len(dp_loader) != steps_per_epoch or dp_loader.sample_rate != sample_rate:
            raise RuntimeError("Opacus' Poisson loader differs from the accounted one.")
        with warnings.catch_warnings():  # Opacus' hooks on a model whose inputs need no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            train_epochs(
                module,
                loss_fn,
                dp_loader,
                dp_optimizer,
                epochs=epochs,
                progress=progress,
                desc="DP-SGD",
            )
        trained = module.to_standard_module()

    with timer.phase("accounting"):
        opacus_epsilon = float(engine.get_epsilon(delta))
        opacus_steps = sum(count for _, _, count in engine.accountant.history)
    if opacus_steps != steps:
        raise RuntimeError(f"DP-SGD ran {opacus_steps} steps but {steps} were accounted.")

    accountant = accountant_block(
        event,
        neighboring_relation(adjacency),
        name="dp_accounting PLD",
        epsilon=certified,
        delta=delta,
        value_discretization_interval=PLD_DISCRETIZATION,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        expected_batch_size=len(private) * sample_rate,
        max_grad_norm=max_grad_norm,
        opacus_prv_epsilon_add_remove=opacus_epsilon,
    )
    hyperparameters = {
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum if optimizer == "sgd" else None,
        "batch_size": batch_size,
        "epochs": epochs,
        "max_grad_norm": max_grad_norm,
    }
    return baseline_result(
        trained.eval(),
        "dpsgd",
        privacy=f"({certified:.4g}, {delta:.3g})-DP for {adjacency.value} neighbours "
        "(DP-SGD, Opacus; dp_accounting PLD accountant)",
        epsilon=certified,
        delta=delta,
        adjacency=adjacency.value,
        N=len(private),
        accountant=accountant,
        hyperparameters=hyperparameters,
        seed=seed,
        seconds=timer.seconds,
        epsilon_target=epsilon,
        secure_mode=secure_mode,
    )
