"""Privacy-utility sweeps (the evaluation protocol of README.md and docs/results.md): a JSON config
(:mod:`.config`), a resumable runner that writes one JSON file per scenario x method x epsilon x
seed cell (:mod:`.runner`), and markdown tables and plots of the cells (:mod:`.report`)."""

from qem.experiments.config import ExperimentConfig, load_config, parse_config
from qem.experiments.report import write_report
from qem.experiments.runner import Registry, default_registry, run_experiment

__all__ = [
    "ExperimentConfig",
    "Registry",
    "default_registry",
    "load_config",
    "parse_config",
    "run_experiment",
    "write_report",
]
