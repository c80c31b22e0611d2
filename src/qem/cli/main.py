"""Entry point of the ``qem`` command: dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from qem import __version__
from qem.cli import audit, demo, experiment, finetune, preview
from qem.errors import QemError

SUBCOMMANDS = (preview, finetune, demo, experiment, audit)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qem`` with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="qem",
        description=(
            "Differentially private fine-tuning by exact sampling from a quadratic "
            "exponential mechanism. Start with `qem preview` to see what a budget buys, "
            "or `qem demo mnist` (`qem demo mimic` for the clinical task)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"qem {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``qem``; a QemError becomes a one-line message and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except QemError as error:
        print(f"qem {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
