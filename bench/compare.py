"""Side-by-side benchmark (issue "side-by-side evidence"): MNIST S1 and S2, qem against DP-SGD
(Opacus), non-private fine-tuning and no fine-tuning, at several epsilon (delta = 1e-5).

Every method starts from the same pretrained CNN, sees the same private data and budget
(replace-one neighbours), and has its hyperparameters chosen on the PUBLIC validation split
(never the test set), in two stages run by the ``qem experiment`` machinery (so an interrupted
run resumes where it stopped):

1. tuning: per scenario, each method's grid below at epsilon = --tune-epsilon, seed
   --tune-seed; the grid point with the best public validation metric is chosen;
2. main: every scenario x method x epsilon x seed with the chosen hyperparameters, one seed
   at a time (a partial run has whole seeds).

The table (test accuracy mean +- sd over seeds, wall seconds of one fine-tuning run, DP-SGD/qem
time ratio), the plots and the tuning scores go to --docs/results.md, the cells behind the table
to --docs/results.json.

    .venv/bin/python bench/compare.py                  # the full benchmark (make bench)
    .venv/bin/python bench/compare.py --private-size 2000 --seeds 0 --epsilons 1 --out runs/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from qem.experiments.report import read_cells, write_report
from qem.experiments.runner import CELLS_DIR, result_row, run_experiment
from qem.pretrain import MNIST_CNN_PRETRAIN


def method_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each method with its tuning grid and fixed hyperparameters."""
    return [
        {
            "name": "qem",
            "label": "qem",
            "grid": {"rounds": args.qem_rounds},
            "fixed": {
                "subspace": "kronecker",
                "k": args.k,
                "resample_subspace": True,
                "damping": 0.01,
                "public_sample_size": args.public_sample,
            },
        },
        {
            "name": "dpsgd",
            "label": "dpsgd",
            "grid": {"lr": args.dpsgd_lr},
            "fixed": {"epochs": 3, "batch_size": 256, "max_grad_norm": 1.0},
        },
        {"name": "nonprivate", "label": "nonprivate", "fixed": {"epochs": 3}},
        {"name": "none", "label": "none"},
    ]


def experiment_config(
    args: argparse.Namespace,
    name: str,
    scenarios: list[str],
    methods: list[dict[str, Any]],
    epsilons: list[float],
    seeds: list[int],
) -> dict[str, Any]:
    """A ``qem experiment`` config over the given scenarios, methods, epsilons and seeds."""
    options = {"private_size": args.private_size} if args.private_size else {}
    return {
        "name": name,
        "scenarios": [{"name": scenario, "options": options} for scenario in scenarios],
        "methods": methods,
        "epsilons": epsilons,
        "delta": 1e-5,
        "seeds": seeds,
        "model": "cnn",
        "pretrain": MNIST_CNN_PRETRAIN,
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
    """Every grid point's public validation metric and seconds, and the point chosen."""
    lines = ["## Tuning (public validation split)", ""]
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
                + ", ".join(f"{k} = {v}" for k, v in point.items())
                + f" | {entry['valid_metric']:.4f} | {entry['seconds']:.1f} | "
                + ("yes" if picked else "")
                + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["mnist_s1", "mnist_s2"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-epsilon", type=float, default=1.0)
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--private-size", type=int, help="subsample the private side")
    parser.add_argument("--k", type=int, default=1024, help="qem subspace dimension")
    parser.add_argument(
        "--public-sample",
        type=int,
        default=1000,
        help="qem: public examples used for the curvature and the clip norm",
    )
    parser.add_argument("--qem-rounds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dpsgd-lr", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    parser.add_argument("--name", default="compare")
    parser.add_argument("--out", default="runs/compare", help="cells (resumable)")
    parser.add_argument("--docs", default="docs", help="where results.md/.json and plots go")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    out, progress = Path(args.out), not args.no_progress
    methods = method_specs(args)
    tuning_config = experiment_config(
        args, f"{args.name}-tuning", args.scenarios, methods, [args.tune_epsilon], [args.tune_seed]
    )
    run_experiment(tuning_config, out / "tuning", progress=progress)
    tuning_cells = read_cells(out / "tuning")
    gathered = out / args.name / CELLS_DIR
    gathered.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed by seed, so that a partial run covers every cell once
        for scenario in args.scenarios:
            config = experiment_config(
                args,
                args.name,
                [scenario],
                chosen(methods, tuning_cells, scenario),
                args.epsilons,
                [seed],
            )
            run_experiment(config, out / scenario, progress=progress)
            for cell in (out / scenario / CELLS_DIR).glob("*.json"):
                shutil.copyfile(cell, gathered / cell.name)

    docs = Path(args.docs)
    paths = write_report(out / args.name, docs)
    cells = read_cells(out / args.name)
    rows = [result_row(cell) for cell in cells]
    (docs / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python", *sys.argv])
    stages = {"tuning": tuning_cells} | {
        scenario: [cell for cell in cells if cell["scenario"] == scenario]
        for scenario in args.scenarios
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
