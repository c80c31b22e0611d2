"""``qem finetune``: private fine-tuning of a user's model on user files."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn

from qem.cli.common import ReleaseSaver, add_budget_arguments, print_json, print_table
from qem.datasets.files import load_supervised_file
from qem.errors import DataError, UnsupportedModelError
from qem.finetune import fine_tune
from qem.io import check_output_path
from qem.losses import LOSSES
from qem.metrics import evaluate_accuracy
from qem.model_files import load_exported_model


def add_parser(subparsers) -> None:
    """Register ``qem finetune``."""
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model privately on NPZ/IDX data and write model + privacy report",
        description=(
            "Fine-tune a pretrained model on private data with a differential-privacy "
            "guarantee, and write model.pt and privacy_report.json atomically into --out. "
            "Data files: .npz with arrays x and y (or x_train/y_train), or an IDX pair given as "
            "IMAGES.idx[.gz],LABELS.idx[.gz]."
        ),
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="module:factory (a callable returning an nn.Module) or a "
        "torch.export program file (.pt2)",
    )
    model.add_argument("--state-dict", help="state dict (.pt) of the pretrained weights")
    model.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy")
    data = parser.add_argument_group("data")
    data.add_argument("--public", required=True, help="public data file (curvature, clip norm)")
    data.add_argument("--private", required=True, help="private data file")
    data.add_argument("--validation", help="public validation file for the step length")
    data.add_argument("--test", help="optional test file: report accuracy before/after")
    add_budget_arguments(parser)
    method = parser.add_argument_group("method")
    method.add_argument(
        "--subspace",
        default="srht",
        choices=("identity", "last_layer", "biases", "dense", "srht", "kronecker"),
    )
    method.add_argument(
        "--k",
        type=int,
        help="subspace dimension (default 512 for dense/srht/kronecker; "
        "fixed by the parameters for identity/last_layer/biases)",
    )
    method.add_argument("--subspace-seed", type=int, default=0, help="public seed of P")
    method.add_argument(
        "--curvature", default="ggn", choices=("ggn", "fisher", "hessian", "identity")
    )
    method.add_argument("--damping", type=float, default=1e-2, help="gamma > 0")
    method.add_argument(
        "--clip-norm",
        type=float,
        help="clipping bound C (default: a quantile of public gradient norms)",
    )
    method.add_argument("--clip-quantile", type=float, default=0.9)
    method.add_argument(
        "--prior-weight",
        type=float,
        help="lam; default: step length by public line search (gdp mode)",
    )
    method.add_argument("--N", type=int, help="declared dataset size (required for add_remove)")
    method.add_argument("--rounds", type=int, default=1)
    method.add_argument("--radius", type=float, help="pure mode: radius R (default: chosen)")
    method.add_argument("--batch-size", type=int, default=256)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output directory (must not exist)")
    output.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    output.add_argument(
        "--seed", type=int, help="reproducible noise (recorded in the report); default: OS entropy"
    )
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run)


def load_model(spec: str, state_dict: str | None) -> nn.Module:
    """Build the model from ``module:factory`` or a torch.export ``.pt2`` file."""
    if spec.endswith(".pt2"):
        if not Path(spec).is_file():
            raise DataError(f"model file {spec} does not exist.")
        model = load_exported_model(spec)
    elif ":" in spec:
        module_name, _, factory_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise DataError(f"cannot import {spec}: {error}") from error
        model = factory()
    elif Path(spec).is_file():
        raise UnsupportedModelError(
            f"{spec}: TorchScript models cannot be differentiated per example with torch.func. "
            "Save the model with torch.export.save(torch.export.export(model, (x,)), 'm.pt2') "
            "or pass module:factory with --state-dict."
        )
    else:
        raise DataError(f"--model must be module:factory or an existing .pt2 file, got {spec!r}.")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{spec} did not give a torch.nn.Module.")
    if state_dict:
        model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return model


def run(args: argparse.Namespace) -> int:
    """Check the output path, load model and data, fine-tune (saving every release as soon as
    it is drawn), then evaluate and print the report."""
    out = check_output_path(args.out, args.overwrite)  # before any private data is read
    model = load_model(args.model, args.state_dict)
    public = load_supervised_file(args.public)
    private = load_supervised_file(args.private)
    validation = load_supervised_file(args.validation) if args.validation else None
    test = load_supervised_file(args.test) if args.test else None
    saver = ReleaseSaver(out, args.overwrite)
    result = saver.run(
        fine_tune,
        model,
        LOSSES[args.loss],
        public,
        private,
        epsilon=args.epsilon,
        delta=args.delta,
        subspace=args.subspace,
        k=args.k,
        subspace_seed=args.subspace_seed,
        curvature=args.curvature,
        damping=args.damping,
        clip_norm=args.clip_norm,
        clip_quantile=args.clip_quantile,
        clipping=args.clipping,
        prior_weight=args.prior_weight,
        mode=args.mode,
        adjacency=args.adjacency,
        N=args.N,
        rounds=args.rounds,
        validation_data=validation,
        radius=args.radius,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    summary = {"out": str(out)}
    if test is not None:
        with saver.after_release("evaluating --test"):
            summary["pretrained_test_accuracy"] = evaluate_accuracy(model, test)
            summary["finetuned_test_accuracy"] = evaluate_accuracy(result.model, test)
    report = result.report
    if args.json:
        print_json({**summary, "report": report.to_dict()})
    else:
        print_table(
            [
                ("mode", report.mode),
                ("adjacency", report.adjacency),
                ("epsilon", report.epsilon),
                ("delta", report.delta),
                ("guarantee", report.guarantee),
                ("mu", report.mu),
                ("k", report.k),
                ("subspace", report.subspace["type"]),
                ("step lengths", report.step_lengths),
                *summary.items(),
            ],
            "qem finetune: privacy report (full report in privacy_report.json)",
        )
    return 0
