"""Datasets and transfer scenarios (the evaluation protocol of README.md and docs/results.md):
MNIST from local files, the MNIST S1/S2 scenarios, MIMIC-Extract ICU tasks and a synthetic file
of the same schema.

The MIMIC names are imported on first use: they need pandas and PyTables, the optional extra
``qem[mimic]``, which the MNIST scenarios do not.
"""

from importlib import import_module
from typing import Any

from qem.datasets.mnist import MnistSplits, load_mnist
from qem.datasets.scenarios import Scenario, mnist_s1, mnist_s2, rotate

_MIMIC = {
    "MimicCohort": "qem.datasets.mimic",
    "load_mimic_extract": "qem.datasets.mimic",
    "mimic_careunit_scenario": "qem.datasets.mimic",
    "write_synthetic_mimic": "qem.datasets.synthetic_mimic",
}


def __getattr__(name: str) -> Any:
    if name in _MIMIC:
        return getattr(import_module(_MIMIC[name]), name)
    raise AttributeError(f"module 'qem.datasets' has no attribute {name!r}")


__all__ = [
    "MimicCohort",
    "MnistSplits",
    "Scenario",
    "load_mimic_extract",
    "load_mnist",
    "mimic_careunit_scenario",
    "mnist_s1",
    "mnist_s2",
    "rotate",
    "write_synthetic_mimic",
]
