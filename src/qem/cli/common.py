"""Helpers shared by the subcommands: privacy-budget arguments and output formatting."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qem.errors import SpentBudgetError


def add_budget_arguments(parser: argparse.ArgumentParser, epsilon: float | None = None) -> None:
    """--epsilon, --delta, --mode, --adjacency, --clipping."""
    group = parser.add_argument_group("privacy budget")
    group.add_argument(
        "--epsilon",
        type=float,
        required=epsilon is None,
        default=epsilon,
        help="target epsilon (> 0)" + ("" if epsilon is None else f"; default {epsilon}"),
    )
    group.add_argument(
        "--delta",
        type=float,
        default=1e-5,
        help="target delta in (0, 1), Gaussian-DP mode only; default 1e-5",
    )
    group.add_argument(
        "--mode",
        choices=("gdp", "pure"),
        default="gdp",
        help="gdp: Gaussian DP, unbounded domain (default); pure: eps-DP on the "
        "ball ||w||_A <= R by exact rejection sampling",
    )
    group.add_argument(
        "--adjacency",
        choices=("replace_one", "add_remove"),
        default="replace_one",
        help="neighbouring datasets (default replace_one)",
    )
    group.add_argument(
        "--clipping",
        choices=("dual", "euclidean"),
        default="dual",
        help="norm for per-example gradient clipping (default dual ||g||_{A^-1})",
    )


def print_json(obj: object) -> None:
    """Print one JSON object (NaN/inf are not valid JSON and are refused)."""
    print(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))


def format_value(value: object) -> str:
    """Compact human formatting of numbers for tables."""
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return str(value)
        if 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.4e}"
    return str(value)


def print_table(rows: list[tuple[str, object]], title: str | None = None) -> None:
    """Print (name, value) rows as an aligned two-column table."""
    if title:
        print(title)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {format_value(value)}")


class ReleaseSaver:
    """Saves a run to ``out`` as soon as noise has been drawn, before anything else can fail
    (a spent budget is never lost): ``run(fine_tune, ...)`` passes itself as ``on_release``,
    saves every partial result and the final one, and on SpentBudgetError saves the partial
    result it carries and re-raises with the saved path in the message."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out, self.overwrite, self.saved = Path(out), overwrite, False

    def __call__(self, result) -> None:
        result.save(self.out, overwrite=self.overwrite or self.saved)
        self.saved = True

    def run(self, fine_tune: Callable, *args, **kwargs):
        """``fine_tune(*args, on_release=self, **kwargs)``, its result saved."""
        try:
            result = fine_tune(*args, on_release=self, **kwargs)
        except SpentBudgetError as error:
            self(error.result)
            raise SpentBudgetError(
                f"{error} The releases so far are saved in {self.out}.", error.result
            ) from error
        self(result)
        return result

    @contextmanager
    def after_release(self, what: str) -> Iterator[None]:
        """Report a failure after the release together with where the release was saved."""
        try:
            yield
        except Exception as error:
            print(
                f"qem: {what} failed after the private release ({error}); the fine-tuned model "
                f"and its privacy report are saved in {self.out}.",
                file=sys.stderr,
            )
            raise
