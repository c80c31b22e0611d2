"""Tables and plots of a finished (or partial) sweep, read from its cell files (the evaluation
protocol of README.md and docs/results.md).

``results.md``: per scenario, the test metric (accuracy or AUROC) as mean ± sample standard
deviation (ddof = 1) over seeds, rows = methods, columns = epsilon; the fine-tuning seconds
(one run of the chosen configuration) in the same layout; and the ratio of mean DP-SGD seconds
to mean qem seconds per epsilon. PNG plots (matplotlib, Agg canvas): a privacy-utility curve
per scenario (metric vs epsilon, log x, mean with a ±1 sd band; budget-free methods as
horizontal lines) and the mean fine-tuning seconds per method (bar chart, one panel per
scenario). When the run directory holds the sweep's ``config.json``, ``results.md`` says how
many of its cells are present and which are missing (:func:`cell_coverage`). matplotlib comes
with the optional extra ``qem[bench]`` and is imported when the first plot is drawn.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qem.errors import DataError
from qem.experiments.cells import plan_cells
from qem.experiments.config import load_config
from qem.experiments.runner import CELLS_DIR, CONFIG_FILE
from qem.extras import import_extra

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "results.md"
SECONDS_PLOT = "seconds.png"
TRADEOFF_PLOT = "metric_vs_seconds.png"
QEM_METHODS = ("qem", "qem_identity")
DPSGD_METHODS = ("dpsgd",)
NO_BUDGET = "no budget"
METRIC_TITLES = {"accuracy": "accuracy", "auroc": "AUROC"}
MISSING_LISTED = 10
"""How many missing cells :func:`cell_coverage` names before it just counts the rest."""


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (None for one value) of the finite values; ``failed``
    counts null values (a diverged run)."""

    mean: float
    sd: float | None
    n: int
    failed: int

    @classmethod
    def of(cls, values: list[float | None]) -> Summary | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        sd = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(statistics.fmean(finite), sd, len(finite), len(values) - len(finite))

    def format(self, digits: int, expected_n: int) -> str:
        """``mean ± sd``; ``(n=..)`` when the seeds found differ from ``expected_n``, ``(k
        null)`` when k of them have no finite value."""
        text = f"{self.mean:.{digits}f}"
        if self.sd is not None:
            text += f" ± {self.sd:.{digits}f}"
        if self.n + self.failed != expected_n:
            text += f" (n={self.n + self.failed})"
        if self.failed:
            text += f" ({self.failed} null)"
        return text


