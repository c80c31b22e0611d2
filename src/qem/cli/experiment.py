"""``qem experiment``: privacy-utility sweeps of the evaluation protocol (README).

``qem experiment run CONFIG`` runs every scenario x method x epsilon x seed cell of a JSON
config (resuming an interrupted sweep; Ctrl-C prints the command that resumes it and exits
with status 130); ``qem experiment report DIR`` writes the markdown tables and PNG plots of a
run directory and says which cells of the sweep are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from qem.cli.commands import summary
from qem.cli.common import INTERRUPTED
from qem.experiments.config import load_config
from qem.experiments.report import cell_coverage, write_report
from qem.experiments.runner import CELLS_DIR, RESULTS_FILE, run_experiment


def add_parser(subparsers) -> None:
    """Register ``qem experiment run`` and ``qem experiment report``."""
    parser = subparsers.add_parser(
        "experiment",
        help=summary("experiment"),
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
        "--cache-dir",
        help="pretrained-model cache (default $QEM_CACHE_DIR, else the user cache directory, "
        "~/.cache/qem on Linux)",
    )
    run_parser.add_argument(
        "--reproducible",
        action="store_true",
        help="seed each release's noise from its cell and grid point (as the config's "
        '"reproducible": true), so that a rerun gives the same numbers; for debugging only: '
        "anyone with the config knows the noise (default: operating-system entropy)",
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
    """Run the sweep and print where its results are; on Ctrl-C, how to resume it."""
    config = load_config(args.config)
    if args.reproducible:
        config = dataclasses.replace(config, reproducible=True)
    out = Path(args.out) if args.out else Path("runs") / config.name
    try:
        results = run_experiment(
            config, out, progress=not args.no_progress, cache_dir=args.cache_dir
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the finished cells are kept in {out / CELLS_DIR}. Resume with:\n"
            f"  {resume_command(args, out)}",
            file=sys.stderr,
        )
        return INTERRUPTED
    print(f"{len(results)} cells in {out / CELLS_DIR}; summary in {out / RESULTS_FILE}")
    print(f"tables and plots: qem experiment report {out}")
    return 0


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The ``qem experiment run`` command line that continues the interrupted sweep."""
    words = ["qem", "experiment", "run", args.config, "--out", str(out)]
    if args.cache_dir:
        words += ["--cache-dir", args.cache_dir]
    if args.reproducible:
        words.append("--reproducible")
    if args.no_progress:
        words.append("--no-progress")
    return shlex.join(words)


def report(args: argparse.Namespace) -> int:
    """Write the tables and plots, print their paths and which cells are missing."""
    for path in write_report(args.run_dir, args.out):
        print(path)
    print(
        cell_coverage(args.run_dir)
        or "no config.json in the run directory: cannot tell which cells of the sweep are missing"
    )
    return 0
