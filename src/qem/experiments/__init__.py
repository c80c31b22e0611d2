"""Privacy-utility sweeps (the evaluation protocol of README.md and docs/results.md): a JSON config
(:mod:`.config`), the scenarios, methods and pretraining a config may name (:mod:`.registry`), a
resumable runner (:mod:`.runner`) that writes one JSON file per scenario x method x epsilon x
seed cell (:mod:`.cells`; releases saved as they are drawn, :mod:`.releases`; peak memory,
:mod:`.memory`; JSON records, :mod:`.records`), and markdown tables and plots of the cells
(:mod:`.report`)."""

from qem.experiments.config import ExperimentConfig, load_config, parse_config
from qem.experiments.registry import Registry, default_registry
from qem.experiments.report import write_report
from qem.experiments.runner import run_experiment

__all__ = [
    "ExperimentConfig",
    "Registry",
    "default_registry",
    "load_config",
    "parse_config",
    "run_experiment",
    "write_report",
]
