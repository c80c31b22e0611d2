"""Curvature by name: make_curvature("ggn" | "kfac" | "fisher" | "hessian" | "identity", damping,
...)."""

from __future__ import annotations

import inspect
from typing import Any

from qem.curvature.base import Curvature
from qem.curvature.fisher import EmpiricalFisher
from qem.curvature.ggn import GaussNewton
from qem.curvature.hessian import Hessian
from qem.curvature.identity import IdentityCurvature
from qem.curvature.kfac import KFAC
from qem.errors import InvalidParameterError

CURVATURES: dict[str, type[Curvature]] = {
    cls.kind: cls for cls in (GaussNewton, KFAC, EmpiricalFisher, Hessian, IdentityCurvature)
}


def make_curvature(kind: str, damping: float, **options: Any) -> Curvature:
    """The curvature class registered as ``kind``, built with ``damping`` and ``options``."""
    if kind not in CURVATURES:
        raise InvalidParameterError(
            f"unknown curvature kind {kind!r}; choose one of {sorted(CURVATURES)}."
        )
    cls = CURVATURES[kind]
    accepted = [name for name in inspect.signature(cls).parameters if name != "damping"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InvalidParameterError(
            f"curvature {kind!r} takes no options {unknown}; it accepts {accepted}."
        )
    return cls(damping, **options)
