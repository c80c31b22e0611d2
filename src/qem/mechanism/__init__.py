"""The quadratic exponential mechanism: clipping in the metric of A and exact Normal sampling
(numpy/scipy float64 only; docs/theory.md §1)."""

from qem.mechanism.clipping import clip_gradients, dual_norms
from qem.mechanism.noise import NoiseSource, SecureNoise, SeededNoise, SystemNoise
from qem.mechanism.quadratic import Mode, QuadraticExponentialMechanism
from qem.mechanism.report import Preview

__all__ = [
    "Mode",
    "NoiseSource",
    "Preview",
    "QuadraticExponentialMechanism",
    "SecureNoise",
    "SeededNoise",
    "SystemNoise",
    "clip_gradients",
    "dual_norms",
]
