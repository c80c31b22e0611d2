"""DP-SGD (Abadi et al. 2016) through Opacus, the baseline qem is compared with.

Each of the T = epochs * floor(1/q) steps draws a Poisson sample B of the n private records,
each record independently with probability q = 1 / ceil(n / batch_size) (Opacus' DPDataLoader),
clips every per-example gradient to norm C = ``max_grad_norm`` and steps with

    g = ( sum_{i in B} clip_C(grad loss(theta; z_i)) + Normal(0, sigma^2 C^2 I) ) / (n q).

Training runs in Opacus itself: ``PrivacyEngine.make_private`` on a deep copy of the model
(GradSampleModule, hooks), its DPOptimizer and its Poisson loader, with ``secure_mode`` off and
two torch generators, for the Poisson sampling and the noise, seeded from OS entropy unless a
seed is given (the report says which).

Calibration. The noise multiplier sigma is the smallest (to 0.1%) with which T-fold
self-composition of PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) is (epsilon, delta)-DP
under dp_accounting's PLD accountant (pessimistic connect-the-dots discretisation, so the
epsilon it reports is an upper bound) for the requested neighbouring relation:

* ``add_remove``: dp_accounting's ADD_OR_REMOVE_ONE, the relation Opacus accounts.
* ``replace_one`` (qem's default): dp_accounting 0.6.0 supports REPLACE_ONE for a
  Poisson-subsampled Gaussian in the PLD accountant (its RDP accountant refuses it). Its
  privacy-loss distribution compares q N(-C, sigma^2 C^2) + (1 - q) N(0, sigma^2 C^2) with
  q N(+C, ...) + (1 - q) N(0, ...): the replaced record is sampled with probability q and its
  clipped gradient turns from -C to +C along one direction
  (privacy_loss_mechanism.AdditiveNoisePrivacyLoss, REPLACE); that this pair dominates every
  replace-one pair of DP-SGD is dp_accounting's claim, which this module relies on. At q = 1 it
  is add/remove at sensitivity 2C (sigma_effective = sigma / 2), the s = 2 of DESIGN.md §1a
  (tests/test_baselines.py checks this); for q < 1 it needs less noise than that
  doubled-sensitivity treatment (q = 0.25, T = 20, epsilon = 8: sigma 1.34 against
  2 x 1.01), which is why it is used rather than sigma / 2 under add/remove.

sigma is found by Brent's method (dp_accounting.mechanism_calibration, which guarantees that
the returned sigma meets the target) and passed to ``make_private(noise_multiplier=sigma)``.
Opacus' ``make_private_with_epsilon`` is not used: it converts epochs to steps as
int(epochs / q), which for some batch counts is one step short of what its loader runs (75
batches x 3 epochs -> 224 of 225 steps), its bisection stops up to 0.01 below the target
(measured: up to 3% more noise), and it was up to 8 times slower (38 s against 5 s at
epsilon = 8, q = 1/192, T = 5760). The reported ``epsilon`` is the
dp_accounting epsilon of the run (<= the target); Opacus' own PRV accountant's epsilon for the
steps it counted, which accounts add/remove neighbours and is an upper estimate within its
eps_error = 0.01 (so under add/remove it may exceed the target by up to 0.01), is reported
beside it as a cross-check.

Models must be Opacus-compatible (no BatchNorm: use GroupNorm). The report holds no statistic
of the private data.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from qem.baselines import (
    PhaseTimer,
    baseline_report,
    check_count,
    parse_adjacency,
    torch_generators,
    warn_large_delta,
)
from qem.baselines.nonprivate import train_epochs
from qem.data import DataLike, as_dataset, batches
from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.finetune import FineTuneResult
from qem.losses import check_per_example_loss
from qem.parameters import check_finite_parameters
from qem.privacy.gdp import calibrate_gdp_mu, check_delta, check_epsilon
from qem.privacy.sensitivity import Adjacency, check_positive
from qem.subspace.base import LossFn

PLD_DISCRETIZATION = 1e-3
"""value_discretization_interval of the PLD accountant: epsilon is an upper bound at any value;
1e-3 is within 0.01 of 1e-4 on MNIST-sized runs and about 5 times faster."""

_RELATIONS = {
    Adjacency.ADD_REMOVE: NeighboringRelation.ADD_OR_REMOVE_ONE,
    Adjacency.REPLACE_ONE: NeighboringRelation.REPLACE_ONE,
}


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_event.DpEvent:
    """T-fold composition of the Poisson-subsampled Gaussian: what DP-SGD releases."""
    sampled = dp_event.PoissonSampledDpEvent(
        sample_rate, dp_event.GaussianDpEvent(noise_multiplier)
    )
    return dp_event.SelfComposedDpEvent(sampled, steps)


def _pld_accountant(adjacency: Adjacency, discretization: float) -> PLDAccountant:
    return PLDAccountant(_RELATIONS[adjacency], value_discretization_interval=discretization)


def pld_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    adjacency: Adjacency | str = Adjacency.REPLACE_ONE,
    discretization: float = PLD_DISCRETIZATION,
) -> float:
    """epsilon(delta) of DP-SGD with these parameters: dp_accounting's PLD accountant."""
    accountant = _pld_accountant(Adjacency(adjacency), discretization)
    event = dpsgd_event(noise_multiplier, sample_rate, steps)
    return float(accountant.compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    adjacency: Adjacency | str = Adjacency.REPLACE_ONE,
    discretization: float = PLD_DISCRETIZATION,
) -> float:
    """The smallest sigma (to 0.1%) with pld_epsilon(sigma) <= epsilon.

    Starts from the central-limit guess of Bu et al. (2020), q sqrt(T (e^{1/sigma^2} - 1)) = mu
    with mu the GDP parameter of (epsilon, delta), brackets the root by factors of 1.25 and
    hands the bracket to dp_accounting's calibrate_dp_mechanism.
    """
    adjacency = Adjacency(adjacency)
    mu = calibrate_gdp_mu(epsilon, delta)
    guess = 1.0 / math.sqrt(math.log1p(mu * mu / (sample_rate * sample_rate * steps)))

    def meets_target(sigma: float) -> bool:
        return pld_epsilon(sigma, sample_rate, steps, delta, adjacency, discretization) <= epsilon

    lo = hi = guess  # invariant after the loops: lo misses the target, hi meets it
    if meets_target(guess):
        while meets_target(lo):
            lo, hi = lo / 1.25, lo
    else:
        while not meets_target(hi):
            lo, hi = hi, hi * 1.25
    return float(
        mechanism_calibration.calibrate_dp_mechanism(
            lambda: _pld_accountant(adjacency, discretization),
            lambda sigma: dpsgd_event(sigma, sample_rate, steps),
            epsilon,
            delta,
            mechanism_calibration.ExplicitBracketInterval(lo, hi),
            tol=1e-3 * lo,
        )
    )


