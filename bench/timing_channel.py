"""Timing channel of the private pass: does its wall time tell a dataset with one invalid record
from its neighbour?

D holds one private record whose input is NaN (its gradient is not finite; the default policy
invalid_records='zero' makes it contribute a zero gradient); D' is D with that record replaced
by a valid one. The private pass (``qem.statistics.private_gradient_sum``, the public function
the round engine calls) runs --runs times on each, interleaved D, D', D, D', ... in one
process, and the AUC of the two samples of wall times is the probability that a D run is slower
than a D' run (0.5: no channel), with its 95% interval (Mann-Whitney U, Hanley & McNeil 1982
standard error). An observer who times a release sees this channel; docs/theory.md §12 (sharp
edges) says what it reveals.

    .venv/bin/python bench/timing_channel.py [--runs 1000] [--records 256] [--k 16]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy import stats
from torch import nn

from qem.losses import cross_entropy
from qem.quadratic import PublicQuadratic
from qem.statistics import private_gradient_sum
from qem.subspace.factory import make_subspace


def auc_with_interval(slower: np.ndarray, faster: np.ndarray) -> tuple[float, float, float]:
    """AUC = P(a draw of ``slower`` > a draw of ``faster``) (ties count 1/2) from the
    Mann-Whitney U statistic, and its 95% normal interval with Hanley & McNeil's (1982)
    standard error."""
    u = stats.mannwhitneyu(slower, faster, alternative="two-sided").statistic
    n1, n0 = len(slower), len(faster)
    auc = u / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt(
        (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    )
    return float(auc), float(auc - 1.96 * se), float(auc + 1.96 * se)


def task(records: int, seed: int = 0):
    """A 6-16-3 tanh MLP (float32, as models usually are) and two neighbouring datasets."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x = torch.from_numpy(rng.standard_normal((records, 6)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, records))
    invalid = x.clone()
    invalid[records // 2, 2] = float("nan")
    return model, (invalid, y), (x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs per dataset (default 1000)")
    parser.add_argument("--records", type=int, default=256, help="private records (default 256)")
    parser.add_argument("--k", type=int, default=16, help="subspace dimension (default 16)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, invalid, valid = task(args.records)
    subspace = make_subspace("dense", model, k=args.k, seed=0)
    quadratic = PublicQuadratic.from_matrix(np.diag(np.linspace(1.0, 2.0, args.k)))
    options = dict(clip_norm=1.0, cholesky=quadratic.cholesky, batch_size=args.batch_size)

    def seconds(data) -> float:
        start = time.perf_counter()
        private_gradient_sum(model, cross_entropy, subspace, data, **options)
        return time.perf_counter() - start

    for data in (invalid, valid):  # warm-up: first calls compile and allocate
        for _ in range(20):
            seconds(data)
    times = np.empty((2, args.runs))
    for i in range(args.runs):
        times[0, i] = seconds(invalid)
        times[1, i] = seconds(valid)
    auc, lo, hi = auc_with_interval(times[0], times[1])
    print(
        f"# private pass, {args.records} records (one with a NaN input in D), k = {args.k}, "
        f"batch {args.batch_size}, torch threads {args.threads}, {args.runs} runs per dataset"
    )
    print(f"{'dataset':<28} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}")
    for name, sample in (("D (one invalid record)", times[0]), ("D' (valid neighbour)", times[1])):
        p10, median, p90 = np.percentile(sample, [10, 50, 90]) * 1e3
        print(f"{name:<28} {median:>10.3f} {p10:>8.3f} {p90:>8.3f}")
    print(f"AUC P(D slower than D') = {auc:.3f}  95% interval [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
