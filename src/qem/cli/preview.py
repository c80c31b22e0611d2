"""``qem preview``: what a privacy budget buys, before touching any private data
(docs/theory.md §7), in closed form for any k (qem.preview).

Without ``--model`` it needs numpy and scipy only (no torch, no k x k matrix), so that it answers
at once: A = damping * I (or the spectrum of ``--eigenvalues``), and C is ``--clip-norm`` or,
said so in the output, assumed 1. With ``--model`` and ``--public`` it computes what fine_tune
will on the same public data before its first round, the subspace, the public quadratic A and
the clip norm C (the ``--clip-quantile`` quantile of public gradient norms), and the pretrained
model's public loss, the scale the expected excess loss is to be judged against."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass

from qem.cli.commands import summary
from qem.cli.common import print_json, print_table
from qem.cli.finetune import add_model_and_public_arguments, data_reader
from qem.cli.options import (
    FINE_TUNE_OPTIONS,
    SCHEDULE_OPTIONS,
    add_budget_arguments,
    add_options,
    fine_tune_defaults,
    layer_spec,
    schedule_spec,
)
from qem.errors import DataError, InvalidParameterError

ASSUMED_CLIP_NORM = 1.0
"""C when neither --clip-norm nor --model/--public give it (said in the output)."""

GOOD_EXCESS_FRACTION = 0.1
"""A budget is comfortable when a round's expected excess loss is below this fraction of the
pretrained model's loss: the noise then costs little of what fine-tuning can gain."""

METHOD_OPTIONS = (
    "rounds", "schedule", "subspace", "k", "subspace_seed", "layers", "curvature", "damping",
    "curvature_every", "public_sample_size", "clip_norm", "clip_quantile", "prior_weight",
    "radius", "batch_size",
)  # fmt: skip
"""The options of fine_tune the preview takes, as ``qem finetune`` declares them."""

INPUTS = ("epsilon", "delta", "mode", "adjacency", "clipping", "N", "k", "lam", "clip_norm")
"""The preview's fields that echo the options (the rest is what the budget buys)."""

NOT_APPLICABLE = {"gdp": ("radius", "worst_case_acceptance"), "pure": ("delta", "mu")}
"""Fields left out of the table in each mode (None or meaningless there)."""


