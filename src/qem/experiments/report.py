"""Tables and plots of a finished (or partial) sweep, read from its cell files (the evaluation
protocol of README.md and docs/results.md).

``results.md``, per scenario (rows = methods, columns = epsilon; "no budget" for the methods that
spend none):

* the test metric (accuracy or AUROC) as mean ± sample standard deviation (ddof = 1) over
  seeds, with the standard error that the test set's size alone puts on one value
  (:func:`metric_standard_error`), so that a spread can be read against it;
* the median fine-tuning seconds over seeds (one run of the chosen configuration);
* for qem, the fraction of its rounds whose line-searched step was 0 (mean over seeds);
* the tuning each cell's choice came from: at which epsilon its grid was tuned, how many grid
  points it had and what they spent together (cells of a sweep with a ``tuning`` spec);
* the budget each cell spent with its tuning included (its release and every grid release
  composed by dp-accounting's PLD accountant), where that differs from the column's epsilon;
* the ratio of median DP-SGD seconds to median qem seconds per epsilon.

A final section lists every tuning grid point with its public validation metric, and the point
chosen (from ``tuning/`` of a sweep with a ``tuning`` spec). PNG plots (matplotlib, Agg canvas):
a privacy-utility curve per scenario (metric vs epsilon, log x, mean with a ±1 sd band;
budget-free methods as horizontal lines), the median fine-tuning seconds per method over all
epsilons and seeds, and the test metric against seconds with each point labelled by its
epsilon. ``summary.json`` holds the numbers of the tables, one entry per scenario, method and
epsilon. When the run directory holds the sweep's ``config.json``, ``results.md`` says how many
of its cells are present and which are missing (:func:`cell_coverage`). matplotlib comes with
the optional extra ``qem[bench]`` and is imported when the first plot is drawn.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qem.errors import DataError
from qem.experiments.cells import plan_cells, plan_tuning_cells
from qem.experiments.config import load_config
from qem.experiments.runner import CELLS_DIR, CONFIG_FILE, TUNING_DIR
from qem.extras import import_extra
from qem.jsonfiles import write_json_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "results.md"
SUMMARY_FILE = "summary.json"
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
    """Mean, sample standard deviation (None for one value) and median of the finite values;
    ``failed`` counts null values (a diverged run)."""

    mean: float
    sd: float | None
    median: float
    n: int
    failed: int

    @classmethod
    def of(cls, values: list[float | None]) -> Summary | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        sd = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(
            statistics.fmean(finite),
            sd,
            statistics.median(finite),
            len(finite),
            len(values) - len(finite),
        )

    def format(self, digits: int, expected_n: int) -> str:
        """``mean ± sd``; ``(n=..)`` when the seeds found differ from ``expected_n``, ``(k
        null)`` when k of them have no finite value."""
        text = f"{self.mean:.{digits}f}"
        if self.sd is not None:
            text += f" ± {self.sd:.{digits}f}"
        return text + self._notes(expected_n)

    def format_median(self, digits: int, expected_n: int) -> str:
        """The median, with the notes of :meth:`format`."""
        return f"{self.median:.{digits}f}" + self._notes(expected_n)

    def _notes(self, expected_n: int) -> str:
        text = ""
        if self.n + self.failed != expected_n:
            text += f" (n={self.n + self.failed})"
        if self.failed:
            text += f" ({self.failed} null)"
        return text


def metric_standard_error(
    metric: str, value: float, class_counts: list[int] | None
) -> float | None:
    """The standard error that a test set of these class counts puts on one value of
    ``metric``: accuracy sqrt(p (1 - p) / n) (binomial); AUROC A by Hanley & McNeil (1982),
    SE^2 = (A(1-A) + (n1-1)(Q1-A^2) + (n0-1)(Q2-A^2)) / (n1 n0), Q1 = A/(2-A),
    Q2 = 2A^2/(1+A), with n1 positives and n0 negatives. None without class counts."""
    if not class_counts or not math.isfinite(value):
        return None
    if metric == "accuracy":
        return math.sqrt(value * (1 - value) / sum(class_counts))
    if metric == "auroc" and len(class_counts) == 2 and min(class_counts) > 0:
        n0, n1 = class_counts
        q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
        variance = value * (1 - value) + (n1 - 1) * (q1 - value**2) + (n0 - 1) * (q2 - value**2)
        return math.sqrt(max(variance, 0.0) / (n1 * n0))
    return None


def read_cells(run_dir: str | os.PathLike, directory: str = CELLS_DIR) -> list[dict[str, Any]]:
    """Every cell record in ``run_dir/<directory>`` (temporary files of unfinished writes
    skipped); DataError when there is none in ``cells``, [] when there is none in another."""
    folder = Path(run_dir) / directory
    paths = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
    if not paths and directory == CELLS_DIR:
        raise DataError(
            f"no cell files in {folder}; run `qem experiment run CONFIG --out {run_dir}` first."
        )
    return [json.loads(path.read_text()) for path in paths]


def write_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Write ``results.md``, ``summary.json``, ``privacy_utility_<scenario>.png``,
    ``seconds.png`` and ``metric_vs_seconds.png`` into ``out_dir`` (default ``run_dir``) from
    the cells of ``run_dir``; returns the paths."""
    cells = read_cells(run_dir)
    tuning_cells = read_cells(run_dir, TUNING_DIR)
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
    if tuning_cells:
        sections.append(tuning_markdown(tuning_cells))
    report = out / REPORT_FILE
    report.write_text(
        _preamble(Path(run_dir), seconds_plot.name, tradeoff_plot.name) + "\n".join(sections)
    )
    summary = out / SUMMARY_FILE
    write_json_atomic(summary, [entry for table in tables for entry in table.summary_entries()])
    return [report, summary, *plots, seconds_plot, tradeoff_plot]


