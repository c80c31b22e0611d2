"""``qem experiment``: privacy-utility sweeps (DESIGN.md §5).

``qem experiment run CONFIG`` runs every scenario x method x epsilon x seed cell of a JSON
config (resuming an interrupted sweep); ``qem experiment report DIR`` writes the markdown
tables and PNG plots of a run directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qem.experiments.config import load_config
from qem.experiments.report import write_report
from qem.experiments.runner import RESULTS_FILE, run_experiment


def add_parser(subparsers) -> None:
    """Register ``qem experiment run`` and ``qem experiment report``."""
    parser = subparsers.add_parser(
        "experiment",
        help="run privacy-utility sweeps and report them as tables and plots",
        description=(
            "Sweep scenarios x methods x epsilons x seeds from a JSON config (see "
            "configs/smoke.json); each cell is one JSON file, so rerunning resumes."
        ),
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    run_parser = actions.add_parser(
        "run",
        help="run (or resume) the sweep of a config",
        description=(
            "Hyperparameters are chosen per cell on the public validation split; note that "
            "each grid point is a release on the private data, so the tuning itself spends "
            "privacy beyond the cell's epsilon unless it uses public data only."
        ),
    )
    run_parser.add_argument("config", help="JSON config file")
    run_parser.add_argument("--out", help="run directory (default runs/<config name>)")
    run_parser.add_argument(
        "--cache-dir", help="pretrained-model cache (default .qem_cache in the current directory)"
    )
    run_parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run_parser.set_defaults(handler=run)

    report_parser = actions.add_parser(
        "report",
        help="write results.md and PNG plots from a run directory",
        description="Tables (mean ± sd over seeds) and plots from the cells of a run directory.",
    )
    report_parser.add_argument("run_dir", metavar="DIR", help="run directory of `experiment run`")
    report_parser.add_argument("--out", help="output directory (default DIR)")
    report_parser.set_defaults(handler=report)


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print where its results are."""
    config = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / config.name
    results = run_experiment(config, out, progress=not args.no_progress, cache_dir=args.cache_dir)
    print(f"{len(results)} cells in {out / 'cells'}; summary in {out / RESULTS_FILE}")
    print(f"tables and plots: qem experiment report {out}")
    return 0


def report(args: argparse.Namespace) -> int:
    """Write the tables and plots and print their paths."""
    for path in write_report(args.run_dir, args.out):
        print(path)
    return 0
