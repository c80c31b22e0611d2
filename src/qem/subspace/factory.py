"""Build a subspace from its kind name (used by fine_tune and the CLI)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qem.errors import InvalidParameterError
from qem.parameters import Layers
from qem.subspace.base import Subspace
from qem.subspace.dense import DenseGaussian
from qem.subspace.identity import Identity
from qem.subspace.kronecker import Kronecker
from qem.subspace.srht import SRHT
from qem.subspace.subset import ParameterSubset, biases, last_layer

_FIXED: dict[str, Callable[..., Subspace]] = {
    "identity": Identity,
    "last_layer": last_layer,
    "biases": biases,
    "subset": ParameterSubset,
}
_RANDOM: dict[str, Callable[..., Subspace]] = {
    "dense": DenseGaussian,
    "srht": SRHT,
    "kronecker": Kronecker,
}
KINDS: tuple[str, ...] = (*_FIXED, *_RANDOM)
FIXED_SIZE_KINDS: tuple[str, ...] = tuple(_FIXED)


def make_subspace(
    kind: str,
    model: nn.Module,
    k: int | None = None,
    seed: int | None = None,
    layers: Layers | None = None,
    **options,
) -> Subspace:
    """The subspace ``kind`` over ``model``; ``options`` go to its constructor.

    identity, last_layer, biases, subset: P is a coordinate embedding, k is its size (a given k
    must equal it) and the seed is not used. dense, srht, kronecker: k defaults to
    min(d, qem.defaults.SUBSPACE_K) (Kronecker also accepts shapes= instead) and P is drawn
    from ``seed``. ``layers`` (module names and types, qem.parameters) restricts every kind
    to the chosen modules: Kronecker spans their Linear/Conv2d layers, the others their
    trainable parameters.
    """
    if layers is not None:
        options["layers"] = layers
    if kind in _FIXED:
        subspace = _FIXED[kind](model, **options)
        if k is not None and k != subspace.k:
            raise InvalidParameterError(
                f"subspace {kind!r} has k={subspace.k} fixed by the parameters it spans, but "
                f"k={k} was requested; drop k or use 'dense', 'srht' or 'kronecker'."
            )
        return subspace
    if kind in _RANDOM:
        return _RANDOM[kind](model, k, seed, **options)
    raise InvalidParameterError(f"unknown subspace kind {kind!r}; choose one of {list(KINDS)}.")