def add_parser(subparsers) -> None:
    """Register ``qem preview``."""
    parser = subparsers.add_parser(
        "preview",
        help=summary("preview"),
        description=(
            "Print the privacy parameters of one round and the expected excess of the "
            "quadratic surrogate, E[F_D(w)] - F_D(m_D) = k / (2 beta N), which do not depend on "
            "the private data. Without --model: A = damping * I (or --eigenvalues) and C = "
            "--clip-norm (1 if not given). With --model and --public: the subspace, A and C "
            "that fine_tune computes from the same public data and options, and the "
            "pretrained model's public loss to compare the excess with."
        ),
    )
    add_budget_arguments(parser)
    parser.add_argument(
        "--n",
        "-N",
        dest="N",
        type=int,
        required=True,
        help="dataset size N (replace-one) or its declared public bound",
    )
    options = tuple(o for o in FINE_TUNE_OPTIONS if o.keyword in METHOD_OPTIONS) + SCHEDULE_OPTIONS
    defaults = {**fine_tune_defaults(), **{o.keyword: None for o in SCHEDULE_OPTIONS}}
    add_options(
        parser,
        options,
        defaults,
        {
            "k": {"help": "subspace dimension k (without --model: required unless --eigenvalues)"},
            "damping": {"help": "gamma > 0; without --model A = gamma I"},
            "prior_weight": {
                "flags": ("--prior-weight", "--lam"),
                "help": "lam, the weight of the quadratic (default: 1 and, in gdp mode, "
                "fine_tune's free step length by public line search)",
            },
            "clip_norm": {
                "flags": ("--clip-norm", "-C"),
                "help": f"clipping bound C (default: with --model, the public quantile "
                f"fine_tune uses; without, {ASSUMED_CLIP_NORM:g}, assumed)",
            },
        },
    )
    parser.add_argument("--gamma", dest="damping", type=float, help="the same as --damping")
    parser.add_argument(
        "--eigenvalues",
        metavar="FILE",
        help="text or .npy file with the eigenvalues of A (instead of --k and --damping)",
    )
    add_model_and_public_arguments(parser, required=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class PublicSide:
    """What the preview knows of A and C: the subspace dimension, lambda_min(A), the clip
    norm and where each came from, and the pretrained model's public loss (None without
    --model)."""

    k: int
    lambda_min: float
    clip_norm: float
    clip_norm_source: str
    curvature: tuple[str, object]
    """A table row: what A is."""
    public_loss: float | None = None


def run(args: argparse.Namespace) -> int:
    """The round's preview (qem.preview), printed as inputs, what the budget buys, and what a
    good expected excess loss looks like."""
    from qem.defaults import default_schedule
    from qem.preview import (
        closed_form_preview,
        noise_dominated_rounds,
        schedule_round,
        sequential_round,
    )

    spec = schedule_spec(args)
    if spec is None and args.rounds is None:
        spec = default_schedule(args.N, args.mode)
    if spec is None or spec["kind"] == "sequential":  # closed form, without dp-accounting
        rounds = args.rounds if spec is None else spec.get("rounds", 1)
        budget = sequential_round(
            args.epsilon, args.delta, args.mode, args.adjacency, args.N, rounds or 1
        )
    else:
        budget = schedule_round(spec, args.epsilon, args.delta, args.mode, args.adjacency, args.N)
    side = public_side(args) if args.model else assumed_side(args)
    preview = closed_form_preview(
        budget,
        k=side.k,
        lambda_min=side.lambda_min,
        lam=1.0 if args.prior_weight is None else args.prior_weight,
        clip_norm=side.clip_norm,
        adjacency=args.adjacency,
        clipping=args.clipping,
        mode=args.mode,
        radius=args.radius,
        epsilon=args.epsilon,
        delta=args.delta,
    )
    run_fields = {
        "rounds": budget.rounds,
        "composed_mu": budget.mu,
        "schedule": spec or {"kind": "sequential", "rounds": budget.rounds},
        "clip_norm_source": side.clip_norm_source,
        "curvature": side.curvature[1],
        "public_loss": side.public_loss,
        "excess_vs_public_loss": None
        if side.public_loss in (None, 0.0)
        else preview["expected_excess_loss"] / side.public_loss,
        "noise_dominated_rounds": None
        if args.mode == "pure"
        else noise_dominated_rounds(args.epsilon, args.delta, args.adjacency, args.N, side.k),
    }
    if args.json:
        print_json({**preview, **run_fields})
        return 0
    hidden = NOT_APPLICABLE[args.mode]
    shown = {key: value for key, value in preview.items() if key not in hidden}
    rows = [(key, shown[key]) for key in INPUTS if key in shown]
    rows += [
        ("clip_norm_source", side.clip_norm_source),
        side.curvature,
        ("schedule", _schedule_text(run_fields)),
    ]
    print_table(rows, "qem preview: inputs")
    bought = [(key, value) for key, value in shown.items() if key not in INPUTS]
    if budget.mu is not None and budget.rounds > 1:
        bought.insert(0, ("composed mu (all rounds)", budget.mu))
    print_table(bought, "what the budget buys (per round)")
    print(textwrap.fill(guidance(preview["expected_excess_loss"], side), width=100))
    if run_fields["noise_dominated_rounds"] is not None:
        print(
            textwrap.fill(
                rounds_guidance(run_fields["noise_dominated_rounds"], args.N, args.mode), 100
            )
        )
    return 0


def _schedule_text(fields: dict) -> str:
    spec = fields["schedule"]
    extra = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("kind", "rounds"))
    return f"{spec['kind']}, {fields['rounds']} round(s)" + (f", {extra}" if extra else "")


def guidance(excess: float, side: PublicSide) -> str:
    """What a good expected excess loss looks like, against the model's loss when known."""
    target = f"under {GOOD_EXCESS_FRACTION:.0%} of the model's loss"
    if side.public_loss is None:
        return (
            "expected_excess_loss is what the noise adds, per round, to the model's mean "
            f"per-example loss (through its quadratic surrogate): good values are {target} "
            "(give --model and --public to compare it with the pretrained model's loss). "
            + (
                f"C = {ASSUMED_CLIP_NORM:g} is assumed: fine_tune's default C is the "
                "--clip-quantile quantile of public gradient norms, which can be far from 1, "
                "and the excess grows as C^2; give --clip-norm, or --model and --public."
                if side.clip_norm_source.startswith("assumed")
                else ""
            )
        )
    ratio = excess / side.public_loss if side.public_loss > 0 else float("inf")
    verdict = (
        "good: the noise costs little of what fine-tuning can gain"
        if ratio < GOOD_EXCESS_FRACTION
        else "the noise dominates: the release would mostly add loss"
        if ratio >= 1
        else "marginal: the noise costs a sizeable part of what fine-tuning can gain"
    )
    return (
        f"expected excess loss per round {excess:.4g} = {ratio:.3g} x the pretrained model's "
        f"public loss {side.public_loss:.4g} ({verdict}; good values are {target}; lower it "
        "with a larger epsilon or N, a smaller k, or fewer rounds)."
    )


