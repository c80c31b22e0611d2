"""Golden releases: seeded runs of fine_tune over every release path, compared with the values
recorded in tests/fixtures/golden_releases.json before the round engine was refactored.

A refactor that should not change any release must keep this file green: every round's w, the
step lengths, the final parameters and the privacy report's public fields. The runs are seeded
(the reproducibility switch), the secure-noise run reads a deterministic stand-in for
os.urandom, and everything is float64 (models, data, the k x k side), so the values are the
same on any CPU up to the association of float64 sums inside BLAS kernels, which differs between
CPUs (AVX2 and AVX-512 block their reductions differently): numbers are compared to 1e-9
relative (a float64 sum of a few hundred terms moves by ~1e-13 relative when reassociated; the
Cholesky solves and the line search's losses amplify that by the conditioning of A, well under
1e-9 here), strings and integers exactly. On the machine that recorded the file the refactor
reproduced them bit for bit.

Regenerate (only for a change that is MEANT to alter releases, and say so in its commit):
``QEM_WRITE_GOLDEN=1 pytest tests/test_golden.py``; ``QEM_GOLDEN_EXACT=1`` compares bits.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cases import blob_task, image_task, loss_fn
from qem.finetune import fine_tune
from qem.mechanism import noise as noise_module
from qem.schedules import partitioned, poisson

GOLDEN = Path(__file__).parent / "fixtures" / "golden_releases.json"
WRITE = os.environ.get("QEM_WRITE_GOLDEN") == "1"
EXACT = os.environ.get("QEM_GOLDEN_EXACT") == "1"
RTOL, ATOL = (0.0, 0.0) if EXACT else (1e-9, 1e-12)
"""QEM_GOLDEN_EXACT=1 demands the recorded bits (on the machine that recorded them)."""

CASES: dict[str, dict] = {
    "sequential_srht_ggn": dict(
        task="blobs", epsilon=2.0, rounds=2, subspace="srht", k=12, curvature="ggn"
    ),
    "sequential_resampled_dense_ggn_every_2": dict(
        task="blobs", epsilon=2.0, rounds=3, resample_subspace=True, subspace="dense", k=10,
        curvature="ggn", curvature_every=2,
    ),
    "identity_add_remove_given_clip": dict(
        task="blobs", epsilon=1.0, subspace="identity", curvature="identity",
        adjacency="add_remove", N=400, clip_norm=1.0,
    ),
    "partitioned_epochs_kronecker_kfac": dict(
        task="images", epsilon=3.0, schedule=partitioned(3, epochs=2), subspace="kronecker",
        k=20, curvature="kfac", curvature_every=2,
    ),
    "poisson_kronecker_kfac_momentum": dict(
        task="images", epsilon=3.0, schedule=poisson(expected_batch=60, rounds=4),
        subspace="kronecker", k=24, curvature="kfac", curvature_every=2, momentum=0.5,
    ),
    "poisson_add_remove_srht": dict(
        task="blobs", epsilon=2.0, schedule=poisson(0.25, 3), adjacency="add_remove", N=400,
        subspace="srht", k=12, curvature="ggn",
    ),
    "pure_fisher": dict(
        task="blobs", epsilon=4.0, mode="pure", rounds=2, subspace="srht", k=8,
        curvature="fisher",
    ),
    "hessian_dense_euclidean": dict(
        task="blobs", epsilon=2.0, subspace="dense", k=10, curvature="hessian",
        clipping="euclidean",
    ),
    "prior_weight_no_search": dict(
        task="blobs", epsilon=2.0, subspace="srht", k=12, prior_weight=2.0
    ),
    "secure_noise": dict(
        task="blobs", epsilon=2.0, rounds=2, subspace="srht", k=12, secure_noise=True
    ),
    "invalid_records_zeroed": dict(
        task="blobs_invalid", epsilon=2.0, subspace="srht", k=12, curvature="ggn"
    ),
    "carried_releases": dict(
        task="blobs", epsilon=0.2, rounds=4, subspace="dense", k=10, resample_subspace=True
    ),
    "layers_and_subsamples": dict(
        task="blobs", epsilon=2.0, rounds=2, subspace="srht", k=6, layers=["2"],
        line_search_size=50, public_sample_size=120, clip_quantile=0.5,
    ),
}  # fmt: skip
"""Every schedule, curvature, subspace kind, mode, adjacency, secure noise, invalid-record
zeroing and a zero-step release carried into the next step; two gloo ranks are in
DISTRIBUTED_CASES."""

DISTRIBUTED_CASES: dict[str, dict] = {
    "two_ranks_sequential": dict(task="blobs", epsilon=2.0, rounds=2, subspace="dense", k=6),
    "two_ranks_poisson": dict(
        task="blobs", epsilon=2.0, schedule=poisson(0.5, 2), subspace="dense", k=6
    ),
}


def task_data(name: str) -> dict:
    if name == "images":
        return image_task()
    task = blob_task()
    if name == "blobs_invalid":
        x, y = (t.clone() for t in task["private"])
        x[3, 2] = math.nan
        y[10] = 7  # outside the model's 3 outputs
        task["private"] = (x, y)
    return task


class DeterministicUrandom:
    """A stand-in for os.urandom: a fixed PCG64 stream of bytes."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, size: int) -> bytes:
        return self.rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def run_case(case: dict, batch_size: int = 256) -> dict:
    options = dict(case)
    task = task_data(options.pop("task"))
    seeded = {} if options.get("secure_noise") else {"seed": 7}
    result = fine_tune(
        task["model"], loss_fn, task["public"], task["private"],
        validation_data=task["validation"], batch_size=batch_size, **seeded, **options,
    )  # fmt: skip
    return summary(result)


