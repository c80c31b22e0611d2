"""The quadratic exponential mechanism: clipping in the metric of A and exact Normal sampling
(numpy/scipy float64 only; DESIGN.md §1)."""

from qem.mechanism.clipping import (
    PublicQuadratic,
    clip_gradients,
    curvature_factor,
    dual_norms,
    symmetric_curvature,
    validate_curvature,
)
from qem.mechanism.quadratic import Mode, QuadraticExponentialMechanism
from qem.mechanism.report import Preview

__all__ = [
    "Mode",
    "Preview",
    "PublicQuadratic",
    "QuadraticExponentialMechanism",
    "clip_gradients",
    "curvature_factor",
    "dual_norms",
    "symmetric_curvature",
    "validate_curvature",
]
