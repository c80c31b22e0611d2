"""Private-pass throughput of qem against Opacus' DP-SGD step, side by side in one process.

Model: the pretrained MNIST CNN of qem.pretrain.pretrained_mnist_cnn (46,730 parameters,
float32) on S1's private images, ``--batches`` batches of ``--batch``. Rows, in records per
second (median over ``--reps`` repetitions, the methods interleaved within each repetition):

- ``forward+backward``: a plain, non-private step of the batch, for scale (``free cores``: each
  batch under qem.per_example.shared_machine_threads, as qem's per-example passes run);
- ``qem per-example``: Kronecker(k) ``per_example_gradients`` (the projected per-example
  gradients, float64 (B, k));
- ``qem private pass``: ``qem.statistics.private_gradient_sum`` over the same batches (also
  whitening by the Cholesky factor of a public K-FAC A, dual-norm clipping, float64 sums);
- ``torch's threads``: the same with QEM_ADAPTIVE_THREADS=0 (torch's thread count whatever the
  load); ``free cores``: the whole private pass (whitening and clipping too) under one
  shared_machine_threads, as the round engine can call it;
- ``Opacus step``: GradSampleModule forward/backward + DPOptimizer step (per-sample clipping
  and noise) on a copy of the model.

``ratio`` is the row's records/s over the Opacus step's (target for qem's rows: >= 1);
``records/CPU-s`` counts this process's CPU time instead of wall time (all its threads, spinning
included), which other processes' load barely moves on one thread.
``--loads 0 2`` repeats the table with that many busy-loop processes (``python -c 'while True:
pass'``) running, as on a shared machine, and adds each row's slowdown against load 0.
``--threads 2 1`` compares torch intra-op thread counts in the same run.

    python bench/opacus_throughput.py [--k 1024] [--batch 256] [--batches 2] [--reps 9]
        [--loads 0 2] [--threads 2 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qem.curvature import KFAC
from qem.datasets.mnist import load_mnist
from qem.datasets.scenarios import mnist_s1
from qem.losses import cross_entropy
from qem.per_example.threads import ADAPTIVE_VARIABLE, shared_machine_threads
from qem.pretrain import pretrained_mnist_cnn
from qem.statistics import private_gradient_sum
from qem.subspace import Kronecker


@contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` single-threaded busy-loop processes for the duration of the block."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if loops else 0.0)  # let the scheduler see them
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def machine_load() -> str:
    """The machine's 1-minute load average and runnable threads now (/proc/loadavg), as text:
    other processes on a shared machine move every figure of the table."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
    except OSError:
        return "load unknown"
    return f"load average {fields[0]}, {fields[3].split('/')[0]} threads runnable before"


def opacus_step(
    model: torch.nn.Module, batch_size: int
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One DP-SGD step of Opacus (hooks mode: forward/backward with per-sample gradients, then
    the DPOptimizer's per-sample clipping, noise and update) on a copy of ``model``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(copy.deepcopy(model).train())  # no dropout/BatchNorm in the CNN
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch_size,
    )

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(inputs), targets).backward()
        optimizer.step()

    return step


def fixed_threads(method: Callable[[], None]) -> Callable[[], None]:
    """``method`` with QEM_ADAPTIVE_THREADS=0: torch's thread count, whatever the load."""

    def fixed() -> None:
        os.environ[ADAPTIVE_VARIABLE] = "0"
        try:
            method()
        finally:
            del os.environ[ADAPTIVE_VARIABLE]

    return fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--loads", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="opacus")

    n = args.batch * args.batches
    scenario = mnist_s1(load_mnist(), seed=0, private_size=max(n, 1000))
    model = pretrained_mnist_cnn(scenario).eval()  # cached in the user cache directory
    images, labels = (t[:n] for t in scenario.private_train)
    batches = list(zip(images.split(args.batch), labels.split(args.batch), strict=True))
    subspace = Kronecker(model, args.k, seed=0)
    curvature = KFAC(damping=1e-3, batch_size=args.batch, progress=False)
    cholesky = curvature.quadratic(model, cross_entropy, subspace, scenario.public_train).cholesky
    cholesky = np.asarray(cholesky, dtype=np.float64)
    dpsgd = opacus_step(model, args.batch)

    def plain() -> None:
        for inputs, targets in batches:
            model.zero_grad(set_to_none=True)
            cross_entropy(model(inputs), targets).sum().backward()

    def plain_on_free_cores() -> None:
        for inputs, targets in batches:
            with shared_machine_threads():
                model.zero_grad(set_to_none=True)
                cross_entropy(model(inputs), targets).sum().backward()

    def per_example() -> None:
        for inputs, targets in batches:
            subspace.per_example_gradients(model, cross_entropy, inputs, targets)

    def private_pass() -> None:
        private_gradient_sum(
            model,
            cross_entropy,
            subspace,
            (images, labels),
            clip_norm=1.0,
            cholesky=cholesky,
            batch_size=args.batch,
        )

    def private_pass_on_free_cores() -> None:
        with shared_machine_threads():
            private_pass()

    def opacus() -> None:
        for inputs, targets in batches:
            dpsgd(inputs, targets)

    methods = {
        "forward+backward": plain,
        "forward+backward, free cores": plain_on_free_cores,
        "qem per-example": per_example,
        "qem per-example, torch's threads": fixed_threads(per_example),
        "qem private pass": private_pass,
        "qem private pass, torch's threads": fixed_threads(private_pass),
        "qem private pass, free cores": private_pass_on_free_cores,
        "Opacus step": opacus,
    }
    print(
        f"# MNIST CNN (46,730 parameters), Kronecker k={subspace.k}, batch {args.batch}, "
        f"{n} records per repetition, median of {args.reps}; torch {torch.__version__}"
    )
    idle: dict[tuple[int, str], float] = {}
    for load in args.loads:
        background = machine_load()
        with busy_loops(load):
            times = {(t, m): [] for t in args.threads for m in methods}
            cpu = {(t, m): [] for t in args.threads for m in methods}
            for threads in args.threads:  # warm-up (and the mixing check, once)
                torch.set_num_threads(threads)
                for method in methods.values():
                    method()
            for _ in range(args.reps):
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for name, method in methods.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        method()
                        times[threads, name].append(time.perf_counter() - start)
                        cpu[threads, name].append(time.process_time() - start_cpu)
        print(f"\n## {load} busy-loop processes on {os.cpu_count()} cores ({background})")
        print(
            "| threads | method | records/s | ratio to Opacus | slowdown vs load 0 "
            "| records/CPU-s | ratio to Opacus |"
        )
        print("|---|---|---|---|---|---|---|")
        for threads in args.threads:
            rate = {m: n / statistics.median(times[threads, m]) for m in methods}
            per_cpu = {m: n / statistics.median(cpu[threads, m]) for m in methods}
            for name in methods:
                idle.setdefault((threads, name), rate[name])
                slowdown = idle[threads, name] / rate[name]
                print(
                    f"| {threads} | {name} | {rate[name]:.0f} | "
                    f"{rate[name] / rate['Opacus step']:.2f} | {slowdown:.2f} | "
                    f"{per_cpu[name]:.0f} | {per_cpu[name] / per_cpu['Opacus step']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
