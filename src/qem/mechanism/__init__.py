"""The quadratic exponential mechanism: clipping in the metric of A and exact Normal sampling
(numpy/scipy float64 only; docs/theory.md §1)."""

from qem.mechanism.clipping import (
    PublicQuadratic,
    clip_gradients,
    curvature_factor,
    dual_norms,
    symmetric_curvature,
    validate_curvature,
)
from qem.mechanism.noise import NoiseSource, SecureNoise, SeededNoise, SystemNoise
from qem.mechanism.quadratic import Mode, QuadraticExponentialMechanism
from qem.mechanism.report import Preview

__all__ = [
    "Mode",
    "NoiseSource",
    "Preview",
    "PublicQuadratic",
    "QuadraticExponentialMechanism",
    "SecureNoise",
    "SeededNoise",
    "SystemNoise",
    "clip_gradients",
    "curvature_factor",
    "dual_norms",
    "symmetric_curvature",
    "validate_curvature",
]
