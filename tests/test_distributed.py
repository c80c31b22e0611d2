"""Data-parallel releases (qem.distributed, docs/theory.md §16) with two gloo processes spawned
inside pytest: the all-reduced clipped sum is the single-process sum, the release with the
reproducibility seed is the single-process release, the noise is drawn on rank 0 only, a
Poisson round draws each rank's own rows only, and a failing rank stops every rank.

The two processes run every scenario in one spawn (``two_ranks``, module scope: starting
torch twice costs more than the scenarios themselves); each scenario writes what it saw per
rank, and the tests below compare it with a single process run here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from filelock import FileLock
from torch import nn
from torch.utils.data import Subset, TensorDataset

import qem.schedules.sampling
from qem.distributed import ProcessGroup, process_group
from qem.errors import DistributedError
from qem.finetune import fine_tune
from qem.io import load
from qem.mechanism import noise as noise_module
from qem.quadratic import PublicQuadratic
from qem.statistics import private_gradient_sum
from qem.subspace.factory import make_subspace

WORLD = 2
N_PRIVATE = 40
SHARD = N_PRIVATE // WORLD
SPAWN_TIMEOUT_S = 120
RUN = dict(
    epsilon=2.0, subspace="dense", k=6, rounds=2, curvature="ggn", seed=5, progress=False,
    step_significance=None,
)  # fmt: skip
"""Options of the fine_tune runs compared (the same in both processes and here; any descent is
a step, so that 40 records move the model and the step is compared too)."""


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def build_data() -> tuple[tuple, TensorDataset]:
    """Public (x, y) and private TensorDataset, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (60 + N_PRIVATE,), generator=generator)
    x = torch.randn(60 + N_PRIVATE, 4, generator=generator) + 2 * torch.eye(4)[y]
    return (x[:60], y[:60]), TensorDataset(x[60:], y[60:])


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def clipped_sum(ranks, private, batch_size: int) -> np.ndarray:
    """The clipped sum in a fixed subspace and quadratic, over this rank's shard."""
    model = build_model()
    basis = make_subspace("dense", model, k=6, seed=0)
    quadratic = PublicQuadratic.from_matrix(np.diag(np.linspace(1.0, 2.0, 6)))
    shard = ranks.shard(len(private))
    rows = private if shard is None else Subset(private, list(shard))
    return private_gradient_sum(
        model, loss_fn, basis, rows, clip_norm=0.5, cholesky=quadratic.cholesky,
        batch_size=batch_size, all_reduce=ranks.all_reduce_sum,
    ).gradient_sum  # fmt: skip


def run_summary(result) -> dict:
    """What two runs must agree on: the releases, the parameters, the report."""
    return {
        "releases": np.stack(result.releases).tolist(),
        "parameters": {n: p.detach().tolist() for n, p in result.model.state_dict().items()},
        "report": result.report.to_dict(),
    }


# -- the two ranks ---------------------------------------------------------------------------


