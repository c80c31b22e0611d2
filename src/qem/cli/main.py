"""Entry point of the ``qem`` command: dispatches to one module per subcommand.

Only the module of the subcommand being run is imported (qem.cli.commands lists them), so
``qem --help`` and ``qem preview`` start without torch, pandas or scipy.stats."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qem import __version__
from qem.cli.commands import COMMANDS
from qem.cli.common import INTERRUPTED
from qem.cli.options import cli_spelling
from qem.errors import QemError

LOG_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
"""Level of the ``qem`` logger for 0, 1 and 2 or more ``-v``."""


def invoked_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (no option of
    ``qem`` itself takes a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``qem``. Every subcommand is listed with its summary; only
    ``command``'s module is imported to declare its arguments."""
    parser = argparse.ArgumentParser(
        prog="qem",
        description=(
            "Differentially private fine-tuning by exact sampling from a quadratic "
            "exponential mechanism. Start with `qem preview` to see what a budget buys, "
            "or `qem demo mnist` (`qem demo mimic` for the clinical task)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"qem {__version__}")
    add_verbosity(parser, default=0)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        if entry.name == command:
            importlib.import_module(entry.module).add_parser(subparsers)
            for leaf in _leaf_parsers(subparsers.choices[entry.name]):
                add_verbosity(leaf, default=argparse.SUPPRESS)
        else:
            subparsers.add_parser(entry.name, help=entry.summary)
    return parser


def add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """-v/--verbose: -v logs each round's public summary (INFO), -vv diagnostics (DEBUG)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log each round's summary (-v) and diagnostics such as timings (-vv) to stderr",
    )


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser``, or the parsers of its sub-subcommands (``qem demo mnist``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [leaf for child in action.choices.values() for leaf in _leaf_parsers(child)]
    return [parser]


class _TqdmHandler(logging.Handler):
    """Writes log lines to stderr above any progress bar (tqdm.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(verbosity: int) -> None:
    """Send the ``qem`` logger's records at the chosen level to stderr (once per process)."""
    logger = logging.getLogger("qem")
    logger.setLevel(LOG_LEVELS[min(verbosity, len(LOG_LEVELS) - 1)])
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run ``qem``; a QemError becomes a one-line message in the command line's spellings
    (options, not keywords) and exit status 2; Ctrl-C a one-line message (what the command
    saved, when it says) and exit status 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(invoked_command(argv)).parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except QemError as error:
        print(f"qem {args.command}: error: {cli_spelling(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        said = f": {interrupt}" if str(interrupt) else "."
        print(f"\nqem {args.command}: interrupted{said}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