def _check_opacus_compatible(model: nn.Module) -> None:
    """Opacus' validator on a training-mode copy (a pretrained model usually arrives in eval
    mode, which Opacus flags although DP-SGD will train it in training mode)."""
    errors = ModuleValidator.validate(copy.deepcopy(model).train(), strict=False)
    if errors:
        raise UnsupportedModelError(
            f"DP-SGD (Opacus) cannot train this model: {errors}. Replace BatchNorm by GroupNorm "
            "(opacus.validators.ModuleValidator.fix does it) before pretraining."
        )


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
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``private_data`` with DP-SGD at (epsilon, delta).

    ``batch_size`` is the expected Poisson batch; ``optimizer`` is 'sgd' (with ``momentum``) or
    'adam'. ``public_data`` and ``validation_data`` are not used (DP-SGD trains on the private
    data only); they are accepted for the common signature. Returns the last iterate.
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    adjacency = parse_adjacency(adjacency)
    check_positive("lr", lr)
    check_positive("max_grad_norm", max_grad_norm, "It is the per-example clip norm C.")
    batch_size = check_count("batch_size", batch_size)
    epochs = check_count("epochs", epochs)
    if optimizer not in OPTIMIZERS:
        raise InvalidParameterError(
            f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}."
        )
    if not 0.0 <= momentum < 1.0:
        raise InvalidParameterError(f"momentum must lie in [0, 1), got {momentum!r}.")
    check_finite_parameters(model)
    _check_opacus_compatible(model)
    private = as_dataset(private_data, "private data")
    warn_large_delta(delta, len(private))
    probe_x, probe_y = next(iter(batches(private, 2)))
    with torch.no_grad():
        check_per_example_loss(loss_fn, model(probe_x), probe_y)

    timer = PhaseTimer()
    device = next(model.parameters()).device
    sampling, noise = torch_generators(seed, ["cpu", device])
    loader = DataLoader(private, batch_size=batch_size, generator=sampling)
    sample_rate = 1.0 / len(loader)
    steps_per_epoch = int(1.0 / sample_rate)  # what Opacus' UniformWithReplacementSampler runs
    steps = epochs * steps_per_epoch

    with timer.phase("calibration"):
        sigma = calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, adjacency)
        certified = pld_epsilon(sigma, sample_rate, steps, delta, adjacency)

    with timer.phase("training"):
        trained = copy.deepcopy(model).train()
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        module, dp_optimizer, dp_loader = engine.make_private(
            module=trained,
            optimizer=OPTIMIZERS[optimizer](trained.parameters(), lr, momentum),
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

    accountant = {
        "name": "dp_accounting PLD",
        "relation": _RELATIONS[adjacency].name,
        "value_discretization_interval": PLD_DISCRETIZATION,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": steps,
        "expected_batch_size": len(private) * sample_rate,
        "max_grad_norm": max_grad_norm,
        "opacus_prv_epsilon_add_remove": opacus_epsilon,
    }
    hyperparameters = {
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum if optimizer == "sgd" else None,
        "batch_size": batch_size,
        "epochs": epochs,
        "max_grad_norm": max_grad_norm,
    }
    report = baseline_report(
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
        secure_mode=False,
    )
    return FineTuneResult(model=trained.eval(), report=report)
