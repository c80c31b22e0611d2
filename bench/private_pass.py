"""Cost of one qem release on MNIST S1, phase by phase, against a plain epoch.

For each subspace (SRHT, Kronecker) and k, one ``qem.fine_tune`` round runs on the pretrained
S1 CNN (46,730 parameters): public curvature pass (GGN on the 1,000 public images), public clip
norm, private pass over the private images, mechanism, public line search. Each phase is timed
and its peak resident memory recorded; the private pass is also given as a ratio to one plain
(non-private) forward/backward epoch over the same private images, measured in the same run.

    .venv/bin/python bench/private_pass.py [--private-size 49000] [--ks 512 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from qem.data import batches
from qem.datasets.mnist import load_mnist
from qem.datasets.scenarios import mnist_s1
from qem.experiments.memory import PeakMemory
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.metrics import evaluate_accuracy
from qem.pretrain import pretrained_mnist_cnn


def plain_epoch(model: torch.nn.Module, data, batch_size: int) -> tuple[float, float]:
    """Seconds and peak MiB of one forward/backward pass over ``data`` (no privacy)."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        for inputs, targets in batches(data, batch_size):
            model.zero_grad(set_to_none=True)
            cross_entropy(model(inputs), targets).mean().backward()
        seconds = time.perf_counter() - start
    return seconds, memory.peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private-size", type=int, default=49000)
    parser.add_argument("--ks", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--subspaces", nargs="+", default=["srht", "kronecker"])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    scenario = mnist_s1(load_mnist(), seed=0, private_size=args.private_size)
    model = pretrained_mnist_cnn(scenario)  # cached in the user cache directory
    plain_seconds, plain_mb = plain_epoch(model, scenario.private_train, args.batch_size)
    print(f"# S1, {args.private_size} private images, torch threads={torch.get_num_threads()}")
    print(f"# plain forward/backward epoch: {plain_seconds:.1f} s, peak {plain_mb:.0f} MiB")
    print(f"# pretrained test accuracy {evaluate_accuracy(model, scenario.test):.4f}")
    header = (
        "subspace",
        "k",
        "curv s",
        "clip s",
        "private s",
        "ratio",
        "mech s",
        "search s",
        "peak MiB",
        "test acc",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind in args.subspaces:
        for k in args.ks:
            with PeakMemory() as memory:
                result = fine_tune(
                    model,
                    cross_entropy,
                    scenario.public_train,
                    scenario.private_train,
                    epsilon=args.epsilon,
                    delta=1e-5,
                    subspace=kind,
                    k=k,
                    curvature="ggn",
                    validation_data=scenario.public_valid,
                    batch_size=args.batch_size,
                    progress=False,
                )
            s = result.diagnostics.seconds
            row = (
                kind,
                result.report.k,
                f"{s['curvature']:.1f}",
                f"{s['clip_norm']:.1f}",
                f"{s['private_pass']:.1f}",
                f"{s['private_pass'] / plain_seconds:.2f}",
                f"{s['mechanism']:.2f}",
                f"{s['line_search']:.1f}",
                f"{memory.peak_mb:.0f}",
                f"{evaluate_accuracy(result.model, scenario.test):.4f}",
            )
            print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
