"""Helpers shared by the subcommands: output formatting, the privacy report's table, and saving
a run before anything after its release can fail. Imports no torch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qem.errors import SpentBudgetError
from qem.jsonfiles import json_text
from qem.report import PrivacyReport

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as a shell reports it)."""

EXPORT_RECIPE = (
    "model.eval(); torch.export.save(torch.export.export(model, (x,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'm.pt2') with x a batch of at least "
    "2 inputs"
)
"""How to write a ``.pt2`` that qem can fine-tune: eval mode, any batch size."""

LIST_HEAD, LIST_TAIL = 3, 2
"""A list longer than LIST_HEAD + LIST_TAIL + 1 numbers prints as its first LIST_HEAD, "...",
its last LIST_TAIL and its length."""


def print_json(obj: object) -> None:
    """Print one JSON object (NaN/inf are not valid JSON and are refused)."""
    print(json_text(obj))


def format_value(value: object) -> str:
    """Human formatting for tables: floats to 4 significant digits (integral ones as integers),
    lists of numbers to 3 significant digits each, long lists abbreviated."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and value and all(_is_number(v) for v in value):
        numbers = [f"{float(v):.3g}" for v in value]
        if len(numbers) > LIST_HEAD + LIST_TAIL + 1:
            shown = [*numbers[:LIST_HEAD], "...", *numbers[-LIST_TAIL:]]
            return f"{', '.join(shown)} ({len(numbers)} values)"
        return ", ".join(numbers)
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def print_table(rows: list[tuple[str, object]], title: str | None = None) -> None:
    """Print (name, value) rows as an aligned two-column table."""
    if title:
        print(title)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {format_value(value)}")


def report_rows(report: PrivacyReport) -> list[tuple[str, object]]:
    """The essentials of a privacy report as table rows (fields that do not apply to its mode
    are left out; the full report is privacy_report.json)."""
    schedule = report.schedule
    z = schedule.get("noise_multiplier")
    rows: list[tuple[str, object]] = [
        ("mode / adjacency", f"{report.mode} / {report.adjacency}"),
        ("epsilon", report.epsilon),
    ]
    if report.mode == "gdp":
        rows.append(("delta", report.delta))
    rows.append(("guarantee", report.guarantee))
    if report.mu is not None:
        rows.append(("mu (composed over rounds)", report.mu))
    rows += [
        (
            "schedule",
            f"{schedule['kind']}, {len(report.rounds)} round(s)"
            + ("" if z is None else f", noise multiplier z = {format_value(z)}"),
        ),
        ("N", report.N),
        ("clip norm C per round", report.C),
        ("step lengths (public line search)", report.step_lengths),
        ("subspace", f"{report.subspace['type']} k={report.k}"),
        ("curvature", f"{report.curvature['type']} gamma={format_value(report.gamma)}"),
        ("noise", report.noise["source"]),
    ]
    return rows


class ReleaseSaver:
    """Saves a run to ``out`` as soon as noise has been drawn, before anything else can fail
    (a spent budget is never lost): ``run(fine_tune, ...)`` passes itself as ``on_release``,
    saves every partial result and the final one, and on SpentBudgetError saves the partial
    result it carries and re-raises with the saved path in the message (on Ctrl-C too)."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out, self.overwrite, self.saved = Path(out), overwrite, False

    def __call__(self, result) -> None:
        result.save(self.out, overwrite=self.overwrite or self.saved)
        self.saved = True

    def run(self, fine_tune: Callable, *args, **kwargs):
        """``fine_tune(*args, on_release=self, **kwargs)``, its result saved. Ctrl-C re-raises
        KeyboardInterrupt with what was saved (the releases drawn so far, as a partial run)."""
        try:
            result = fine_tune(*args, on_release=self, **kwargs)
        except SpentBudgetError as error:
            self(error.result)
            raise SpentBudgetError(
                f"{error} The releases so far are saved in {self.out}.", error.result
            ) from error
        except KeyboardInterrupt:
            if not self.saved:
                raise KeyboardInterrupt(
                    "nothing was saved (it came before the first release was saved)"
                ) from None
            raise KeyboardInterrupt(
                f"the releases drawn so far are saved in {self.out} as a partial run (its "
                "report says PARTIAL RUN); rerunning spends the budget again"
            ) from None
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
