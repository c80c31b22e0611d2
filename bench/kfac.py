"""K-FAC curvature kept across rounds against the exact-in-subspace GGN, on MNIST S2.

Each row is one qem.fine_tune run (Kronecker subspace resampled every round, k = 1024,
epsilon = 1, 1,000 public images for the curvature and the clip norm, a fixed noise seed) from
the same cached pretrained CNN: "ggn" computes P^T H0 P on public data every round; "kfac" estimates
per-layer factors G (x) F on public data every ``refresh_every`` rounds and projects them into
each round's subspace without a data pass in between. The table gives test and public-validation
accuracy, the curvature's data passes, and the seconds of each phase.

    .venv/bin/python bench/kfac.py [--private-size 10000] [--cache-dir DIR] [--seed 1]
"""

from __future__ import annotations

import argparse
import time

from qem.curvature import KFAC
from qem.datasets.mnist import load_mnist
from qem.datasets.scenarios import mnist_s2
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.metrics import evaluate_accuracy
from qem.pretrain import pretrained_mnist_cnn

DAMPING = 1e-2
BATCH_SIZE = 256
ROWS = [("ggn", 4, None), ("kfac", 4, 1), ("ggn", 8, None), ("kfac", 8, 4), ("kfac", 8, 1)]
"""(curvature, rounds, refresh_every) of each row."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private-size", type=int, default=10000)
    parser.add_argument("--cache-dir", help="pretrained-model cache (default: the user cache)")
    parser.add_argument("--rows", type=int, nargs="+", help="indices into ROWS (default: all)")
    parser.add_argument("--seed", type=int, default=1, help="noise seed (reproducible runs)")
    args = parser.parse_args()

    scenario = mnist_s2(load_mnist(), seed=0, private_size=args.private_size)
    model = pretrained_mnist_cnn(scenario, args.cache_dir)
    print(f"{scenario.description} epsilon = 1, kronecker k = 1024 resampled.")
    print(f"Noise seed {args.seed}.\n")
    print("| curvature | rounds | refresh_every | data passes | test acc | valid acc | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    test = evaluate_accuracy(model, scenario.test)
    valid = evaluate_accuracy(model, scenario.public_valid)
    print(f"| no fine-tuning | | | | {test:.4f} | {valid:.4f} | |", flush=True)
    for index in args.rows if args.rows is not None else range(len(ROWS)):
        kind, rounds, refresh_every = ROWS[index]
        curvature = (
            kind
            if refresh_every is None
            else KFAC(DAMPING, batch_size=BATCH_SIZE, progress=False, refresh_every=refresh_every)
        )
        tic = time.perf_counter()
        result = fine_tune(
            model,
            cross_entropy,
            scenario.public_train,
            scenario.private_train,
            epsilon=1.0,
            subspace="kronecker",
            k=1024,
            resample_subspace=True,
            rounds=rounds,
            curvature=curvature,
            damping=DAMPING,
            public_sample_size=1000,
            validation_data=scenario.public_valid,
            seed=args.seed,
            batch_size=BATCH_SIZE,
            progress=False,
        )
        seconds = time.perf_counter() - tic
        passes = rounds if refresh_every is None else curvature.data_passes
        phases = ", ".join(f"{k} {v:.1f}" for k, v in result.report["seconds"].items())
        test = evaluate_accuracy(result.model, scenario.test)
        valid = evaluate_accuracy(result.model, scenario.public_valid)
        print(
            f"| {kind} | {rounds} | {refresh_every or ''} | {passes} | {test:.4f} | {valid:.4f} "
            f"| {seconds:.0f} ({phases}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
