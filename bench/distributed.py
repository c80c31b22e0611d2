"""Data parallel: one qem run in 1 process versus 2 gloo processes (docs/theory.md §16), seconds
per round phase.

Model and data as bench/scale.py: all-MiniLM-L6-v2 + mean pooling + linear head
(``minilm_classifier``) on tweets of the ``text_transfer`` scenario, a Kronecker subspace of
dimension ``--k`` over its trainable Linear layers, GGN curvature and clip norm on
``--public-size`` public tweets, line search on ``--valid-size`` others, ``--rounds`` sequential
rounds over ``--private-size`` private tweets. Each process runs torch on one thread. With two
processes each reads half of the private tweets; rank 0 alone computes the public side and
draws the noise, so only the private pass is shared. The table gives rank 0's seconds per round
(``public_broadcast``: sending A, L and C, and for rank 1 waiting for them; ``private_pass`` of
rank 0 includes waiting for rank 1 in the all-reduce) and, for two processes, rank 1's private
pass alone.

    .venv/bin/python bench/distributed.py [--private-size 400] [--k 1024] [--rounds 2]

The default size takes about 3 minutes on 2 cores. Timings are diagnostics of one run on a
shared machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.multiprocessing as mp

PHASES = ("curvature", "clip_norm", "public_broadcast", "private_pass", "mechanism", "line_search")


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process: join the group (if several), fine-tune, write the seconds per round."""
    torch.set_num_threads(1)
    from qem.finetune import ZeroStepWarning, fine_tune
    from qem.losses import cross_entropy
    from qem.models import build_model
    from qem.subspace.kronecker import Kronecker
    from scale import linear_layers, tweets  # bench/scale.py, beside this script

    warnings.simplefilter("ignore", ZeroStepWarning)  # costs only: the step is not the point
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    scenario = tweets(args)
    model = build_model("minilm_classifier", seed=0)
    layers = linear_layers(model, blocks=None)
    start = time.perf_counter()
    result = fine_tune(
        model,
        cross_entropy,
        scenario.public_train,
        scenario.private_train,
        epsilon=8.0,
        rounds=args.rounds,
        subspace=Kronecker(model, args.k, seed=0, layers=layers),
        curvature="ggn",
        validation_data=scenario.public_valid,
        batch_size=args.batch_size,
        seed=0,
        distributed=world > 1,
    )
    wall = time.perf_counter() - start
    d = int(result.report.subspace["d"])
    record = {"rounds": result.diagnostics.round_seconds, "wall": wall, "d": d}
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(record))
    if world > 1:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def per_round(record: dict, phase: str) -> float:
    """Mean seconds of ``phase`` over the rounds."""
    rounds = record["rounds"]
    return sum(r.get(phase, 0.0) for r in rounds) / len(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private-size", type=int, default=400)
    parser.add_argument("--public-size", type=int, default=64)
    parser.add_argument("--valid-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    records = {}
    with TemporaryDirectory() as out:
        for world in (1, 2):
            mp.start_processes(
                run_rank,
                args=(world, free_port(), args, out),
                nprocs=world,
                start_method="spawn",
            )
            records[world] = [
                json.loads(Path(out, f"{world}-{rank}.json").read_text()) for rank in range(world)
            ]
    one, two = records[1][0], records[2][0]
    print(
        f"# {args.private_size} private tweets x {args.max_length} tokens, Kronecker k = "
        f"{args.k} over Linear layers (d = {one['d']:,}), {args.rounds} round(s), batch "
        f"{args.batch_size}, {args.public_size} public + {args.valid_size} validation tweets; "
        f"one torch thread per process, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores"
    )
    print("| seconds per round | 1 process | 2 processes (rank 0) | 2 processes (rank 1) |")
    print("|---|---|---|---|")
    for phase in PHASES:
        cells = [per_round(one, phase), per_round(two, phase), per_round(records[2][1], phase)]
        print(f"| {phase} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    totals = [sum(per_round(r, p) for p in PHASES) for r in (one, two, records[2][1])]
    print("| round | " + " | ".join(f"{c:.2f}" for c in totals) + " |")
    walls = [one["wall"], two["wall"], records[2][1]["wall"]]
    print("| whole run (wall) | " + " | ".join(f"{c:.1f}" for c in walls) + " |")


if __name__ == "__main__":
    main()
