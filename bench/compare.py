"""Side-by-side benchmark: qem against DP-SGD (Opacus), non-private fine-tuning and no
fine-tuning, at several epsilon (delta = 1e-5), replace-one neighbours, on

* MNIST S1 (49,000 private images) and S2 (25,000 private images rotated by 35 degrees), the
  sizes of the evaluation protocol (README);
* MNIST S1-small: the S1 CNN fine-tuned on 2,000 private images, where the noise, not the
  linearisation, binds;
* the MIMIC care-unit task (``mort_icu``, AUROC) on a SYNTHETIC file of the MIMIC-Extract schema
  (a logistic regression pretrained on one care unit, fine-tuned on the others).

Every method starts from the same pretrained model, sees the same private data and budget, and
has its hyperparameters chosen on the PUBLIC validation split (never the test set), in two
stages run by the ``qem experiment`` machinery (an interrupted run resumes where it stopped):

1. tuning: per scenario, each method's grid below at epsilon = --tune-epsilon, one run each;
   the grid point with the best public validation metric is chosen (each grid point is a
   release on the private data: results.md totals what the grid spent);
2. main: every scenario x method x epsilon x seed with the chosen hyperparameters, one seed
   at a time (a partial run has whole seeds). Noise and sampling come from OS entropy.

The tables (test metric mean +- sd over seeds, wall seconds of one fine-tuning run, DP-SGD/qem
time ratio), the plots (privacy-utility, and accuracy against seconds) and the tuning scores go
to --docs/results.md, the cells behind the table to --docs/results.json.

    .venv/bin/python bench/compare.py                  # the full benchmark (make bench)
    .venv/bin/python bench/compare.py --scenarios mnist_s1_small --seeds 0 --epsilons 1 \\
        --out runs/tiny --docs /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from qem.experiments.report import read_cells, write_report
from qem.experiments.runner import CELLS_DIR, result_row, run_experiment
from qem.pretrain import MNIST_CNN_PRETRAIN

MIMIC_FEATURES = 2 * 24 * 8
"""Inputs of the synthetic MIMIC-Extract file: 24 hourly means and masks of 8 variables."""

SCENARIOS: dict[str, dict[str, Any]] = {
    "mnist_s1": {"spec": {"name": "mnist_s1"}, "n": 49_000},
    "mnist_s2": {"spec": {"name": "mnist_s2"}, "n": 25_000},
    "mnist_s1_small": {
        "spec": {"name": "mnist_s1", "options": {"private_size": 2_000}},
        "n": 2_000,
    },
    "synthetic_mimic_mort_icu": {
        "spec": {
            "name": "synthetic_mimic",
            "options": {"task": "mort_icu", "subjects": 10_000},
            "model": {
                "name": "logreg",
                "options": {"in_features": MIMIC_FEATURES, "out_features": 2},
            },
        },
        "n": 3_235,
        "pretrain": {"epochs": 5, "lr": 1e-3, "batch_size": 64, "seed": 0},
    },
}
"""Each scenario's runner spec, its private size n (public under replace-one) and, where it
differs from the MNIST CNN's, its pretraining recipe."""

NONPRIVATE_STEPS = 1_500
"""Non-private fine-tuning gets at least this many Adam steps of batch 256 (with early stopping
on the public validation split), so that it is a real ceiling at every private size."""


