"""``qem audit``: empirical privacy audit of the mechanism on a synthetic worst-case pair
(qem.audit)."""

from __future__ import annotations

import argparse

from qem.audit import AUDIT_DEFAULTS, DEFAULT_CONFIDENCE, AuditResult, run_audit
from qem.cli.commands import summary
from qem.cli.common import print_json, print_table
from qem.cli.options import add_budget_arguments
from qem.curvature.factory import CURVATURES

DESCRIPTION = """\
Black-box membership-inference audit of qem's releases. On a tiny logistic-regression model
with fixed public data, curvature and clip norm, qem builds two neighbouring private datasets
whose differing record is as influential as clipping allows (replace-one: the same far-out
record with label 0 in one and 1 in the other; add/remove: the record added, N declared),
draws --n releases on each through qem.fine_tune with noise from operating-system entropy, and
tests how well the released parameters tell the two apart:

  empirical mu    the standardised shift of the released parameters along the direction that
                  separates the datasets (the most powerful statistic for a Gaussian release),
                  with a normal-approximation confidence interval (Hedges & Olkin 1985);
  eps lower bound a threshold test on that statistic, threshold chosen on half of the
                  releases, error rates bounded on the other half by exact Clopper-Pearson
                  bounds (Jagielski et al. 2020, Nasr et al. 2021).

Verdict FAIL (exit status 1) when the interval of mu lies entirely above the claimed mu for
(epsilon, delta) (Gaussian-DP mode), or when the eps lower bound exceeds epsilon; PASS (exit
status 0) otherwise. The claim is computed from the options, not read from fine_tune's report.

What it covers: the mechanism end to end through the public API (clipping, sensitivity,
calibration, composition of rounds, sampling), on this synthetic pair. What it does not: it
cannot prove privacy, only catch violations large enough to show in --n releases; it does not
look at your model, your data, or privacy leaks outside the released parameters (timing of the
pure mode's rejection sampler, for one). Only the final model is observed, so with
--partition-rounds the rounds that do not read the differing record hide part of the shift
(visible mu = mu / sqrt(rounds)), and with --line-search the random step length lowers the
visible mu: a PASS there is weaker evidence. In the pure mode only the eps bound is checked,
and the exponential mechanism's bound is loose there, so only gross violations show.
"""


def add_parser(subparsers) -> None:
    """Register ``qem audit``."""
    parser = subparsers.add_parser(
        "audit",
        help=summary("audit"),
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_budget_arguments(parser, epsilon=AUDIT_DEFAULTS["epsilon"])
    schedule = parser.add_argument_group("mechanism")
    schedule.add_argument("--rounds", type=int, default=1, help="rounds T (default 1)")
    schedule.add_argument(
        "--partition-rounds",
        action="store_true",
        help="round t reads only the t-th of T disjoint chunks (replace_one, gdp)",
    )
    schedule.add_argument(
        "--curvature",
        choices=sorted(CURVATURES),
        default=AUDIT_DEFAULTS["curvature"],
        help=f"public curvature (default {AUDIT_DEFAULTS['curvature']}: A = gamma I)",
    )
    schedule.add_argument(
        "--line-search",
        action="store_true",
        help="choose the step length by the public line search instead of lam = "
        f"{AUDIT_DEFAULTS['prior_weight']} (weaker audit, see above)",
    )
    audit = parser.add_argument_group("audit")
    audit.add_argument(
        "--n", type=int, default=2000, help="releases per dataset (default 2000; >= 20)"
    )
    audit.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"confidence of the interval and of the eps bound (default {DEFAULT_CONFIDENCE})",
    )
    audit.add_argument(
        "--split-seed", type=int, default=0, help="seed of the held-out split (not of the noise)"
    )
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def configuration(args: argparse.Namespace) -> dict:
    """The fine_tune keywords the options ask for (over qem.audit.AUDIT_DEFAULTS)."""
    config = {
        "epsilon": args.epsilon,
        "delta": args.delta,
        "mode": args.mode,
        "adjacency": args.adjacency,
        "clipping": args.clipping,
        "rounds": args.rounds,
        "curvature": args.curvature,
    }
    if args.partition_rounds:
        config["partition_rounds"] = True
    if args.line_search:
        config["prior_weight"] = None
    return config


def _table(result: AuditResult) -> list[tuple[str, object]]:
    config, bound = result.configuration, result.epsilon_bound
    lo, hi = result.mu_interval
    schedule = f"{config.get('rounds', 1)} round(s)" + (
        ", partitioned" if config.get("partition_rounds") else ""
    )
    return [
        (
            "configuration",
            f"{config.get('mode', 'gdp')}, {config.get('adjacency', 'replace_one')}, "
            f"{config.get('clipping', 'dual')} clipping, {schedule}, "
            f"curvature {config['curvature']}, lam {config['prior_weight'] or 'line search'}",
        ),
        ("releases per dataset", result.n),
        ("claimed epsilon", result.claimed_epsilon),
        ("delta", result.delta),
        ("claimed mu", "n/a (pure mode)" if result.claimed_mu is None else result.claimed_mu),
        ("empirical mu", result.mu),
        (f"mu interval ({result.confidence:g})", f"[{lo:.4f}, {hi:.4f}] normal approximation"),
        ("eps lower bound", bound.epsilon),
        ("  FPR, FNR upper", f"{bound.fpr_upper:.4f}, {bound.fnr_upper:.4f} (Clopper-Pearson)"),
        ("verdict", result.verdict),
        *[("  reason", reason) for reason in result.reasons],
        ("seconds", result.seconds),
    ]


def run(args: argparse.Namespace) -> int:
    """Run the audit; exit status 0 on PASS, 1 on FAIL."""
    result = run_audit(
        configuration(args),
        n=args.n,
        confidence=args.confidence,
        split_seed=args.split_seed,
        progress=not (args.json or args.no_progress),
    )
    if args.json:
        print_json(result.to_dict())
    else:
        print_table(_table(result), "qem audit")
    return 0 if result.passed else 1
