"""``qem audit``: empirical privacy audits of qem's release paths on worst-case pairs, and the
one-run canary audit of a real fine-tuning (qem.audit)."""

from __future__ import annotations

import argparse

from qem.cli.commands import summary
from qem.cli.common import print_json, print_table

DESCRIPTION = """\
Empirical privacy audits of qem's releases (docs/theory.md §17).

Pair audit (default): on a tiny linear model with fixed public data, qem builds two neighbouring
private datasets whose differing record is as influential as clipping allows in every subspace,
curvature and clip norm (a far-out record whose two labels give opposite gradients), runs
qem.fine_tune once on each with every round's mechanism recorded, and draws --n releases per
dataset and round from those mechanisms, noise from operating-system entropy. It tests how well
the releases (every round's) tell the two datasets apart, with the log-likelihood ratio of the
claimed Gaussians as statistic:

  empirical mu     its standardised shift (Gaussian-DP paths), with a normal-approximation
                   interval (Hedges & Olkin 1985), against the mu of (epsilon, delta);
  eps lower bound  a threshold test, threshold chosen on half of the releases, error rates
                   bounded on the other half by exact Clopper-Pearson bounds;
  trade-off        the empirical ROC widened by a simultaneous DKW band against the claimed
                   trade-off curve (Gaussian; dp-accounting's PLD profile for Poisson).

FAIL (exit status 1) when the mu interval lies above the claim, the eps bound exceeds epsilon,
the ROC lies below the claimed curve, or (Poisson) the run's (z, q, T) spend more than epsilon
by an independent PLD computation. --path picks a release path (--all: every one); --end-to-end
runs fine_tune n times per dataset and reads only the final model (the engine as a whole,
slower). A PASS does not prove privacy: the audit catches violations large enough to show in
--n releases (docs/theory.md §17 gives the smallest it flags), on this synthetic pair, and
nothing outside the released parameters (timing, for one).

One-run audit (--one-run): m canaries, each included with probability 1/2 by an OS coin, in ONE
fine-tuning of the MNIST S1 demo (add/remove, N declared); each canary is scored from the
releases (a generalised least-squares estimate of its inclusion), and the number of correct
guesses gives an eps lower bound at delta (Steinke, Nasr & Jagielski 2023). --canary-kind
gradients (default, white-box): canaries whose clipped gradients are public random directions
at the clip bound, added to the private sum; records: images of pixel noise with random labels
appended to the private data (black-box, weaker: their gradients are nearly collinear).

--noise-scale and --seeded-bug plant audit-only faults, to see an audit flag them.
"""


