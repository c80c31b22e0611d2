"""Side-by-side benchmark (issue "side-by-side evidence"): MNIST S1 and S2, qem against DP-SGD
(Opacus), non-private fine-tuning and no fine-tuning, at several epsilon (delta = 1e-5).

Every method starts from the same pretrained CNN, sees the same private data and budget
(replace-one neighbours), and has its hyperparameters chosen by the grid below on the PUBLIC
validation split (never the test set). Cells are written by ``qem experiment`` machinery, so an
interrupted run resumes. The table (test accuracy mean +- sd over seeds, wall seconds of the
chosen configuration, DP-SGD/qem time ratio) is printed and written with the plots to --docs.

    .venv/bin/python bench/compare.py                      # the full grid (hours on 2 cores)
    .venv/bin/python bench/compare.py --private-size 10000 --seeds 0 --out runs/compare-small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from qem.experiments.report import read_cells, write_report
from qem.experiments.runner import CELLS_DIR, result_row, run_experiment

PRETRAIN = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "seed": 0}


def build_config(args: argparse.Namespace) -> dict:
    """The experiment grid; hyperparameters are tuned on public validation data."""
    options = {"private_size": args.private_size} if args.private_size else {}
    scenarios = {
        "mnist_s1": {"name": "mnist_s1", "options": options},
        "mnist_s2": {"name": "mnist_s2", "options": options},
    }
    methods = [
        {
            "name": "qem",
            "label": "qem",
            "grid": {"rounds": args.qem_rounds},
            "fixed": {
                "subspace": "kronecker",
                "k": args.k,
                "damping": 0.01,
                **({"public_sample_size": args.public_sample} if args.public_sample else {}),
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
    return {
        "name": args.name,
        "scenarios": [scenarios[name] for name in args.scenarios],
        "methods": methods,
        "epsilons": args.epsilons,
        "delta": 1e-5,
        "seeds": args.seeds,
        "model": "cnn",
        "pretrain": PRETRAIN,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["mnist_s1", "mnist_s2"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--private-size", type=int, help="subsample the private side")
    parser.add_argument("--k", type=int, default=2048, help="qem subspace dimension")
    parser.add_argument(
        "--public-sample", type=int, help="qem: public examples used for curvature and clip norm"
    )
    parser.add_argument("--qem-rounds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dpsgd-lr", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--name", default="compare")
    parser.add_argument("--out", default="runs/compare", help="cells (resumable)")
    parser.add_argument("--docs", default="docs", help="where results.md/.json and plots go")
    parser.add_argument(
        "--merge",
        nargs="*",
        default=[],
        help="cell folders of earlier runs to include in the report",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    run_experiment(build_config(args), args.out, progress=not args.no_progress)
    for earlier in args.merge:
        for cell in Path(earlier, CELLS_DIR).glob("*.json"):
            if not (Path(args.out, CELLS_DIR) / cell.name).exists():
                shutil.copyfile(cell, Path(args.out, CELLS_DIR) / cell.name)
    docs = Path(args.docs)
    paths = write_report(args.out, docs)
    rows = [result_row(cell) for cell in read_cells(args.out)]
    (docs / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python", *sys.argv])
    body = paths[0].read_text()
    paths[0].write_text(
        f"Produced by `{command}` (the cells are in `{args.out}`) on {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}.\n\n{body}"
    )
    print(paths[0].read_text())


if __name__ == "__main__":
    main()