def cell_coverage(run_dir: str | os.PathLike) -> str | None:
    """``"12 of 40 cells present; missing: <key>, ..."`` for the sweep whose ``config.json``
    is in ``run_dir`` (the first :data:`MISSING_LISTED` missing keys, then a count; tuning
    cells counted apart); None when there is no ``config.json`` to say what the whole sweep
    is."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = load_config(config_path)
    expected = [cell.key for cell in plan_cells(config)]
    present = {path.stem for path in (Path(run_dir) / CELLS_DIR).glob("*.json")}
    missing = [key for key in expected if key not in present]
    text = f"{len(expected) - len(missing)} of {len(expected)} cells present"
    tuning = [cell.key for cell in plan_tuning_cells(config)]
    if tuning:
        tuned = {path.stem for path in (Path(run_dir) / TUNING_DIR).glob("*.json")}
        text += f" ({sum(key in tuned for key in tuning)} of {len(tuning)} tuning cells)"
    if not missing:
        return text + "."
    listed = ", ".join(missing[:MISSING_LISTED])
    more = len(missing) - MISSING_LISTED
    return f"{text}; missing: {listed}" + (f" and {more} more." if more > 0 else ".")


def zero_step_fraction(cell: dict[str, Any]) -> float | None:
    """The fraction of a qem cell's rounds whose line-searched step length was 0 (its report's
    ``zero_step_rounds`` over its rounds); None for a method without step lengths."""
    report = cell.get("report") or {}
    steps = report.get("step_lengths")
    if not isinstance(steps, list) or not steps or "zero_step_rounds" not in report:
        return None
    return report["zero_step_rounds"] / len(steps)


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
        self.private_methods = qem_first
        self.budget_free = free
        self.seeds = len({c["seed"] for c in cells})
        self.deltas = sorted({c["delta"] for c in cells if c.get("delta") is not None})
        self.class_counts = next(
            (c["test_class_counts"] for c in cells if c.get("test_class_counts")), None
        )
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
        return self.summary_of(method, epsilon, lambda cell: _field(cell, field))

    def summary_of(
        self, method: str, epsilon: float | None, value: Callable[[dict[str, Any]], Any]
    ) -> Summary | None:
        """``value(cell)`` over the seeds of ``method`` at ``epsilon``."""
        return Summary.of([value(cell) for cell in self.groups.get((method, epsilon), [])])

    def pooled(self, method: str, field: str) -> Summary | None:
        """``field`` of every cell of ``method``, over all epsilons and seeds."""
        group = [c for (m, _), cells in self.groups.items() if m == method for c in cells]
        return Summary.of([_field(cell, field) for cell in group])

    def _rows(
        self,
        entry: Callable[[str, float | None], str],
        methods: list[str] | None = None,
        columns: list[float | None] | None = None,
    ) -> list[str]:
        """A markdown table: one row per method, one column per epsilon, ``entry(method,
        epsilon)`` in each; "—" where the method has no cell."""
        columns = self.columns() if columns is None else columns
        header = ["method", *(_column_name(eps) for eps in columns)]
        lines = [_row(header), _row(["---"] * len(header))]
        for method in self.methods if methods is None else methods:
            entries = [
                entry(method, eps) if self.groups.get((method, eps)) else "—" for eps in columns
            ]
            lines.append(_row([method, *entries]))
        return lines

    def _summary_entry(
        self, value: Callable[[dict[str, Any]], Any], digits: int, median: bool = False
    ) -> Callable[[str, float | None], str]:
        def entry(method: str, epsilon: float | None) -> str:
            summary = self.summary_of(method, epsilon, value)
            if summary is None:
                return f"— ({len(self.groups[(method, epsilon)])} null)"
            if median:
                return summary.format_median(digits, self.seeds)
            return summary.format(digits, self.seeds)

        return entry

    def _tuning_entry(self, method: str, epsilon: float | None) -> str:
        """Where a cell's choice came from: "ε 1: 12 points, ε 3.41 together"."""
        tunings = [c.get("tuning") for c in self.groups[(method, epsilon)]]
        if not any(tunings):
            points = {len(c.get("grid_scores") or []) for c in self.groups[(method, epsilon)]}
            return f"own grid: {max(points)} points" if max(points) > 1 else "no grid"
        tuning = next(t for t in tunings if t)
        spent = (tuning.get("budget") or {}).get("epsilon")
        text = f"ε {tuning['epsilon']:g}: {tuning['grid_points']} points"
        return text + (f", ε {spent:.3g} together" if spent is not None else "")

    def _spent_entry(self, method: str, epsilon: float | None) -> str:
        summary = self.summary(method, epsilon, "budget_spent_by_tuning.epsilon")
        if summary is None:
            return "not accounted"
        if summary.sd is None or summary.sd < 5e-4:  # the same every seed: no ± 0.000
            return f"{summary.mean:.3f}" + summary._notes(self.seeds)
        return summary.format(3, self.seeds)

    def ratios(self) -> list[tuple[str, list[float | None]]]:
        """(``dpsgd_label / qem_label``, median-seconds ratio per epsilon) for every pair."""
        dpsgd = [m for m in self.methods if self.method_names[m] in DPSGD_METHODS]
        qem = [m for m in self.methods if self.method_names[m] in QEM_METHODS]
        rows = []
        for numerator in dpsgd:
            for denominator in qem:
                ratios = []
                for eps in self.epsilons:
                    top = self.summary(numerator, eps, "seconds.fine_tune")
                    bottom = self.summary(denominator, eps, "seconds.fine_tune")
                    ok = top is not None and bottom is not None and bottom.median > 0
                    ratios.append(top.median / bottom.median if ok else None)
                rows.append((f"{numerator} / {denominator}", ratios))
        return rows

    def standard_error_note(self) -> str:
        """What the test set's size alone puts on one value, at the pretrained model's
        metric (or the mean of all cells without a "none" method)."""
        reference = self.summary("none", None, "metric") or Summary.of(
            [c["metric"] for cells in self.groups.values() for c in cells]
        )
        if reference is None or self.class_counts is None:
            return ""
        error = metric_standard_error(self.metric_name, reference.mean, self.class_counts)
        if error is None:
            return ""
        counts = ", ".join(f"{n:,}" for n in self.class_counts)
        kind = "binomial" if self.metric_name == "accuracy" else "Hanley-McNeil"
        return (
            f"Test set: {sum(self.class_counts):,} examples (per class: {counts}); the "
            f"{kind} standard error of one test {METRIC_TITLES.get(self.metric_name)} at "
            f"{reference.mean:.4f} is {error:.4f}. It is the same test set for every cell, so "
            "it shifts all methods alike; the ± is the spread over seeds (noise draws)."
        )

    def markdown(self, plot_name: str) -> str:
        title = f"## {self.scenario}"
        if self.synthetic:
            title += " (SYNTHETIC data: not a result on real data)"
        metric = METRIC_TITLES.get(self.metric_name, self.metric_name)
        lines = [title, "", f"### Test {metric}", ""]
        note = self.standard_error_note()
        lines += [note, ""] if note else []
        lines += self._rows(self._summary_entry(lambda c: c["metric"], 4))
        lines += ["", "### Fine-tuning seconds", "", "Median over seeds.", ""]
        lines += self._rows(self._summary_entry(lambda c: c["seconds"]["fine_tune"], 2, True))
        qem = [m for m in self.private_methods if self.method_names[m] in QEM_METHODS]
        if any(zero_step_fraction(c) is not None for m in qem for c in self._cells(m)):
            lines += ["", "### Rounds with step 0", ""]
            lines += [
                "Fraction of qem's rounds whose public line search kept step length 0 (its "
                "release bought nothing), mean ± sd over seeds.",
                "",
            ]
            lines += self._rows(self._summary_entry(zero_step_fraction, 2), qem, self.epsilons)
        tuned = [m for m in self.private_methods if any(c.get("tuning") for c in self._cells(m))]
        if tuned:
            lines += ["", "### Tuning behind each column", ""]
            lines += [
                "The grid whose public-validation choice the column ran: the epsilon it was "
                "tuned at (one seed), its number of points, and what those releases spent "
                "together on the private data (PLD); the chosen points are listed in the "
                "tuning section at the end.",
                "",
            ]
            lines += self._rows(self._tuning_entry, tuned, self.epsilons)
        spent = [
            m
            for m in self.private_methods
            if any((_field(c, "budget_spent_by_tuning.releases") or 0) > 1 for c in self._cells(m))
        ]
        if spent:
            lines += ["", "### Budget spent, tuning included", ""]
            lines += [
                "Epsilon (at the cell's delta) of the cell's release and every tuning release "
                "composed by dp-accounting's PLD accountant: the real cost of the column's "
                "result, of which the column's epsilon is only the last release.",
                "",
            ]
            lines += self._rows(self._spent_entry, spent, self.epsilons)
        ratios = self.ratios()
        if ratios:
            header = ["ratio", *(_column_name(eps) for eps in self.epsilons)]
            lines += ["", "### Seconds ratio DP-SGD / qem", "", "Of the median seconds.", ""]
            lines += [_row(header), _row(["---"] * len(header))]
            for name, values in ratios:
                lines.append(_row([name, *("—" if v is None else f"{v:.2f}" for v in values)]))
        lines += ["", f"![privacy-utility curve, {self.scenario}]({plot_name})", ""]
        return "\n".join(lines)

    def _cells(self, method: str) -> list[dict[str, Any]]:
        return [c for (m, _), cells in self.groups.items() if m == method for c in cells]

    def summary_entries(self) -> list[dict[str, Any]]:
        """One entry per method and column, with the numbers of the tables."""
        entries = []
        for method in self.methods:
            for epsilon in self.columns():
                cells = self.groups.get((method, epsilon))
                if not cells:
                    continue
                metric = self.summary(method, epsilon, "metric")
                seconds = self.summary(method, epsilon, "seconds.fine_tune")
                zero = self.summary_of(method, epsilon, zero_step_fraction)
                spent = self.summary(method, epsilon, "budget_spent_by_tuning.epsilon")
                tuning = next((c["tuning"] for c in cells if c.get("tuning")), None)
                entries.append(
                    {
                        "scenario": self.scenario,
                        "method": method,
                        "epsilon": epsilon,
                        "seeds": len(cells),
                        "metric_name": self.metric_name,
                        "metric_mean": metric and metric.mean,
                        "metric_sd": metric and metric.sd,
                        "metric_null": len(cells) - (metric.n if metric else 0),
                        "metric_standard_error_of_test_set": metric
                        and metric_standard_error(self.metric_name, metric.mean, self.class_counts),
                        "seconds_median": seconds and seconds.median,
                        "zero_step_fraction_mean": zero and zero.mean,
                        "tuning": tuning,
                        "epsilon_spent_with_tuning": spent and spent.mean,
                    }
                )
        return entries

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


