"""``qem preview``: what a privacy budget buys, before touching any data (docs/theory.md §7).

It needs numpy and qem.mechanism only (no torch), so that it answers at once."""

from __future__ import annotations

import argparse

import numpy as np

from qem.cli.commands import summary
from qem.cli.common import print_json, print_table
from qem.cli.options import add_budget_arguments
from qem.errors import DataError
from qem.mechanism import QuadraticExponentialMechanism


def add_parser(subparsers) -> None:
    """Register ``qem preview``."""
    parser = subparsers.add_parser(
        "preview",
        help=summary("preview"),
        description=(
            "Print the privacy parameters and the expected excess of the quadratic surrogate, "
            "E[F_D(w)] - F_D(m_D) = k / (2 beta N), which do not depend on the private data. "
            "A = gamma I unless --eigenvalues gives the spectrum of A."
        ),
    )
    add_budget_arguments(parser)
    parser.add_argument("--clip-norm", "-C", type=float, default=1.0, help="clipping bound C")
    parser.add_argument(
        "--n",
        "-N",
        dest="N",
        type=int,
        required=True,
        help="dataset size N (replace-one) or its declared public bound",
    )
    parser.add_argument("--k", type=int, help="subspace dimension (with A = gamma I)")
    parser.add_argument("--lam", type=float, default=1.0, help="weight lam of the quadratic")
    parser.add_argument("--gamma", type=float, default=1.0, help="damping; A = gamma I")
    parser.add_argument(
        "--eigenvalues",
        metavar="FILE",
        help="text or .npy file with the eigenvalues of A (overrides --k/--gamma)",
    )
    parser.add_argument("--radius", type=float, help="pure mode: radius R (default: chosen)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def _curvature(args: argparse.Namespace) -> np.ndarray:
    if args.eigenvalues:
        path = args.eigenvalues
        try:
            values = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read eigenvalues from {path}: {error}") from error
        return np.diag(np.asarray(values, dtype=np.float64).ravel())
    if args.k is None:
        raise DataError("give --k (with --gamma) or --eigenvalues FILE.")
    if args.k < 1:
        raise DataError(f"--k must be >= 1, got {args.k}.")
    return args.gamma * np.eye(args.k)


INPUTS = ("epsilon", "delta", "mode", "adjacency", "clipping", "N", "k", "lam", "clip_norm")
"""The preview's fields that echo the options (the rest is what the budget buys)."""

NOT_APPLICABLE = {"gdp": ("radius", "worst_case_acceptance"), "pure": ("delta", "mu")}
"""Fields left out of the table in each mode (None or meaningless there)."""


def run(args: argparse.Namespace) -> int:
    """Build the mechanism on A and print its preview: the inputs, then what they buy."""
    mechanism = QuadraticExponentialMechanism(
        _curvature(args),
        N=args.N,
        lam=args.lam,
        clip_norm=args.clip_norm,
        adjacency=args.adjacency,
        clipping=args.clipping,
        mode=args.mode,
        radius=args.radius,
    )
    mechanism.calibrate(args.epsilon, args.delta if args.mode == "gdp" else None)
    preview = mechanism.preview().to_dict()
    if args.json:
        print_json({**preview, "gamma": None if args.eigenvalues else args.gamma,
                    "eigenvalues": args.eigenvalues})  # fmt: skip
        return 0
    curvature = ("gamma (A = gamma I)", args.gamma)
    if args.eigenvalues:
        curvature = ("eigenvalues of A", args.eigenvalues)
    hidden = NOT_APPLICABLE[args.mode]
    shown = {key: value for key, value in preview.items() if key not in hidden}
    print_table(
        [*((key, shown[key]) for key in INPUTS if key in shown), curvature],
        "qem preview: inputs",
    )
    print_table(
        [(key, value) for key, value in shown.items() if key not in INPUTS],
        "what the budget buys",
    )
    return 0
