"""The methods compared side by side (the evaluation protocol: README.md, docs/results.md), by
name.

Every entry has fine_tune's core signature,
``method(model, loss_fn, public_data, private_data, *, epsilon, delta, adjacency,
validation_data, seed, progress, **hyperparameters) -> FineTuneResult``:

* ``qem``          qem.finetune.fine_tune (``rounds=T`` and its other options pass through);
* ``qem_identity`` the same with ``curvature="identity"``: the no-curvature ablation, A = gamma I;
* ``dpsgd``        DP-SGD through Opacus (qem.baselines.dpsgd);
* ``nonprivate``   Adam fine-tuning without privacy (qem.baselines.nonprivate);
* ``none``         the pretrained model unchanged (qem.baselines.none).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qem.baselines.dpsgd import dpsgd
from qem.baselines.none import none
from qem.baselines.nonprivate import nonprivate
from qem.data import DataLike
from qem.errors import InvalidParameterError
from qem.finetune import FineTuneResult, fine_tune
from qem.losses import LossFn

Method = Callable[..., FineTuneResult]


def qem(
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
    **hyperparameters: object,
) -> FineTuneResult:
    """qem.finetune.fine_tune with the common signature."""
    return fine_tune(
        model,
        loss_fn,
        public_data,
        private_data,
        epsilon=epsilon,
        delta=delta,
        adjacency=adjacency,
        validation_data=validation_data,
        seed=seed,
        progress=progress,
        **hyperparameters,
    )


def qem_identity(
    model: nn.Module, loss_fn: LossFn, public_data: DataLike, private_data: DataLike, **kwargs
) -> FineTuneResult:
    """qem without curvature (``curvature="identity"``): the report's curvature says so."""
    if "curvature" in kwargs:
        raise InvalidParameterError(
            "qem_identity fixes curvature='identity'; use method 'qem' to choose a curvature."
        )
    return qem(model, loss_fn, public_data, private_data, curvature="identity", **kwargs)


METHODS: dict[str, Method] = {
    "qem": qem,
    "qem_identity": qem_identity,
    "dpsgd": dpsgd,
    "nonprivate": nonprivate,
    "none": none,
}


def run_method(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    **kwargs: object,
) -> FineTuneResult:
    """Run the method called ``name`` (a key of METHODS) with the common signature."""
    if name not in METHODS:
        raise InvalidParameterError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}."
        )
    return METHODS[name](model, loss_fn, public_data, private_data, **kwargs)