def read_cells(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every cell record in ``run_dir/cells`` (temporary files of unfinished writes skipped)."""
    directory = Path(run_dir) / CELLS_DIR
    paths = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
    if not paths:
        raise DataError(
            f"no cell files in {directory}; run `qem experiment run CONFIG --out {run_dir}` first."
        )
    return [json.loads(path.read_text()) for path in paths]


def write_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Write ``results.md``, ``privacy_utility_<scenario>.png`` and ``seconds.png`` into
    ``out_dir`` (default ``run_dir``) from the cells of ``run_dir``; returns the paths."""
    cells = read_cells(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenarios = sorted({cell["scenario"] for cell in cells})
    tables = [_Table([cell for cell in cells if cell["scenario"] == s]) for s in scenarios]
    plots = [out / f"privacy_utility_{table.scenario}.png" for table in tables]
    for table, plot in zip(tables, plots, strict=True):
        table.plot_privacy_utility(plot)
    seconds_plot = out / SECONDS_PLOT
    _plot_seconds(tables, seconds_plot)
    tradeoff_plot = out / TRADEOFF_PLOT
    _plot_metric_against_seconds(tables, tradeoff_plot)
    sections = [table.markdown(plot.name) for table, plot in zip(tables, plots, strict=True)]
    report = out / REPORT_FILE
    report.write_text(
        _preamble(Path(run_dir), seconds_plot.name, tradeoff_plot.name) + "\n".join(sections)
    )
    return [report, *plots, seconds_plot, tradeoff_plot]


def cell_coverage(run_dir: str | os.PathLike) -> str | None:
    """``"12 of 40 cells present; missing: <key>, ..."`` for the sweep whose ``config.json``
    is in ``run_dir`` (the first :data:`MISSING_LISTED` missing keys, then a count); None when
    there is no ``config.json`` to say what the whole sweep is."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        return None
    expected = [cell.key for cell in plan_cells(load_config(config_path))]
    present = {path.stem for path in (Path(run_dir) / CELLS_DIR).glob("*.json")}
    missing = [key for key in expected if key not in present]
    text = f"{len(expected) - len(missing)} of {len(expected)} cells present"
    if not missing:
        return text + "."
    listed = ", ".join(missing[:MISSING_LISTED])
    more = len(missing) - MISSING_LISTED
    return f"{text}; missing: {listed}" + (f" and {more} more." if more > 0 else ".")


class _Table:
    """The cells of one scenario, grouped by method label and epsilon (None = budget-free)."""

    def __init__(self, cells: list[dict[str, Any]]) -> None:
        self.scenario = cells[0]["scenario"]
        self.metric_name = cells[0]["metric_name"]
        self.synthetic = any(cell.get("synthetic") for cell in cells)
        self.epsilons = sorted({c["epsilon"] for c in cells if c["epsilon"] is not None})
        self.method_names = {c["method"]: c.get("method_name", c["method"]) for c in cells}
        private = {c["method"] for c in cells if c["epsilon"] is not None}
        free = sorted({c["method"] for c in cells if c["epsilon"] is None} - private)
        qem_first = sorted(private, key=lambda m: (self.method_names[m] not in QEM_METHODS, m))
        self.methods = qem_first + free
        self.budget_free = free
        self.seeds = len({c["seed"] for c in cells})
        self.deltas = sorted({c["delta"] for c in cells if c.get("delta") is not None})
        self.groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
        for cell in cells:
            self.groups.setdefault((cell["method"], cell["epsilon"]), []).append(cell)

    def color(self, method: str) -> str:
        """The same colour for a method in every plot of the scenario."""
        return f"C{self.methods.index(method) % 10}"

    def columns(self) -> list[float | None]:
        return [*self.epsilons, *([None] if self.budget_free else [])]

    def summary(self, method: str, epsilon: float | None, field: str) -> Summary | None:
        """``field`` (dotted path) of the cells of ``method`` at ``epsilon``, over seeds."""
        return Summary.of([_field(cell, field) for cell in self.groups.get((method, epsilon), [])])

    def pooled(self, method: str, field: str) -> Summary | None:
        """``field`` of every cell of ``method``, over all epsilons and seeds."""
        group = [c for (m, _), cells in self.groups.items() if m == method for c in cells]
        return Summary.of([_field(cell, field) for cell in group])

    def _rows(self, field: str, digits: int) -> list[str]:
        header = ["method", *(_column_name(eps) for eps in self.columns())]
        lines = [_row(header), _row(["---"] * len(header))]
        for method in self.methods:
            entries = []
            for eps in self.columns():
                summary = self.summary(method, eps, field)
                runs = len(self.groups.get((method, eps), []))
                if summary is not None:
                    entries.append(summary.format(digits, self.seeds))
                else:
                    entries.append(f"— ({runs} null)" if runs else "—")
            lines.append(_row([method, *entries]))
        return lines

    def ratios(self) -> list[tuple[str, list[float | None]]]:
        """(``dpsgd_label / qem_label``, mean-seconds ratio per epsilon) for every pair."""
        dpsgd = [m for m in self.methods if self.method_names[m] in DPSGD_METHODS]
        qem = [m for m in self.methods if self.method_names[m] in QEM_METHODS]
        rows = []
        for numerator in dpsgd:
            for denominator in qem:
                ratios = []
                for eps in self.epsilons:
                    top = self.summary(numerator, eps, "seconds.fine_tune")
                    bottom = self.summary(denominator, eps, "seconds.fine_tune")
                    ok = top is not None and bottom is not None and bottom.mean > 0
                    ratios.append(top.mean / bottom.mean if ok else None)
                rows.append((f"{numerator} / {denominator}", ratios))
        return rows

    def markdown(self, plot_name: str) -> str:
        title = f"## {self.scenario}"
        if self.synthetic:
            title += " (SYNTHETIC data: not a result on real data)"
        metric = METRIC_TITLES.get(self.metric_name, self.metric_name)
        lines = [title, "", f"### Test {metric}", "", *self._rows("metric", 4)]
        lines += ["", "### Fine-tuning seconds", "", *self._rows("seconds.fine_tune", 2)]
        if any(
            _field(c, "budget_spent_by_tuning.releases") for g in self.groups.values() for c in g
        ):
            lines += [
                "",
                "### Budget spent by tuning (epsilon at the cell's delta, all grid points)",
                "",
                "Each grid point is a release on the private data; the chosen one's epsilon "
                "(the column) is not the whole cost. Composed by dp-accounting's PLD accountant.",
                "",
                *self._rows("budget_spent_by_tuning.epsilon", 3),
            ]
        ratios = self.ratios()
        if ratios:
            header = ["ratio", *(_column_name(eps) for eps in self.epsilons)]
            lines += ["", "### Seconds ratio DP-SGD / qem", "", _row(header)]
            lines.append(_row(["---"] * len(header)))
            for name, values in ratios:
                lines.append(_row([name, *("—" if v is None else f"{v:.2f}" for v in values)]))
        lines += ["", f"![privacy-utility curve, {self.scenario}]({plot_name})", ""]
        return "\n".join(lines)

    def plot_privacy_utility(self, path: Path) -> None:
        figure = _figure((6.4, 4.4))
        axes = figure.add_subplot()
        for method in self.methods:
            if method in self.budget_free:
                summary = self.summary(method, None, "metric")
                if summary is None:
                    continue
                color = self.color(method)
                axes.axhline(summary.mean, color=color, linestyle="--", label=method)
                if summary.sd is not None:
                    low, high = summary.mean - summary.sd, summary.mean + summary.sd
                    axes.axhspan(low, high, color=color, alpha=0.12)
                continue
            points = [(eps, self.summary(method, eps, "metric")) for eps in self.epsilons]
            points = [(eps, s) for eps, s in points if s is not None]
            if not points:
                continue
            x = [eps for eps, _ in points]
            mean = [s.mean for _, s in points]
            sd = [s.sd or 0.0 for _, s in points]
            axes.plot(x, mean, marker="o", color=self.color(method), label=method)
            low = [m - d for m, d in zip(mean, sd, strict=True)]
            high = [m + d for m, d in zip(mean, sd, strict=True)]
            axes.fill_between(x, low, high, color=self.color(method), alpha=0.2)
        axes.set_xscale("log")
        if self.epsilons:
            axes.set_xticks(self.epsilons, [f"{eps:g}" for eps in self.epsilons])
            axes.minorticks_off()
        delta = ", ".join(f"{d:g}" for d in self.deltas)
        axes.set_xlabel(f"epsilon (delta = {delta})" if delta else "epsilon")
        axes.set_ylabel(f"test {METRIC_TITLES.get(self.metric_name, self.metric_name)}")
        title = f"{self.scenario}: mean ± sd over {self.seeds} seed(s)"
        axes.set_title(title + (" [SYNTHETIC]" if self.synthetic else ""))
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(path, dpi=120)


def _figure(size: tuple[float, float]) -> Figure:
    """A matplotlib Figure (Agg canvas, no display) of ``size`` inches; MissingExtraError naming
    ``qem[bench]`` without matplotlib."""
    figure_module = import_extra("matplotlib.figure", "bench", "the plots of an experiment report")
    return figure_module.Figure(figsize=size)


def _plot_seconds(tables: list[_Table], path: Path) -> None:
    """Mean fine-tuning seconds per method over all epsilons and seeds, ±1 sd error bars."""
    figure = _figure((4.8 * len(tables), 4.0))
    for index, table in enumerate(tables, start=1):
        axes = figure.add_subplot(1, len(tables), index)
        values = [table.pooled(method, "seconds.fine_tune") for method in table.methods]
        means = [v.mean if v else 0.0 for v in values]
        errors = [(v.sd or 0.0) if v else 0.0 for v in values]
        colors = [table.color(method) for method in table.methods]
        bars = axes.bar(table.methods, means, yerr=errors, capsize=3, color=colors)
        axes.bar_label(bars, labels=[f"{m:.3g}" for m in means], fontsize="small")
        axes.set_ylabel("fine-tuning seconds")
        axes.set_title(table.scenario)
        axes.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_metric_against_seconds(tables: list[_Table], path: Path) -> None:
    """Test metric against fine-tuning seconds: one point per method and epsilon (mean over
    seeds), so that accuracy and cost are read side by side."""
    figure = _figure((4.8 * len(tables), 4.0))
    for index, table in enumerate(tables, start=1):
        axes = figure.add_subplot(1, len(tables), index)
        for method in table.methods:
            points = [
                (
                    table.summary(method, eps, "seconds.fine_tune"),
                    table.summary(method, eps, "metric"),
                )
                for eps in table.columns()
            ]
            points = [(x.mean, y.mean) for x, y in points if x is not None and y is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.scatter(xs, ys, color=table.color(method), label=method)
        axes.set_xlabel("fine-tuning seconds")
        axes.set_ylabel(f"test {METRIC_TITLES.get(table.metric_name, table.metric_name)}")
        axes.set_title(table.scenario + (" [SYNTHETIC]" if table.synthetic else ""))
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _preamble(run_dir: Path, seconds_plot: str, tradeoff_plot: str) -> str:
    config = run_dir / CONFIG_FILE
    name = json.loads(config.read_text())["name"] if config.is_file() else run_dir.name
    coverage = cell_coverage(run_dir)
    return (
        f"# Experiment results: {name}\n\n"
        + (f"{coverage}\n\n" if coverage else "")
        + "Test metric as mean ± sample standard deviation over seeds (no ± with one seed). "
        "Each method's hyperparameters were chosen on the public validation split, never on "
        "the test set; but each grid point was a release on the private data, so in reality "
        "the tuning spends privacy beyond the epsilon shown (see qem.experiments.runner). "
        f"Methods under '{NO_BUDGET}' spend no budget (non-private fine-tuning, no "
        "fine-tuning). Seconds: one fine-tuning run of the chosen configuration.\n\n"
        f"![fine-tuning seconds per method]({seconds_plot})\n\n"
        f"![test metric against fine-tuning seconds]({tradeoff_plot})\n\n"
    )


def _field(cell: dict[str, Any], dotted: str) -> float | None:
    value: Any = cell
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _column_name(epsilon: float | None) -> str:
    return NO_BUDGET if epsilon is None else f"ε = {epsilon:g}"


def _row(entries: list[str]) -> str:
    return "| " + " | ".join(entries) + " |"