def rounds_guidance(limit: float, n: int, mode: str) -> str:
    """The regime of n records: how many rounds the budget affords before each is mostly noise
    (qem.preview.noise_dominated_rounds), beside the default schedule's choice for n."""
    from qem.defaults import default_schedule

    default = default_schedule(n, mode)
    return (
        f"rounds: beyond about {limit:.3g} sequential rounds on n = {n} records, a round's noise "
        "is larger than the largest clipped gradient sum it can carry (T* = (n mu / (s "
        "sqrt(k)))^2); real gradient sums are shorter, so useful schedules stay well below it. "
        f"The default schedule for n = {n} is {default['kind']} with {default['rounds']} "
        "round(s)"
        + (
            f" of {default['expected_batch']} expected records."
            if default["kind"] == "poisson"
            else " over every record."
        )
    )


def assumed_side(args: argparse.Namespace) -> PublicSide:
    """A = damping * I of dimension --k, or the spectrum of --eigenvalues; C = --clip-norm,
    or assumed 1."""
    if args.clip_norm is not None:
        clip_norm, source = args.clip_norm, "given"
    else:
        clip_norm, source = ASSUMED_CLIP_NORM, "assumed: give --clip-norm, or --model and --public"
    if args.eigenvalues:
        values = _eigenvalues(args.eigenvalues)
        curvature = ("eigenvalues of A", args.eigenvalues)
        return PublicSide(len(values), float(min(values)), clip_norm, source, curvature)
    if args.k is None:
        raise DataError("give --k (with --damping), --eigenvalues FILE, or --model and --public.")
    if not args.damping > 0:
        raise InvalidParameterError(
            f"A = gamma I must be positive definite: --damping gamma must be > 0, got "
            f"{args.damping!r}."
        )
    return PublicSide(
        args.k, args.damping, clip_norm, source, ("gamma (A = gamma I)", args.damping)
    )


def _eigenvalues(path: str) -> list[float]:
    import numpy as np

    try:
        values = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read eigenvalues from {path}: {error}") from None
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise DataError(f"{path}: the eigenvalues must be finite numbers, and at least one.")
    if values.min() <= 0:
        raise InvalidParameterError(
            f"{path}: A must be positive definite, but its smallest eigenvalue is "
            f"{values.min():.4g}."
        )
    return values.tolist()


def public_side(args: argparse.Namespace) -> PublicSide:
    """What fine_tune computes before its first round, on the same public data: the held-out
    validation split when --validation is not given (gdp mode without --prior-weight: the
    preview runs no line search but leaves the same rows out), the subspace, the public
    quadratic and C (the public quantile unless --clip-norm), and the pretrained model's mean
    loss on the public passes' data. Imports torch."""
    if args.public is None:
        raise InvalidParameterError(
            "--model needs --public (the data fine_tune's public passes read)."
        )
    if args.eigenvalues:
        raise InvalidParameterError("give --model or --eigenvalues, not both.")
    import copy

    from qem.cli.user_model import load_model
    from qem.distributed import LocalProcess
    from qem.finetune.inputs import RunData
    from qem.losses import LOSSES
    from qem.metrics import evaluate_loss
    from qem.privacy.sensitivity import ClipNorm
    from qem.public import config
    from qem.public.side import PublicSideState
    from qem.timing import PhaseTimer

    model = copy.deepcopy(load_model(args.model, args.state_dict)).eval()
    read = data_reader(args, model)
    validation = None if args.validation is None else read(args.validation, "--validation")
    public_data = read(args.public, "--public")  # no private data: read as both, only public used
    data = RunData.build(
        public_data, public_data, validation,
        searches=args.mode == "gdp" and args.prior_weight is None,
        public_sample_size=args.public_sample_size,
    )  # fmt: skip
    loss_fn = LOSSES[args.loss]
    layers = None if args.layers is None else [layer_spec(entry) for entry in args.layers]
    settings = config.PublicSide(
        subspace=args.subspace, k=args.k, subspace_seed=args.subspace_seed, layers=layers,
        curvature=args.curvature, damping=args.damping, curvature_every=args.curvature_every,
        clip_norm=args.clip_norm, clip_quantile=args.clip_quantile,
        public_sample_size=args.public_sample_size,
    ).for_model(model)  # fmt: skip
    side = PublicSideState(
        settings, loss_fn, data.public, redraw_every=None, clipping=ClipNorm(args.clipping),
        batch_size=args.batch_size, progress=False,
    )  # fmt: skip
    first = side.prepare(0, model, PhaseTimer(), LocalProcess())  # round 1's public side
    basis, quadratic, clip_norm = first.basis, first.quadratic, first.clip_norm
    source = (
        "given"
        if args.clip_norm is not None
        else f"public quantile {args.clip_quantile}, as fine_tune computes it"
    )
    return PublicSide(
        k=basis.k,
        lambda_min=quadratic.lambda_min,
        clip_norm=clip_norm,
        clip_norm_source=source,
        curvature=("curvature", f"{args.curvature} on the public data, gamma {args.damping}"),
        public_loss=evaluate_loss(model, loss_fn, data.public, batch_size=args.batch_size),
    )
