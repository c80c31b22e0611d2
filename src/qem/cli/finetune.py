"""``qem finetune``: private fine-tuning of a user's model on user files."""

from __future__ import annotations

import argparse
from pathlib import Path

from qem.cli.commands import summary
from qem.cli.common import ReleaseSaver, print_json, print_table, report_rows
from qem.cli.options import add_fine_tune_arguments, fine_tune_kwargs
from qem.cli.user_model import EXPORT_RECIPE, export_program, load_model, probe_public
from qem.datasets.files import load_supervised_file
from qem.distributed import LocalProcess, init_from_environment, launched_by_torchrun
from qem.errors import DistributedError
from qem.finetune import fine_tune
from qem.io import check_output_path
from qem.losses import LOSSES
from qem.metrics import evaluate_accuracy

PT2_FILE = "model.pt2"
"""What ``--export-pt2`` writes into ``--out``, beside model.pt and privacy_report.json."""

EXPORT_EXAMPLE_ROWS = 8
"""Public rows traced by ``--export-pt2`` (any number >= 2: the batch dimension is dynamic)."""


def add_parser(subparsers) -> None:
    """Register ``qem finetune``."""
    parser = subparsers.add_parser(
        "finetune",
        help=summary("finetune"),
        description=(
            "Fine-tune a pretrained model on private data with a differential-privacy "
            "guarantee, and write model.pt and privacy_report.json atomically into --out "
            "(after every round, so that a failure never loses a spent budget). "
            "Data files: .npz with arrays x and y (or x_train/y_train), or an IDX pair given as "
            "IMAGES.idx[.gz],LABELS.idx[.gz]. Several processes: torchrun --nproc-per-node W "
            "-m qem.cli.main finetune --distributed ... (rank 0 writes --out)."
        ),
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="module:factory (a callable returning an nn.Module; the module is looked up in "
        "the current directory, then on PYTHONPATH) or a torch.export program file (.pt2) "
        f"written by: {EXPORT_RECIPE}",
    )
    model.add_argument("--state-dict", help="state dict (.pt) of the pretrained weights")
    model.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy")
    data = parser.add_argument_group("data")
    data.add_argument("--public", required=True, help="public data file (curvature, clip norm)")
    data.add_argument("--private", required=True, help="private data file")
    data.add_argument("--validation", help="public validation file for the step length")
    data.add_argument("--test", help="optional test file: report accuracy before/after")
    add_fine_tune_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output directory (must not exist)")
    output.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    output.add_argument(
        "--export-pt2",
        action="store_true",
        help=f"also write the fine-tuned model as a torch.export program --out/{PT2_FILE} with "
        "a dynamic batch dimension",
    )
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check the output path, the options and the model on public rows; load the data;
    fine-tune (saving every release as soon as it is drawn), then export, evaluate and print the
    report, saying where the run is saved if any of that fails. With --distributed, join
    torchrun's process group first; rank 0 alone checks and writes --out and prints."""
    kwargs = fine_tune_kwargs(args)
    ranks = join_processes(kwargs)
    try:
        out = _checked_on_root(ranks, args.out, args.overwrite)  # before any private data
        model = load_model(args.model, args.state_dict)
        public = load_supervised_file(args.public)
        probe_public(model, public[0], args.model)
        private = load_supervised_file(args.private)
        validation = load_supervised_file(args.validation) if args.validation else None
        test = load_supervised_file(args.test) if args.test else None
        data = (model, LOSSES[args.loss], public, private)
        if not ranks.is_root:
            fine_tune(*data, validation_data=validation, **kwargs)
            return 0
        saver = ReleaseSaver(out, args.overwrite)
        result = saver.run(fine_tune, *data, validation_data=validation, **kwargs)
        with saver.after_release("exporting, evaluating or printing"):
            _finish(args, model, public, test, result, out)
        return 0
    finally:
        if ranks.world_size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def join_processes(kwargs: dict) -> LocalProcess:
    """With --distributed, torchrun's process group (nccl when --device is cuda, or auto with a
    GPU present; gloo otherwise: the command loads models on the CPU); without it, refuse to
    run as one of several torchrun processes (each would write --out alone)."""
    if kwargs["distributed"] is True:
        import torch

        gpu = kwargs["device"] == "cuda" or (
            kwargs["device"] == "auto" and torch.cuda.is_available()
        )
        return init_from_environment(torch.device("cuda" if gpu else "cpu"))
    if launched_by_torchrun():
        raise DistributedError(
            "this process is one of several started by torchrun, but --distributed was not "
            "given: each would fine-tune alone on all the data. Add --distributed."
        )
    return LocalProcess()


def _checked_on_root(ranks: LocalProcess, out: str, overwrite: bool) -> Path:
    """``check_output_path`` on rank 0 (the only writer); every rank stops if it fails."""
    import numpy as np

    checked: list[Path] = []

    def check() -> np.ndarray:
        checked.append(check_output_path(out, overwrite))
        return np.zeros(0)

    ranks.from_root(check if ranks.is_root else None, 0)
    return checked[0] if checked else Path(out)


def _finish(args: argparse.Namespace, model, public, test, result, out: Path) -> None:
    """Export, evaluate and print (rank 0)."""
    results: dict[str, object] = {"out": str(out)}
    if args.export_pt2:
        example = public[0][:EXPORT_EXAMPLE_ROWS]
        results["model_pt2"] = str(export_program(result.model, example, out / PT2_FILE))
    if test is not None:
        results["pretrained_test_accuracy"] = evaluate_accuracy(model, test)
        results["finetuned_test_accuracy"] = evaluate_accuracy(result.model, test)
    if args.json:
        print_json({**results, "report": result.report.to_dict()})
    else:
        print_table(
            [*report_rows(result.report), *results.items()],
            "qem finetune: privacy report (full report in privacy_report.json)",
        )
