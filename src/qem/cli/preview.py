"""``qem preview``: what a privacy budget buys, before touching any data (DESIGN.md §1c)."""

from __future__ import annotations

import argparse

import numpy as np

from qem.cli.common import add_budget_arguments, print_json, print_table
from qem.errors import DataError
from qem.mechanism import QuadraticExponentialMechanism


def add_parser(subparsers) -> None:
    """Register ``qem preview``."""
    parser = subparsers.add_parser(
        "preview",
        help="preview mu, beta, noise scale and expected excess loss for a budget",
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


def run(args: argparse.Namespace) -> int:
    """Build the mechanism on A and print its preview."""
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
        print_json(preview)
    else:
        print_table([(key, value) for key, value in preview.items()], "qem preview")
    return 0