def summary(result) -> dict:
    report = result.report.to_dict()
    report.pop("qem_version")
    return json.loads(
        json.dumps(
            {
                "releases": [w.tolist() for w in result.releases],
                "step_lengths": result.report.step_lengths,
                "parameters": {
                    n: p.detach().reshape(-1).tolist() for n, p in result.model.state_dict().items()
                },
                "report": report,
            }
        )
    )


def assert_matches(actual, expected, where: str = "") -> None:
    """Numbers to RTOL/ATOL, everything else exactly, with the path of the first mismatch."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)}"
        for key in expected:
            assert_matches(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_matches(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert isinstance(actual, int | float), f"{where}: {actual!r}"
        assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL) or (
            math.isnan(actual) and math.isnan(expected)
        ), f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def recorded() -> dict:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; generate it with QEM_WRITE_GOLDEN=1")
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def store():
    """The recorded values (or, when writing, the dict the runs fill in and save)."""
    if not WRITE:
        yield recorded()
        return
    values: dict = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    yield values
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_seeded_release_is_the_recorded_one(name, store, monkeypatch):
    if CASES[name].get("secure_noise"):
        monkeypatch.setattr(noise_module.os, "urandom", DeterministicUrandom(3))
    actual = run_case(CASES[name])
    if WRITE:
        store[name] = actual
    assert_matches(actual, store[name], name)
    assert len(actual["releases"]) >= 1 and np.abs(actual["releases"][0]).max() > 0


# -- two gloo ranks --------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        for name, case in DISTRIBUTED_CASES.items():
            value = run_case(case, batch_size=64)
            (Path(out) / f"{name}-{rank}.json").write_text(json.dumps(value))
    except Exception:
        (Path(out) / f"crash-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_release_the_recorded_values(store, tmp_path):
    from test_distributed import free_port

    context = mp.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two ranks did not finish")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    for name in DISTRIBUTED_CASES:
        ranks = [json.loads((tmp_path / f"{name}-{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1], name  # every rank ends with the same model and report
        if WRITE:
            store[name] = ranks[0]
        assert_matches(ranks[0], store[name], name)
