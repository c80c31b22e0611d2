"""Intra-op threads on a shared machine: use only the cores other processes leave free.

Torch splits each kernel over its intra-op (OpenMP) threads and the kernel ends when the last
thread is done. When other processes keep the cores busy, one descheduled thread holds up the
kernel until the scheduler runs it again, so a pass of many small kernels (a per-example batch
launches about 60) loses a time slice per kernel rather than its fair share of the cores.
Measured with bench/opacus_throughput.py (MNIST CNN, batch 256, 2 cores): with two busy loops
running, the Kronecker per-example pass on torch's 2 threads ran 4.9x slower than on idle cores,
on 1 thread 2.5x; with the cores shared by other jobs (8 runnable threads), 377 records/s on 2
threads against 2,162 on the threads ``free_cores`` chose (a plain forward/backward: 522 and
2,908).

``shared_machine_threads()`` runs a block on ``free_cores()`` threads: the CPUs this process may
use minus the threads of other processes that are runnable now (Linux /proc), at least 1 and
at most torch's own setting, which it restores afterwards. Where /proc is missing, or with the
environment variable QEM_ADAPTIVE_THREADS=0, it changes nothing. The count is a function of the
machine's load, never of data; the thread count may change the rounding of some float kernels
(on the MNIST CNN the per-example gradients at 1 and 2 threads were bit-identical), never the
privacy of a release (each clipped gradient's bound holds whatever the rounding).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ADAPTIVE_VARIABLE = "QEM_ADAPTIVE_THREADS"
"""Set to 0 to keep torch's intra-op thread count in the per-example passes."""


def free_cores(limit: int | None = None) -> int:
    """Threads to use now: CPUs available to this process minus the other processes' runnable
    threads, clipped to [1, ``limit``] (``limit`` None: torch.get_num_threads()). Without
    /proc (not Linux) it returns ``limit``."""
    limit = torch.get_num_threads() if limit is None else limit
    try:
        ours_before = _running_threads_of_this_process()
        running = _running_threads()
        ours = max(ours_before, _running_threads_of_this_process())
        cpus = len(os.sched_getaffinity(0))
    except (OSError, ValueError, AttributeError):
        return limit
    return cores_left(cpus, running - ours, limit)


def cores_left(cpus: int, others: int, limit: int) -> int:
    """max(1, min(limit, cpus - others)): the cores ``others`` runnable threads leave free."""
    return max(1, min(limit, cpus - max(others, 0)))


@contextmanager
def shared_machine_threads() -> Iterator[int]:
    """Run the block with torch's intra-op threads set to ``free_cores()`` (yielded; torch's
    setting when QEM_ADAPTIVE_THREADS=0), then restore the previous setting. Cheap (a few
    /proc reads, about 0.1 ms): call it per batch."""
    previous = torch.get_num_threads()
    adaptive = os.environ.get(ADAPTIVE_VARIABLE, "1") != "0"
    threads = free_cores(previous) if adaptive else previous
    if threads == previous:
        yield threads
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def _running_threads() -> int:
    """Runnable threads on the machine now (the 4th field of /proc/loadavg, "running/total")."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])


def _running_threads_of_this_process() -> int:
    """This process's threads in state R (running or runnable), from /proc/self/task."""
    running = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        running += stat.rpartition(")")[2].split()[0] == "R"
    return running
