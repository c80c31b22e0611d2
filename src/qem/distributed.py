"""Data-parallel releases over a ``torch.distributed`` process group (docs/theory.md §16).

Every rank is given the same model, public data and addressable private data. Rank r of W
reads only its shard of the private rows, [r n // W, (r + 1) n // W) (contiguous, disjoint,
covering every row once, fixed by (n, r, W)), and in a Poisson round draws the inclusions of
those rows only. The private pass's sufficient statistic (the whitened clipped sum, the count)
is summed over the ranks by an all-reduce in float64. Rank 0 alone draws the noise; the
release is broadcast.

The public side (the curvature A with its Cholesky factor L, the clip norm C, the line search
and the step) is computed once, on rank 0, and broadcast (A, L, lambda_min(A), C; then the
step length and the new values of the spanned parameters), rather than computed on every rank.
Recomputing it everywhere would need every pass to be bit-for-bit deterministic across ranks,
which torch does not promise on a GPU (atomic adds in the backward pass of embeddings and
scatter ops); a rank clipping in a norm L' != L would break the sensitivity the mechanism is
calibrated for, and ranks whose models drift apart would silently fine-tune different models.
Broadcasting makes every rank's L, C and parameters identical by construction, for 2 k^2 + d
floats per round, and costs no wall-clock time: the other ranks would have computed the same
thing in the same time. (The subspace P is rebuilt on every rank from its public seed: it is
drawn on the CPU by a seeded generator, the same bits everywhere.)

A rank whose part fails still takes part in the collective, with a failure flag, so that no
rank waits forever: the failing rank raises its own error, the others a DistributedError.
``LocalProcess`` is the same interface for a run without a group (every call is local).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from qem.errors import DistributedError, InvalidParameterError
from qem.quadratic import PublicQuadratic

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The environment torchrun sets for every process it launches."""


class LocalProcess:
    """A run without a process group: one rank, every row, every call local."""

    rank, world_size, is_root = 0, 1, True

    def shard(self, n: int) -> range | None:
        """None: this process reads every row."""
        return None

    def all_reduce_sum(self, compute: Callable[[], np.ndarray], size: int) -> np.ndarray:
        """``compute()``: the sum over one rank."""
        return compute()

    def from_root(self, compute: Callable[[], np.ndarray] | None, size: int) -> np.ndarray:
        """``compute()``: this process is the root."""
        return compute()

    def json_from_root(self, compute: Callable[[], Any]) -> Any:
        """``compute()``: this process is the root."""
        return compute()

    def quadratic_from_root(
        self, compute: Callable[[], tuple[PublicQuadratic, float]] | None, k: int
    ) -> tuple[PublicQuadratic, float]:
        """``compute()``: the public quadratic and clip norm (this process is the root)."""
        return compute()

    def check_agreement(self, value: int, what: str) -> None:
        """Nothing to agree with."""

    def broadcast_parameters(self, model: nn.Module, names: Iterable[str]) -> None:
        """Nothing to broadcast to."""


