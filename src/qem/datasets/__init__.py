"""Datasets and transfer scenarios (DESIGN.md §5): MNIST from local files, the MNIST S1/S2
scenarios, MIMIC-Extract ICU tasks and a synthetic file of the same schema."""

from qem.datasets.mimic import MimicCohort, load_mimic_extract, mimic_careunit_scenario
from qem.datasets.mnist import MnistSplits, load_mnist
from qem.datasets.scenarios import Scenario, mnist_s1, mnist_s2, rotate
from qem.datasets.synthetic_mimic import write_synthetic_mimic

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