def add_parser(subparsers) -> None:
    """Register ``qem audit``."""
    from qem.audit.release_paths import SEEDED_BUGS
    from qem.audit.run import DEFAULT_CONFIDENCE, DEFAULT_N, PATHS

    parser = subparsers.add_parser(
        "audit",
        help=summary("audit"),
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epsilon", type=float, help="target epsilon (default: the path's, 1)")
    parser.add_argument("--delta", type=float, help="target delta (default: the path's, 1e-5)")
    pairs = parser.add_argument_group("pair audit")
    pairs.add_argument(
        "--path",
        choices=sorted(PATHS),
        default="sequential",
        help="release path (default sequential)",
    )
    pairs.add_argument("--all", action="store_true", help="audit every release path")
    pairs.add_argument(
        "--end-to-end",
        action="store_true",
        help="n full fine_tune runs per dataset, final model only (slower; "
        f"default n {DEFAULT_N['end_to_end']})",
    )
    pairs.add_argument(
        "--n", type=int, help=f"releases per dataset (default {DEFAULT_N['batched']}; >= 20)"
    )
    pairs.add_argument(
        "--confidence",
        type=float,
        help=f"confidence of the intervals and bounds (default {DEFAULT_CONFIDENCE}; one-run 0.95)",
    )
    pairs.add_argument(
        "--split-seed", type=int, default=0, help="seed of the held-out split (not of the noise)"
    )
    one_run = parser.add_argument_group("one-run audit")
    one_run.add_argument("--one-run", action="store_true", help="one-run canary audit of MNIST S1")
    one_run.add_argument("--canaries", type=int, help="canaries m (default 1000)")
    one_run.add_argument(
        "--canary-kind",
        choices=("gradients", "records"),
        default="gradients",
        help="gradient canaries (white-box, default) or pixel-noise images (black-box)",
    )
    one_run.add_argument(
        "--private-size", type=int, help="use only this many private MNIST images (default 49000)"
    )
    one_run.add_argument("--cache-dir", help="pretrained-model cache (default qem.pretrain's)")
    faults = parser.add_argument_group("seeded faults (audit-only)")
    faults.add_argument(
        "--noise-scale", type=float, help="multiply the mechanism's noise std (0.25: z / 4)"
    )
    faults.add_argument("--seeded-bug", choices=sorted(SEEDED_BUGS), help="plant a fault")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def _budget(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("epsilon", args.epsilon), ("delta", args.delta)) if v is not None}


def run(args: argparse.Namespace) -> int:
    """Run the audit(s); exit status 0 on PASS, 1 on any FAIL."""
    if args.one_run:
        return _one_run(args)
    from qem.audit.run import PATHS, run_audit

    names = list(PATHS) if args.all else [args.path]
    options = {"end_to_end": args.end_to_end, "n": args.n, "split_seed": args.split_seed}
    if args.confidence is not None:
        options["confidence"] = args.confidence
    results = [
        run_audit(
            name,
            _budget(args),
            noise_scale=args.noise_scale,
            seeded_bug=args.seeded_bug,
            progress=not (args.json or args.no_progress or args.all),
            **options,
        )
        for name in names
    ]
    if args.json:
        documents = [result.to_dict() for result in results]
        print_json(documents if args.all else documents[0])
    elif args.all:
        print_table([(result.path, _line(result)) for result in results], "qem audit: every path")
    else:
        print_table(_table(results[0]), "qem audit")
    return 0 if all(result.passed for result in results) else 1


def _line(result) -> str:
    """One path's verdict, empirical value, interval and seconds."""
    if result.mu is not None:
        lo, hi = result.mu_interval
        value = f"mu {result.mu:.3f} [{lo:.3f}, {hi:.3f}] vs {result.claimed_mu:.3f}"
    else:
        value = f"eps_lb {result.epsilon_bound.epsilon:.3f} vs {result.claimed_epsilon:g}"
    return (
        f"{result.verdict}  {value}  eps_lb {result.epsilon_bound.epsilon:.3f}  trade-off "
        f"{result.tradeoff_excess:+.3f}  {result.seconds:.1f} s"
    )


def _table(result) -> list[tuple[str, object]]:
    config, bound = result.configuration, result.epsilon_bound
    rows: list[tuple[str, object]] = [
        ("path", f"{result.path} ({result.method.replace('_', ' ')})"),
        (
            "configuration",
            ", ".join(
                f"{key}={value}" for key, value in config.items() if key not in ("epsilon", "delta")
            ),
        ),
        ("releases per dataset", result.n),
        ("claimed epsilon, delta", f"{result.claimed_epsilon:g}, {result.delta:g}"),
    ]
    if result.seeded_bug or result.noise_scale:
        rows.append(("seeded fault", result.seeded_bug or f"noise std x {result.noise_scale:g}"))
    if result.claimed_mu is not None:
        lo, hi = result.mu_interval
        rows += [
            ("claimed mu", result.claimed_mu),
            ("empirical mu", result.mu),
            (f"mu interval ({result.confidence:g})", f"[{lo:.4f}, {hi:.4f}] normal approximation"),
        ]
    if result.pair_mu is not None:
        rows.append(("pair mu (mechanism's own)", result.pair_mu))
    if result.accountant_epsilon is not None:
        rows.append(("accountant epsilon (PLD)", result.accountant_epsilon))
    if result.attained:
        rows.append(("sensitivity attained", ", ".join(f"{a:.3f}" for a in result.attained)))
    rows += [
        ("eps lower bound", bound.epsilon),
        ("  FPR, FNR upper", f"{bound.fpr_upper:.4f}, {bound.fnr_upper:.4f} (Clopper-Pearson)"),
        ("trade-off excess", f"{result.tradeoff_excess:+.4f} (> 0: below the claimed curve)"),
        ("verdict", result.verdict),
        *[("  reason", reason) for reason in result.reasons],
        ("seconds", result.seconds),
    ]
    return rows


def _one_run(args: argparse.Namespace) -> int:
    from qem.audit.one_run import MNIST_CANARIES, ONE_RUN_CONFIDENCE, mnist_task, one_run_audit

    task = mnist_task(
        args.canaries or MNIST_CANARIES,
        kind=args.canary_kind,
        private_size=args.private_size,
        cache_dir=args.cache_dir,
        configuration=_budget(args),
    )
    result = one_run_audit(
        task,
        confidence=args.confidence or ONE_RUN_CONFIDENCE,
        noise_scale=args.noise_scale,
        seeded_bug=args.seeded_bug,
    )
    if args.json:
        print_json(result.to_dict())
    else:
        bound = result.bound
        rows = [
            ("task", result.task),
            (
                "canaries included",
                f"{result.included_count} of {result.canaries} {result.canary_kind} (OS coins)",
            ),
            (
                "claimed epsilon, delta",
                f"{result.claimed_epsilon:g}, {result.delta:g} (add/remove, N declared)",
            ),
            ("accountant epsilon", result.accountant_epsilon),
            (f"eps lower bound ({result.confidence:g})", bound.epsilon),
            (
                "  guesses",
                f"{bound.correct} correct of {2 * bound.positive_guesses} (top and bottom "
                f"{bound.positive_guesses}; best of {bound.candidates}, Bonferroni)",
            ),
            ("verdict", result.verdict),
            ("seconds", result.seconds),
        ]
        if result.noise_scale or result.seeded_bug:
            rows.insert(
                1, ("seeded fault", result.seeded_bug or f"noise std x {result.noise_scale:g}")
            )
        print_table(rows, "qem audit --one-run")
    return 0 if result.passed else 1