def _scenarios(rank: int, out: Path) -> None:
    ranks = process_group(True)
    public, private = build_data()

    def save(name: str, value) -> None:
        (out / f"{name}-{rank}.json").write_text(json.dumps(value))

    def attempt(name: str, function) -> None:
        try:
            save(name, function())
        except Exception as error:
            save(name, {"error": type(error).__name__, "message": str(error)})

    attempt("sum_one_batch", lambda: clipped_sum(ranks, private, SHARD).tolist())
    attempt("sum_batches", lambda: clipped_sum(ranks, private, 6).tolist())

    draws = {"count": 0}
    for source in (noise_module._PCG64Noise, noise_module.SecureNoise):
        original = source.standard_normal

        def counted(self, shape, original=original):
            draws["count"] += 1
            return original(self, shape)

        source.standard_normal = counted
    release = fine_tune(build_model(), loss_fn, public, private, batch_size=SHARD, **RUN)
    attempt("release", lambda: {**run_summary(release), "draws": draws["count"]})

    calls: list[dict] = []
    original_mask = qem.schedules.sampling.inclusion_mask

    def recorded(n, q, rng=None, rows=None):
        mask = original_mask(n, q, rng, rows)
        calls.append({"n": n, "rows": None if rows is None else [rows.start, rows.stop]})
        calls[-1]["drawn"] = len(mask)
        return mask

    qem.schedules.sampling.inclusion_mask = recorded
    poisson = {"kind": "poisson", "sampling_rate": 0.5, "rounds": 2}
    options = {key: value for key, value in RUN.items() if key != "rounds"}  # the schedule's
    attempt(
        "poisson_seeded",
        lambda: run_summary(
            fine_tune(build_model(), loss_fn, public, private, schedule=poisson, **options)
        ),
    )
    attempt(
        "poisson_secure",
        lambda: fine_tune(
            build_model(), loss_fn, public, private, schedule=poisson,
            **{**options, "seed": None, "secure_noise": True},
        ).report.world_size,
    )  # fmt: skip
    save("poisson_calls", calls)

    bad_labels = TensorDataset(private.tensors[0], private.tensors[1].clone())
    bad_labels.tensors[1][N_PRIVATE - 1] = 7  # in rank 1's shard only
    attempt(
        "failing_rank",
        lambda: (
            fine_tune(
                build_model(), loss_fn, public, bad_labels, invalid_records="raise", **RUN
            ).report.world_size
        ),
    )
    fewer = Subset(private, range(N_PRIVATE - rank))
    attempt("disagreeing_data", lambda: fine_tune(build_model(), loss_fn, public, fewer, **RUN))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _scenarios(rank, Path(out))
    except Exception:
        (Path(out) / f"crash-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, worker_id) -> dict:
    """Run every scenario on two gloo ranks, once per session (pytest-xdist workers share the
    run through a lock file); {name: [rank 0's, rank 1's]}."""
    if worker_id == "master":
        out = tmp_path_factory.mktemp("ranks")
        spawn_ranks(out)
        return read_ranks(out)
    shared = tmp_path_factory.getbasetemp().parent
    with FileLock(shared / "ranks.lock"):
        out = shared / "ranks"
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            spawn_ranks(out)
            (out / "done").touch()
    return read_ranks(out)


def spawn_ranks(out: Path) -> None:
    context = mp.start_processes(
        _worker, args=(free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two ranks did not finish: a collective is waiting forever")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def read_ranks(out: Path) -> dict:
    results: dict[str, list] = {}
    for path in sorted(out.glob("*-[01].json")):
        name, rank = path.stem.rsplit("-", 1)
        results.setdefault(name, [None, None])[int(rank)] = json.loads(path.read_text())
    return results


# -- the checks ------------------------------------------------------------------------------


def test_shards_are_contiguous_disjoint_and_cover_every_row():
    for n in (0, 1, 7, 40, 41):
        for world in (1, 2, 3, 5):
            shards = []
            for rank in range(world):
                group = object.__new__(ProcessGroup)
                group.rank, group.world_size = rank, world
                shards.append(group.shard(n))
            assert [row for shard in shards for row in shard] == list(range(n))


def test_the_all_reduced_clipped_sum_is_the_single_process_sum(two_ranks):
    """One batch per shard: a single process adds (0 + s_0) + s_1 and the all-reduce s_0 + s_1
    of the same two float64 partial sums, so the results are the same bits. With several
    batches per shard the association differs ((b1 + b2) + (b3 + b4) against
    ((b1 + b2) + b3) + b4): the same to rounding, 1e-12 relative."""
    _, private = build_data()
    local = process_group(False)
    one_batch = clipped_sum(local, private, SHARD)
    for rank_sum in two_ranks["sum_one_batch"]:
        assert np.array_equal(np.array(rank_sum), one_batch)
    batches = clipped_sum(local, private, 6)
    for rank_sum in two_ranks["sum_batches"]:
        np.testing.assert_allclose(np.array(rank_sum), batches, rtol=1e-12, atol=0)
    assert np.abs(one_batch).max() > 0.1  # a sum of something


def test_two_processes_release_exactly_what_one_process_releases(two_ranks):
    public, private = build_data()
    result = fine_tune(build_model(), loss_fn, public, private, batch_size=SHARD, **RUN)
    single = json.loads(json.dumps(run_summary(result)))
    ranks = [{k: v for k, v in r.items() if k != "draws"} for r in two_ranks["release"]]
    assert ranks[0] == ranks[1]  # every rank ends with the same model and report
    assert ranks[0]["releases"] == single["releases"]  # float64 values, exactly
    assert ranks[0]["parameters"] == single["parameters"]
    assert ranks[0]["report"]["world_size"] == 2 and single["report"]["world_size"] == 1
    assert {**ranks[0]["report"], "world_size": 1} == single["report"]
    assert any(a != 0 for a in ranks[0]["report"]["step_lengths"])  # the model did move


def test_the_noise_is_drawn_once_on_rank_0_never_per_rank(two_ranks):
    draws = [r["draws"] for r in two_ranks["release"]]
    assert draws == [RUN["rounds"], 0]


def test_poisson_ranks_draw_only_their_own_rows(two_ranks):
    calls = two_ranks["poisson_calls"]
    for rank, shard in enumerate(([0, SHARD], [SHARD, N_PRIVATE])):
        assert len(calls[rank]) == 4  # two rounds in each of the two runs
        for call in calls[rank]:
            assert call == {"n": N_PRIVATE, "rows": shard, "drawn": SHARD}
    assert two_ranks["poisson_secure"] == [2, 2]


def test_a_seeded_poisson_run_over_two_ranks_is_the_single_process_run(two_ranks):
    """The same rows are drawn (the seeded shards jump to their rows of one draw over all
    rows); the sums agree to rounding, not bit for bit, since the sampled rows fall into
    other batches than in one process."""
    public, private = build_data()
    poisson = {"kind": "poisson", "sampling_rate": 0.5, "rounds": 2}
    options = {key: value for key, value in RUN.items() if key != "rounds"}  # the schedule's
    single = fine_tune(build_model(), loss_fn, public, private, schedule=poisson, **options)
    ranks = two_ranks["poisson_seeded"]
    assert ranks[0] == ranks[1]
    expected = run_summary(single)
    np.testing.assert_allclose(ranks[0]["releases"], expected["releases"], rtol=1e-10, atol=0)
    assert ranks[0]["report"]["step_lengths"] == expected["report"]["step_lengths"]


def test_a_failing_rank_stops_every_rank_with_an_error(two_ranks):
    rank0, rank1 = two_ranks["failing_rank"]
    assert rank1["error"] == "DataError" and "does not say which record" in rank1["message"]
    assert rank0["error"] == "DistributedError" and "another rank failed" in rank0["message"]


def test_ranks_given_different_private_data_refuse_to_run(two_ranks):
    for outcome in two_ranks["disagreeing_data"]:
        assert outcome["error"] == "DistributedError"
        assert "disagree on the number of private records" in outcome["message"]


def test_distributed_true_without_a_process_group_is_a_qem_error():
    public, private = build_data()
    with pytest.raises(DistributedError, match=r"needs an initialised torch\.distributed"):
        fine_tune(build_model(), loss_fn, public, private, distributed=True, **RUN)


def test_auto_without_a_group_runs_in_one_process():
    public, private = build_data()
    result = fine_tune(build_model(), loss_fn, public, private, distributed="auto", **RUN)
    assert result.report.world_size == 1


# -- the command line under torchrun ---------------------------------------------------------


@pytest.fixture
def cli_files(tmp_path) -> tuple[Path, list[str]]:
    """A factory module in the working directory, NPZ files, and the common arguments."""
    (tmp_path / "tiny_models.py").write_text(
        textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                       torch.nn.Linear(5, 3))
        """)
    )
    (public_x, public_y), private = build_data()
    np.savez(tmp_path / "public.npz", x=public_x.numpy(), y=public_y.numpy())
    np.savez(tmp_path / "private.npz", x=private.tensors[0].numpy(), y=private.tensors[1].numpy())
    argv = [
        "finetune", "--model", "tiny_models:build", "--public", "public.npz",
        "--private", "private.npz", "--epsilon", "2", "--subspace", "dense", "--k", "6",
        "--rounds", "2", "--seed", "5", "--batch-size", str(SHARD), "--no-progress", "--json",
    ]  # fmt: skip
    return tmp_path, argv


def test_qem_finetune_distributed_under_torchrun_equals_one_process(cli_files):
    tmp_path, argv = cli_files
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*launch, "--nproc-per-node", "2", "-m", "qem.cli.main", *argv, "--distributed",
         "--out", "two"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout[done.stdout.index("{") :])  # rank 0 alone prints
    assert printed["report"]["world_size"] == 2
    one = subprocess.run(
        [sys.executable, "-m", "qem.cli.main", *argv, "--out", "one"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two, single = load(tmp_path / "two"), load(tmp_path / "one")
    assert {**two.report.to_dict(), "world_size": 1} == single.report.to_dict()
    for name, value in single.state_dict.items():
        assert torch.equal(two.state_dict[name], value)


def test_torchrun_without_distributed_is_refused(cli_files, monkeypatch, capsys):
    from qem.cli.main import main

    tmp_path, argv = cli_files
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--out", "run"]) == 2
    assert "Add --distributed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_fine_tune_on_cuda_equals_the_cpu_run_to_rounding():
    public, private = build_data()
    options = {**RUN, "noise": False, "rounds": 1}
    cpu = fine_tune(build_model(), loss_fn, public, private, device="cpu", **options)
    gpu = fine_tune(build_model(), loss_fn, public, private, device="cuda", **options)
    assert next(gpu.model.parameters()).is_cuda
    np.testing.assert_allclose(gpu.releases[0], cpu.releases[0], rtol=1e-4, atol=1e-6)


def test_device_cuda_without_a_gpu_is_a_qem_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from qem.errors import InvalidParameterError

    public, private = build_data()
    with pytest.raises(InvalidParameterError, match="no GPU"):
        fine_tune(build_model(), loss_fn, public, private, device="cuda", **RUN)