class ProcessGroup(LocalProcess):
    """This process's rank in the initialised default ``torch.distributed`` group.

    Collectives run on ``device``: the CPU for gloo, this process's GPU for nccl."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_root = self.rank == 0
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def shard(self, n: int) -> range:
        """Rows [r n // W, (r + 1) n // W) of ``n``: contiguous, disjoint over the ranks, every
        row in exactly one shard."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def all_reduce_sum(self, compute: Callable[[], np.ndarray], size: int) -> np.ndarray:
        """The float64 sum over the ranks of each rank's ``compute()`` (``size`` values). For
        two ranks it is a + b = b + a, a single process's sum of the same two partial sums."""
        error = None
        payload = torch.zeros(size + 1, dtype=torch.float64, device=self.device)
        try:
            values = np.asarray(compute(), dtype=np.float64).reshape(-1)
            if values.size != size:
                raise DistributedError(
                    f"rank {self.rank} computed {values.size} values, not {size}."
                )
            payload[:size] = torch.from_numpy(values).to(self.device)
        except Exception as caught:  # the other ranks are waiting in the all-reduce
            error = caught
            payload.zero_()
            payload[size] = 1.0
        self._dist.all_reduce(payload)
        self._raise_on_failure(error, float(payload[size]) > 0, "the private pass")
        return payload[:size].cpu().numpy()

    def from_root(self, compute: Callable[[], np.ndarray] | None, size: int) -> np.ndarray:
        """Rank 0's ``compute()`` (float64, ``size`` values) on every rank; the other ranks
        pass None (their compute is never called)."""
        error = None
        payload = torch.zeros(size + 1, dtype=torch.float64, device=self.device)
        if self.is_root:
            try:
                values = np.asarray(compute(), dtype=np.float64).reshape(-1)
                if values.size != size:
                    raise DistributedError(f"rank 0 computed {values.size} values, not {size}.")
                payload[:size] = torch.from_numpy(values).to(self.device)
            except Exception as caught:
                error = caught
                payload[size] = 1.0
        self._dist.broadcast(payload, src=0)
        self._raise_on_failure(error, float(payload[size]) > 0, "rank 0's public computation")
        return payload[:size].cpu().numpy()

    def json_from_root(self, compute: Callable[[], Any]) -> Any:
        """Rank 0's ``compute()``, a JSON value (a public description such as the
        curvature's), on every rank: sent as its UTF-8 JSON text, read back by ``json.loads``
        on every rank (rank 0 included, so that every rank holds equal values)."""
        text: list[bytes] = []

        def length() -> np.ndarray:
            text.append(json.dumps(compute(), sort_keys=True, allow_nan=False).encode())
            return np.array([len(text[0])])

        size = int(self.from_root(length if self.is_root else None, 1)[0])
        sent = self.from_root((lambda: np.frombuffer(text[0], np.uint8)) if text else None, size)
        return json.loads(sent.astype(np.uint8).tobytes())

    def quadratic_from_root(
        self, compute: Callable[[], tuple[PublicQuadratic, float]] | None, k: int
    ) -> tuple[PublicQuadratic, float]:
        """Rank 0's public quadratic (A, its Cholesky factor, lambda_min(A)) and clip norm C on
        every rank: 2 k^2 + 2 float64 values (the module docstring says why they are broadcast
        rather than computed on every rank)."""

        def packed() -> np.ndarray:
            quadratic, C = compute()
            return np.concatenate(
                [quadratic.A.ravel(), quadratic.cholesky.ravel(), [quadratic.lambda_min, C]]
            )

        values = self.from_root(packed if self.is_root else None, 2 * k * k + 2)
        A, L = values[: k * k].reshape(k, k), values[k * k : 2 * k * k].reshape(k, k)
        return PublicQuadratic(A, L, float(values[-2])), float(values[-1])

    def check_agreement(self, value: int, what: str) -> None:
        """Raise DistributedError on every rank unless every rank has the same ``value``
        (the values themselves are not printed: a private size may be among them)."""
        spread = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        self._dist.all_reduce(spread, op=self._dist.ReduceOp.MAX)
        if float(spread[0]) != -float(spread[1]):
            raise DistributedError(
                f"the ranks disagree on {what}: give every rank the same private data (each "
                "reads only its own shard of it)."
            )

    def broadcast_parameters(self, model: nn.Module, names: Iterable[str]) -> None:
        """Rank 0's values of the named parameters, in place on every rank."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                tensor = params[name].data
                if tensor.device == self.device:
                    self._dist.broadcast(tensor, src=0)
                else:
                    moved = tensor.to(self.device)
                    self._dist.broadcast(moved, src=0)
                    tensor.copy_(moved)

    def _raise_on_failure(self, error: Exception | None, failed: bool, what: str) -> None:
        if error is not None:
            raise error
        if failed:
            raise DistributedError(
                f"another rank failed during {what}; its own error says why (this rank stopped "
                "with it)."
            )


def process_group(distributed: bool | str) -> LocalProcess:
    """The ranks a run spans: ``ProcessGroup()`` when ``distributed`` is True (an initialised
    group is required) or "auto" with an initialised group of more than one rank;
    ``LocalProcess()`` otherwise."""
    if distributed not in (True, False, "auto"):
        raise InvalidParameterError(
            f"distributed must be 'auto', True or False, got {distributed!r}."
        )
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is True and not initialised:
        raise DistributedError(
            "distributed=True needs an initialised torch.distributed process group: launch "
            "with torchrun and call torch.distributed.init_process_group() before fine_tune "
            "(`qem finetune --distributed` does both), or pass distributed='auto'."
        )
    if distributed is False or not initialised:
        return LocalProcess()
    if distributed == "auto" and torch.distributed.get_world_size() == 1:
        return LocalProcess()
    return ProcessGroup()


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: torch.device) -> ProcessGroup:
    """Initialise the default group from torchrun's environment: nccl when the model runs on a
    GPU (this process's GPU is LOCAL_RANK), gloo otherwise."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): "
            "launch with `torchrun --nproc-per-node W -m qem.cli.main finetune --distributed ...`."
        )
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return ProcessGroup()
