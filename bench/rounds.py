"""qem's levers when one round saturates: rounds T, subspace dimension k, resampled subspaces,
curvature and damping, on MNIST S1 or S2 at one epsilon (delta = 1e-5).

Each configuration is one qem.fine_tune run from the same cached pretrained CNN with the same
noise seed; the table gives test and public-validation accuracy, the step lengths the public
line search chose, and the seconds of each phase. Configurations are JSON objects of fine_tune
keyword arguments (``subspace`` defaults to "kronecker"):

    .venv/bin/python bench/rounds.py --scenario mnist_s2 --private-size 10000 --epsilon 1 \\
        '{"k": 2048, "rounds": 1}' '{"k": 1024, "rounds": 6, "resample_subspace": true}'
"""

from __future__ import annotations

import argparse
import json
import time

from qem.datasets import scenarios
from qem.datasets.mnist import load_mnist
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.metrics import evaluate_accuracy
from qem.pretrain import pretrained_mnist_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=json.loads, help="fine_tune kwargs as JSON")
    parser.add_argument("--scenario", choices=("mnist_s1", "mnist_s2"), default="mnist_s2")
    parser.add_argument("--private-size", type=int, help="subsample the private side")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1, help="noise seed (reproducible runs)")
    args = parser.parse_args()

    scenario = getattr(scenarios, args.scenario)(
        load_mnist(), seed=0, private_size=args.private_size
    )
    model = pretrained_mnist_cnn(scenario)  # cached in the user cache directory
    print(f"{scenario.description} epsilon = {args.epsilon:g}, noise seed {args.seed}\n")
    print("| configuration | test acc | valid acc | seconds | zero steps | step lengths |")
    print("| --- | --- | --- | --- | --- | --- |")
    phase_rows = []
    test, valid = (
        evaluate_accuracy(model, scenario.test),
        evaluate_accuracy(model, scenario.public_valid),
    )
    print(f"| no fine-tuning | {test:.4f} | {valid:.4f} | 0 | | |", flush=True)
    for config in args.configs:
        tic = time.perf_counter()
        result = fine_tune(
            model,
            cross_entropy,
            scenario.public_train,
            scenario.private_train,
            epsilon=args.epsilon,
            validation_data=scenario.public_valid,
            seed=args.seed,
            progress=False,
            **{"subspace": "kronecker", **config},
        )
        seconds = time.perf_counter() - tic
        test = evaluate_accuracy(result.model, scenario.test)
        valid = evaluate_accuracy(result.model, scenario.public_valid)
        lengths = result.report.step_lengths
        steps = ", ".join(f"{a:.3g}" for a in lengths[:12]) + (" ..." if len(lengths) > 12 else "")
        zero = f"{result.report.zero_step_rounds}/{len(lengths)}"
        print(
            f"| `{json.dumps(config)}` | {test:.4f} | {valid:.4f} | {seconds:.1f} | {zero} | "
            f"{steps} |",
            flush=True,
        )
        phase_rows.append((config, result.diagnostics.seconds, len(lengths)))
    print_phases(phase_rows)


def print_phases(rows: list) -> None:
    """Mean seconds per round of each phase (diagnostics), and the round's cost in units of its
    private pass: issue 16's target is at most 1.3."""
    phases = sorted({phase for _, seconds, _ in rows for phase in seconds})
    print("\nSeconds per round, by phase (mean over the rounds of each run):\n")
    print("| configuration | " + " | ".join(phases) + " | round | round / private pass |")
    print("| --- " * (len(phases) + 3) + "|")
    for config, seconds, rounds in rows:
        per_round = {phase: seconds.get(phase, 0.0) / rounds for phase in phases}
        total = sum(per_round.values())
        ratio = total / per_round["private_pass"] if per_round.get("private_pass") else float("nan")
        cells = " | ".join(f"{per_round[phase]:.3f}" for phase in phases)
        print(f"| `{json.dumps(config)}` | {cells} | {total:.3f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
