"""``qem finetune``: private fine-tuning of a user's model on user files.

The module imports no torch: ``--help`` and every argument error answer at once. ``run`` checks
the option values, that the data files exist and the output location, and only then imports
torch, the model and the data (:func:`run` says in which order)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qem.cli.commands import summary
from qem.cli.common import EXPORT_RECIPE, ReleaseSaver, print_json, print_table, report_rows
from qem.cli.options import add_fine_tune_arguments, fine_tune_kwargs
from qem.errors import DataError, DistributedError, InvalidParameterError
from qem.io import DIAGNOSTICS_FILE, MODEL_FILE, PT2_FILE, REPORT_FILE, check_output_path

LOSS_NAMES = ("cross_entropy", "squared_error")
"""The losses of qem.losses.LOSSES (a test checks the two agree), named without importing it."""

EXPORT_EXAMPLE_ROWS = 8
"""Public rows traced by ``--export-pt2`` (any number >= 2: the batch dimension is dynamic)."""

CONVERSIONS = (
    "Conversions (each one applied is logged with -v): integer inputs stay integers, as int64 "
    "(token ids, as nn.Embedding takes them), boolean ones boolean; uint8 inputs are divided "
    "by 255 into floats only with --scale-uint8 (IDX images always are); floating inputs take "
    "the model's floating dtype; integer targets become int64 class labels, floating targets "
    "the model's dtype."
)
"""What reading a data file converts (qem.datasets.files), for --help."""

DATA_FORMS = (
    "Data (--public, --private, --validation, --test): a .npz file with arrays x and y (or "
    "inputs/targets, x_train/y_train), or with the model's named inputs and 'labels' "
    "(input_ids, attention_mask, token_type_ids, ..., labels: passed to the model as keyword "
    "arguments); an IDX pair IMAGES.idx[.gz],LABELS.idx[.gz]; or module:factory, a callable "
    "returning data as qem.fine_tune takes it (tensors, a dict with 'labels', a Dataset or a "
    "DataLoader)."
)


def add_parser(subparsers) -> None:
    """Register ``qem finetune``."""
    parser = subparsers.add_parser(
        "finetune",
        help=summary("finetune"),
        description=(
            "Fine-tune a pretrained model on private data with a differential-privacy "
            f"guarantee, and write {MODEL_FILE}, {REPORT_FILE} (publishable) and "
            f"{DIAGNOSTICS_FILE} (not publishable: timings) atomically into --out (after every "
            "round, so that a failure or Ctrl-C never loses a spent budget). "
            f"{DATA_FORMS} {CONVERSIONS} Several processes: torchrun --nproc-per-node W -m "
            "qem.cli.main finetune --distributed ... (rank 0 writes --out)."
        ),
    )
    data = add_model_and_public_arguments(parser, required=True)
    data.add_argument("--private", required=True, help="private data")
    data.add_argument("--test", help="optional test data: report accuracy before/after")
    add_fine_tune_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output directory (must not exist)")
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds a qem run (never a directory with other files)",
    )
    output.add_argument(
        "--export-pt2",
        action="store_true",
        help=f"also write the fine-tuned model as a torch.export program --out/{PT2_FILE} with "
        "a dynamic batch dimension (tensor inputs only)",
    )
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def add_model_and_public_arguments(
    parser: argparse.ArgumentParser, *, required: bool
) -> argparse._ArgumentGroup:
    """--model, --state-dict, --loss (group "model"), --public, --validation and
    --scale-uint8 (group "data", returned): the model and the public data, as ``qem
    finetune`` and ``qem preview`` take them (``required``: --model and --public)."""
    add_model_arguments(parser, required=required)
    data = parser.add_argument_group("data")
    data.add_argument("--public", required=required, help="public data (curvature, clip norm)")
    data.add_argument("--validation", help="public validation data for the step length")
    add_scale_uint8_argument(data)
    return data


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--model, --state-dict and --loss (group "model"), as every command that loads the user's
    model takes them (``required``: --model)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=required,
        help="module:factory (a callable without arguments returning an nn.Module; the module "
        "is looked up in the current directory, then on PYTHONPATH) or a torch.export program "
        f"file (.pt2) written by: {EXPORT_RECIPE}",
    )
    model.add_argument(
        "--state-dict",
        help="pretrained weights for a module:factory model: a .safetensors file or a .pt of "
        "torch.save(model.state_dict()) (read without unpickling code)",
    )
    model.add_argument("--loss", choices=LOSS_NAMES, default="cross_entropy")


def add_scale_uint8_argument(group: argparse._ArgumentGroup) -> None:
    """--scale-uint8, the one conversion of data files that is a choice (data_reader)."""
    group.add_argument(
        "--scale-uint8",
        action="store_true",
        help="divide uint8 inputs of NPZ files by 255 into the model's floating dtype (images "
        "stored as bytes; default: uint8 stays integer, e.g. token ids)",
    )


def run(args: argparse.Namespace) -> int:
    """In this order: check the option values, that the data files exist and (without
    --distributed) the output location, all before torch is imported; build the model and
    probe it on public rows; read the private data; fine-tune (saving every release as soon as
    it is drawn); then export, evaluate and print the report, saying where the run is saved if
    any of that fails. With --distributed, join torchrun's process group first; rank 0 alone
    checks and writes --out and prints."""
    kwargs = fine_tune_kwargs(args)
    check_data_paths(args)
    if kwargs["distributed"] is not True:  # with it, rank 0 checks once the group is up
        check_output_path(args.out, args.overwrite)
    from qem.cli.user_data import first_inputs
    from qem.cli.user_model import load_model, probe_public
    from qem.finetune import fine_tune
    from qem.losses import LOSSES

    ranks = join_processes(kwargs)
    try:
        out = _checked_on_root(ranks, args.out, args.overwrite)  # before any private data
        model = load_model(args.model, args.state_dict)
        read = data_reader(args, model)
        public = read(args.public, "--public")
        probe = first_inputs(public, 3)
        probe_public(model, probe, args.model)
        if args.export_pt2 and isinstance(probe, dict):
            raise InvalidParameterError(
                "--export-pt2 traces the model on tensor inputs; this model takes named "
                "inputs (a dict). Drop --export-pt2 and export the saved model yourself."
            )
        private = read(args.private, "--private", addressable=True)
        validation = read(args.validation, "--validation") if args.validation else None
        test = read(args.test, "--test") if args.test else None
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


DATA_OPTIONS = ("public", "private", "validation", "test")
"""The data options of ``qem finetune``."""


def check_data_paths(args: argparse.Namespace, options: tuple[str, ...] = DATA_OPTIONS) -> None:
    """Every data file the ``options`` name (not a module:factory) exists, before anything is
    imported."""
    from qem.cli.user_data import is_factory

    for option in options:
        spec = getattr(args, option)
        if spec is None or is_factory(spec):
            continue
        missing = [part for part in spec.split(",") if not Path(part).is_file()]
        if missing:
            raise DataError(f"--{option} {spec}: no file {missing[0]}.")


def data_reader(args: argparse.Namespace, model):
    """``read(spec, option, addressable=False)``: the data ``spec`` names (qem.cli.user_data),
    floating inputs in the model's floating dtype, uint8 scaled with --scale-uint8."""
    import torch

    from qem.cli.user_data import load_data

    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    float_dtype = floating[0] if floating else torch.float32

    def read(spec: str, option: str, addressable: bool = False):
        return load_data(
            spec,
            option,
            float_dtype=float_dtype,
            scale_uint8=args.scale_uint8,
            addressable=addressable,
        )

    return read


def join_processes(kwargs: dict):
    """With --distributed, torchrun's process group (nccl when --device is cuda, or auto with a
    GPU present; gloo otherwise: the command loads models on the CPU); without it, refuse to
    run as one of several torchrun processes (each would write --out alone)."""
    from qem.distributed import LocalProcess, init_from_environment, launched_by_torchrun

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


def _checked_on_root(ranks, out: str, overwrite: bool) -> Path:
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
    from qem.cli.user_data import first_inputs
    from qem.cli.user_model import export_program
    from qem.metrics import evaluate_accuracy

    results: dict[str, object] = {"out": str(out)}
    if args.export_pt2:
        example = first_inputs(public, EXPORT_EXAMPLE_ROWS)
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