def poisson(batch: int, rounds: int, n: int) -> dict[str, Any]:
    """A Poisson schedule of about ``batch`` records per round (at most half the data)."""
    return {
        "kind": "poisson",
        "expected_batch": min(batch, n // 2),
        "rounds": rounds,
    }


def qem_spec(label: str, n: int) -> dict[str, Any]:
    """qem's grid on a scenario: the schedule (Poisson rounds of about 1,000 records on the
    large sets; one full round or a few Poisson ones where the noise binds) and the curvature."""
    if label.startswith("synthetic_mimic"):  # d = 770: fine-tune every parameter, P = I
        return {
            "name": "qem",
            "label": "qem",
            "grid": {"schedule": [{"kind": "sequential", "rounds": 1}, poisson(500, 10, n)]},
            "fixed": {"subspace": "identity", "damping": 0.01, "curvature": "ggn"},
        }
    if n <= 5_000:  # the noise binds: few rounds on many records each
        schedules = [{"kind": "sequential", "rounds": 1}, poisson(1_000, 4, n)]
    else:
        schedules = [poisson(1_000, 30, n), poisson(1_000, 60, n)]
    return {
        "name": "qem",
        "label": "qem",
        "grid": {"schedule": schedules, "curvature": ["kfac", "ggn"]},
        "fixed": {
            "subspace": "kronecker",
            "k": 1024,
            "damping": 0.01,
            "curvature_every": 5,
            "public_sample_size": 256,
            "line_search_size": 500,
        },
    }


def method_specs(args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    """Each method with its tuning grid and fixed hyperparameters on scenario ``label``."""
    n = SCENARIOS[label]["n"]
    epochs = max(3, math.ceil(NONPRIVATE_STEPS * 256 / n))
    return [
        qem_spec(label, n),
        {
            "name": "dpsgd",
            "label": "dpsgd",
            "grid": {"lr": args.dpsgd_lr, "epochs": args.dpsgd_epochs},
            "fixed": {"batch_size": 256, "max_grad_norm": 1.0, "secure_mode": False},
        },
        {
            "name": "nonprivate",
            "label": "nonprivate",
            "fixed": {"epochs": epochs, "early_stopping": True, "patience": 3},
        },
        {"name": "none", "label": "none"},
    ]


def experiment_config(
    name: str,
    label: str,
    methods: list[dict[str, Any]],
    epsilons: list[float],
    seeds: list[int],
) -> dict[str, Any]:
    """A ``qem experiment`` config for one scenario."""
    scenario = SCENARIOS[label]
    return {
        "name": name,
        "scenarios": [{"label": label, **scenario["spec"]}],
        "methods": methods,
        "epsilons": epsilons,
        "delta": 1e-5,
        "seeds": seeds,
        "model": "cnn",
        "pretrain": scenario.get("pretrain", MNIST_CNN_PRETRAIN),
    }


def chosen(methods: list[dict[str, Any]], tuning_cells: list[dict[str, Any]], scenario: str):
    """The methods with each grid replaced by the point its tuning cell chose on ``scenario``."""
    picks = {c["method"]: c["hyperparameters"] for c in tuning_cells if c["scenario"] == scenario}
    return [
        {**{k: v for k, v in m.items() if k != "grid"}, "fixed": picks[m["label"]]}
        if m.get("grid")
        else m
        for m in methods
    ]


def tuning_markdown(cells: list[dict[str, Any]]) -> str:
    """Every grid point's public validation metric and seconds, the point chosen, and what
    the whole grid spent."""
    lines = ["## Tuning (public validation split, epsilon = 1)", ""]
    lines += ["| scenario | method | grid point | validation metric | seconds | chosen |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for cell in sorted(cells, key=lambda c: (c["scenario"], c["method"])):
        for entry in cell["grid_scores"]:
            point = entry["hyperparameters"]
            if not point:
                continue
            picked = all(cell["hyperparameters"].get(k) == v for k, v in point.items())
            lines.append(
                f"| {cell['scenario']} | {cell['method']} | "
                + ", ".join(f"{k} = {_short(v)}" for k, v in point.items())
                + f" | {entry['valid_metric']:.4f} | {entry['seconds']:.1f} | "
                + ("yes" if picked else "")
                + " |"
            )
    lines += ["", "Budget the tuning grid spent (all grid points composed, PLD):", ""]
    for cell in sorted(cells, key=lambda c: (c["scenario"], c["method"])):
        spent = cell.get("budget_spent_by_tuning") or {}
        if spent.get("epsilon"):
            lines.append(
                f"- {cell['scenario']} / {cell['method']}: {spent['releases']} releases at "
                f"epsilon = {cell['epsilon']:g} each spent epsilon = {spent['epsilon']:.3g} "
                f"together ({spent['method']})."
            )
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, dict) and value.get("kind") == "poisson":
        return f"poisson(B={value['expected_batch']}, T={value['rounds']})"
    if isinstance(value, dict) and "kind" in value:
        return f"{value['kind']}(T={value['rounds']})"
    return json.dumps(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["mnist_s1_small", "synthetic_mimic_mort_icu", "mnist_s2", "mnist_s1"],
        choices=SCENARIOS,
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-epsilon", type=float, default=1.0)
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--dpsgd-lr", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    parser.add_argument("--dpsgd-epochs", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--name", default="compare")
    parser.add_argument("--out", default="runs/compare", help="cells (resumable)")
    parser.add_argument("--docs", default="docs", help="where results.md/.json and plots go")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    out, progress = Path(args.out), not args.no_progress
    for label in args.scenarios:
        config = experiment_config(
            f"{args.name}-tuning-{label}",
            label,
            method_specs(args, label),
            [args.tune_epsilon],
            [args.tune_seed],
        )
        run_experiment(config, out / "tuning" / label, progress=progress)
    tuning_cells = [c for label in args.scenarios for c in read_cells(out / "tuning" / label)]
    gathered = out / args.name / CELLS_DIR
    gathered.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed by seed, so that a partial run covers every cell once
        for label in args.scenarios:
            config = experiment_config(
                args.name,
                label,
                chosen(method_specs(args, label), tuning_cells, label),
                args.epsilons,
                [seed],
            )
            run_experiment(config, out / label, progress=progress)
            for cell in (out / label / CELLS_DIR).glob("*.json"):
                shutil.copyfile(cell, gathered / cell.name)

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    paths = write_report(out / args.name, docs)
    cells = read_cells(out / args.name)
    rows = [result_row(cell) for cell in cells]
    (docs / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python", *sys.argv])
    stages = {"tuning": tuning_cells} | {
        label: [cell for cell in cells if cell["scenario"] == label] for label in args.scenarios
    }
    timing = ", ".join(
        f"{stage} {sum(cell['seconds']['total'] for cell in stage_cells) / 60:.1f} min"
        for stage, stage_cells in stages.items()
    )
    body = paths[0].read_text()
    paths[0].write_text(
        f"Produced by `{command}` (cells in `{args.out}`) on {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}. Compute time per stage (sum over its cells): {timing}.\n\n"
        f"{body}\n{tuning_markdown(tuning_cells)}"
    )
    print(paths[0].read_text())


if __name__ == "__main__":
    main()
