"""Scale: one qem release on a real pretrained transformer (d >= 10^7) on CPU, phase by phase,
against one plain forward/backward epoch over the same private data.

Model: all-MiniLM-L6-v2 + mean pooling + linear head (``minilm_classifier``, 22.6M parameters;
its nn.Linear layers, 10.6M parameters, are trainable, embeddings and LayerNorms frozen), on
tweets of the ``text_transfer`` scenario tokenised to ``--max-length`` tokens. The head is not
pretrained: only costs are measured here. For each (layers, k) one ``qem.fine_tune`` round
(epsilon 8, GGN curvature and clip norm on ``--public-size`` public tweets, line search on
``--valid-size`` public tweets) runs with a Kronecker subspace over all Linear layers
(d = 10.6M) or over the last two encoder blocks' Linear layers and the head (d = 3.5M).

Targets (issue 11): one round <= 3 x the plain epoch; peak memory <= 2 x (model + one batch of
activations) + the k x k float64 matrices qem holds. Memory is resident memory (VmHWM, reset
per run, :class:`qem.experiments.memory.PeakMemory`). What a run adds is its peak minus the
resident memory before it (``base``: interpreter, libraries, model and data already loaded);
"qem MiB" = that increment + the model's bytes (qem's copy of it is inside the increment, the
caller's is in ``base``). The reference: "model" = parameter and buffer bytes, "one batch of
activations" = the plain epoch's increment (activations and gradients of one batch), and
``KK_MATRICES`` k x k float64 matrices (A and its Cholesky factor, kept for the round; the
curvature pass's running sum and one batch's sum while it runs).

    .venv/bin/python bench/scale.py [--private-size 2000] [--ks 1024 2048 4096] [--threads 1]
                                    [--device cpu|cuda|auto] [--tiny]

``--device cuda`` runs the plain epoch and every qem pass on the GPU (bench/gpu.sh); the memory
columns stay host resident memory, and each row is followed by the GPU's peak allocation.
``--tiny`` is a seconds-long smoke run (64 private tweets, k = 64) that checks the script, not
the scale.

Timings are diagnostics of one run on a shared machine (the load average is printed); each
configuration runs once. Wall-clock ratios move with the machine's other load; the CPU-second
ratios (``time.process_time``, one torch thread by default) do much less.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from qem.data import batches
from qem.datasets.scenarios import Scenario
from qem.datasets.text import text_transfer
from qem.experiments.memory import PeakMemory
from qem.finetune import ZeroStepWarning, fine_tune
from qem.losses import cross_entropy
from qem.model_calls import on_model_device, resolve_device
from qem.models import build_model
from qem.subspace.kronecker import Kronecker

KK_MATRICES = 4
"""k x k float64 matrices qem holds at its peak (see the module docstring)."""
MIB = 2**20


def linear_layers(model: nn.Module, blocks: list[int] | None) -> list[str]:
    """Names of the trainable nn.Linear modules: all, or those of encoder ``blocks`` + head."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad
    ]
    if blocks is None:
        return names
    prefixes = tuple(f"encoder.encoder.layer.{b}." for b in blocks)
    return [name for name in names if name.startswith(prefixes) or name == "head"]


def tweets(args: argparse.Namespace) -> Scenario:
    """The text_transfer scenario at the sizes of ``args`` (public, private, validation, tokens)."""
    return text_transfer(
        0,
        public_size=args.public_size,
        private_size=args.private_size,
        valid_size=args.valid_size,
        test_size=1,
        max_length=args.max_length,
    )


def resident_mib() -> float:
    """Current resident memory (VmRSS) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def model_mib(model: nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


TINY = {
    "private_size": 64,
    "public_size": 32,
    "valid_size": 32,
    "max_length": 16,
    "ks": [64],
    "subset_k": 64,
    "batch_size": 32,
}
"""The sizes of ``--tiny``."""


def plain_epoch(model: nn.Module, data: tuple, batch_size: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and resident-memory increment (MiB) of one forward/backward
    pass over ``data`` in batches of ``batch_size`` (gradients of the trainable parameters; no
    optimiser)."""
    base = resident_mib()
    with PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        for batch in batches(data, batch_size):
            inputs, targets = on_model_device(model, *batch)
            model.zero_grad(set_to_none=True)
            cross_entropy(model(inputs), targets).mean().backward()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return seconds, cpu, memory.peak_mb - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private-size", type=int, default=2000)
    parser.add_argument("--public-size", type=int, default=256)
    parser.add_argument("--valid-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--subset-k", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: " + str(TINY))
    args = parser.parse_args()
    if args.tiny:
        vars(args).update(TINY)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ZeroStepWarning)  # costs only: the step is not the point

    scenario = tweets(args)
    model = build_model("minilm_classifier", seed=0)
    device = resolve_device(args.device, model)
    model.to(device)
    gpu = device.type == "cuda"
    model_size = model_mib(model)
    plain_seconds, plain_cpu, activations = plain_epoch(
        model, scenario.private_train, args.batch_size
    )
    print(
        f"# {args.private_size} private tweets x {args.max_length} tokens, batch "
        f"{args.batch_size}, {args.public_size} public + {args.valid_size} validation tweets; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if gpu else "")
    )
    print(
        f"# model {model_size:.0f} MiB ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters); plain epoch {plain_seconds:.1f} s ({plain_cpu:.1f} CPU s), one batch of "
        f"activations and "
        f"gradients {activations:.0f} MiB"
    )
    header = (
        "layers",
        "d",
        "k",
        "curvature s",
        "clip_norm s",
        "private_pass s",
        "mechanism s",
        "line_search s",
        "round s",
        "round / plain",
        "CPU s",
        "CPU / plain CPU",
        "qem MiB",
        "reference MiB",
        "memory / reference",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    runs = [("all Linear", None, k) for k in args.ks]
    runs.append(("blocks 4-5 + head", [4, 5], args.subset_k))
    for label, blocks, k in runs:
        subspace = Kronecker(model, k, seed=0, layers=linear_layers(model, blocks))
        base = resident_mib()
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        with PeakMemory() as memory:
            cpu = time.process_time()
            result = fine_tune(
                model,
                cross_entropy,
                scenario.public_train,
                scenario.private_train,
                epsilon=8.0,
                delta=1e-5,
                subspace=subspace,
                curvature="ggn",
                validation_data=scenario.public_valid,
                batch_size=args.batch_size,
                seed=0,
            )
            cpu = time.process_time() - cpu
        seconds = result.diagnostics.seconds
        total = sum(seconds.values())
        used = memory.peak_mb - base + model_size
        reference = 2 * (model_size + activations) + KK_MATRICES * 8 * subspace.k**2 / MIB
        row = (
            label,
            f"{subspace.d:,}",
            subspace.k,
            *(
                f"{seconds[phase]:.1f}"
                for phase in ("curvature", "clip_norm", "private_pass", "mechanism", "line_search")
            ),
            f"{total:.1f}",
            f"{total / plain_seconds:.2f}",
            f"{cpu:.1f}",
            f"{cpu / plain_cpu:.2f}",
            f"{used:.0f}",
            f"{reference:.0f}",
            f"{used / reference:.2f}",
        )
        print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
        if gpu:
            peak = torch.cuda.max_memory_allocated(device) / MIB
            print(f"#   GPU peak allocated {peak:.0f} MiB", flush=True)
        del result


if __name__ == "__main__":
    main()
