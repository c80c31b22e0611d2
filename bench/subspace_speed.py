"""Per-example projected-gradient throughput of dense, SRHT and Kronecker subspaces.

Model: qem.models.SmallCNN (46,730 parameters) in float32, random 28x28 inputs. Each row times
``per_example_gradients`` on one batch (median over repetitions, after one warm-up call) and
compares it with a plain forward/backward of the same batch (``ratio`` = time / plain time).

    python bench/subspace_speed.py [--batch 256] [--ks 512 2048] [--reps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qem.losses import cross_entropy
from qem.models import SmallCNN
from qem.subspace import make_subspace


def median_seconds(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median wall time of fn() over reps calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--kinds", nargs="+", default=["dense", "srht", "kronecker"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = SmallCNN().to(device)
    inputs = torch.randn(args.batch, 1, 28, 28, device=device)
    targets = torch.randint(0, 10, (args.batch,), device=device)
    d = sum(p.numel() for p in model.parameters())

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        cross_entropy(model(inputs), targets).sum().backward()

    base = median_seconds(plain, args.reps, device)
    print(
        f"d={d}, batch={args.batch}, device={device}, torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'method':<18}{'k':>6}{'build s':>10}{'s/batch':>10}{'examples/s':>12}{'ratio':>8}")
    print(
        f"{'forward+backward':<18}{'-':>6}{'-':>10}{base:>10.4f}{args.batch / base:>12.0f}{1:>8.1f}"
    )
    for k in args.ks:
        for kind in args.kinds:
            start = time.perf_counter()
            subspace = make_subspace(kind, model, k=k, seed=0)
            build = time.perf_counter() - start
            seconds = median_seconds(
                lambda s=subspace: s.per_example_gradients(model, cross_entropy, inputs, targets),
                args.reps,
                device,
            )
            print(
                f"{kind:<18}{subspace.k:>6}{build:>10.2f}{seconds:>10.4f}"
                f"{args.batch / seconds:>12.0f}{seconds / base:>8.1f}"
            )
            del subspace


if __name__ == "__main__":
    main()