def tuning_markdown(cells: list[dict[str, Any]]) -> str:
    """Every tuning grid point's public validation metric and seconds, the point chosen, and
    what each grid spent (its releases composed by PLD)."""
    lines = ["## Tuning grids (public validation split)", ""]
    lines += [
        "Each grid ran once per tuning epsilon, at one seed, on the private training data; the "
        "point with the best public validation metric was chosen (ties: the first) and serves "
        "the epsilons nearest to its tuning epsilon on a log scale.",
        "",
        "| scenario | method | tuned at ε | grid point | validation metric | seconds | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(cells, key=lambda c: (c["scenario"], c["method"], c["epsilon"]))
    for cell in order:
        for entry in cell["grid_scores"]:
            point = entry["hyperparameters"]
            picked = all(cell["hyperparameters"].get(k) == v for k, v in point.items())
            metric = entry["valid_metric"]
            lines.append(
                _row(
                    [
                        cell["scenario"],
                        cell["method"],
                        f"{cell['epsilon']:g}",
                        ", ".join(f"{k} = {short_value(v)}" for k, v in point.items()),
                        "null" if metric is None else f"{metric:.4f}",
                        f"{entry['seconds']:.1f}",
                        "yes" if picked else "",
                    ]
                )
            )
    lines += ["", "What each grid spent (all its points composed, PLD):", ""]
    for cell in order:
        spent = cell.get("budget_spent_by_tuning") or {}
        if spent.get("epsilon") is not None:
            lines.append(
                f"- {cell['scenario']} / {cell['method']} at ε = {cell['epsilon']:g}: "
                f"{spent['releases']} releases spent ε = {spent['epsilon']:.3g} together "
                f"({spent['method']})."
            )
    return "\n".join(lines) + "\n"


def short_value(value: Any) -> str:
    """A grid value in a table: schedules as ``poisson(B=1000, T=60)``, others as JSON."""
    if isinstance(value, dict) and value.get("kind") == "poisson":
        size = value.get("expected_batch", value.get("sampling_rate"))
        name = "B" if "expected_batch" in value else "q"
        return f"poisson({name}={size}, T={value['rounds']})"
    if isinstance(value, dict) and "kind" in value:
        epochs = f", E={value['epochs']}" if value.get("epochs", 1) != 1 else ""
        return f"{value['kind']}(T={value.get('rounds', 1)}{epochs})"
    return json.dumps(value)


def _figure(size: tuple[float, float]) -> Figure:
    """A matplotlib Figure (Agg canvas, no display) of ``size`` inches; MissingExtraError naming
    ``qem[bench]`` without matplotlib."""
    figure_module = import_extra("matplotlib.figure", "bench", "the plots of an experiment report")
    return figure_module.Figure(figsize=size)


def _plot_seconds(tables: list[_Table], path: Path) -> None:
    """Median fine-tuning seconds per method over ALL epsilons and seeds (whiskers: the fastest
    and slowest run), one panel per scenario."""
    figure = _figure((4.8 * len(tables), 4.2))
    for index, table in enumerate(tables, start=1):
        axes = figure.add_subplot(1, len(tables), index)
        runs = [
            [s for s in (_field(c, "seconds.fine_tune") for c in table._cells(m)) if s is not None]
            for m in table.methods
        ]
        medians = [statistics.median(r) if r else 0.0 for r in runs]
        low = [m - min(r) if r else 0.0 for m, r in zip(medians, runs, strict=True)]
        high = [max(r) - m if r else 0.0 for m, r in zip(medians, runs, strict=True)]
        colors = [table.color(method) for method in table.methods]
        bars = axes.bar(table.methods, medians, yerr=[low, high], capsize=3, color=colors)
        axes.bar_label(bars, labels=[f"{m:.3g}" for m in medians], fontsize="small")
        axes.set_ylabel("fine-tuning seconds (one run)")
        axes.set_title(f"{table.scenario}\nmedian over all ε and seeds; whiskers: min-max")
        axes.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_metric_against_seconds(tables: list[_Table], path: Path) -> None:
    """Test metric against fine-tuning seconds: one point per method and epsilon (mean metric,
    median seconds over seeds), each labelled with its epsilon ("free": no budget), so that
    accuracy and cost are read side by side."""
    figure = _figure((5.2 * len(tables), 4.4))
    for index, table in enumerate(tables, start=1):
        axes = figure.add_subplot(1, len(tables), index)
        for method in table.methods:
            points = []
            for eps in table.columns():
                seconds = table.summary(method, eps, "seconds.fine_tune")
                metric = table.summary(method, eps, "metric")
                if seconds is not None and metric is not None:
                    points.append((seconds.median, metric.mean, eps))
            if not points:
                continue
            xs, ys, _ = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", color=table.color(method), label=method, alpha=0.8)
            for x, y, eps in points:
                text = "free" if eps is None else f"ε={eps:g}"
                axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3),
                              fontsize="x-small", color=table.color(method))  # fmt: skip
        axes.set_xlabel("fine-tuning seconds (median over seeds)")
        axes.set_ylabel(
            f"test {METRIC_TITLES.get(table.metric_name, table.metric_name)} (mean over seeds)"
        )
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
        "the test set; but each grid point was a release on the private data, so the tuning "
        "spends privacy beyond the epsilon of the column: each scenario's tables say how much. "
        f"Methods under '{NO_BUDGET}' spend no budget (non-private fine-tuning, no "
        "fine-tuning). Seconds: one fine-tuning run of the chosen configuration. In a table, "
        "'—' means no cell; '(k null)' means k of the seeds' runs had no finite value (the "
        "run diverged: non-finite outputs), and '— (k null)' that all k had none; "
        "'(n=..)' that a different number of seeds than the sweep's was found.\n\n"
        f"![fine-tuning seconds per method]({seconds_plot})\n\n"
        f"![test metric against fine-tuning seconds]({tradeoff_plot})\n\n"
    )


def _field(cell: dict[str, Any], dotted: str) -> Any:
    value: Any = cell
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _column_name(epsilon: float | None) -> str:
    return NO_BUDGET if epsilon is None else f"ε = {epsilon:g}"


def _row(entries: list[str]) -> str:
    return "| " + " | ".join(entries) + " |"
