"""Peak memory of a block of work (a sweep's cell, a benchmark run)."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch


class PeakMemory:
    """Peak resident memory (MiB) of this process while the ``with`` block runs.

    On Linux the kernel's high-water mark VmHWM is reset on entry (``/proc/self/clear_refs``)
    and read on exit, so the peak is the block's own; elsewhere it is the process's peak so far
    (``scope`` says which). On CUDA the peak allocated GPU memory is recorded as well.
    """

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "cell"
        except OSError:
            self.scope = "process"
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.peak_mb = _high_water_mb() if self.scope == "cell" else None
        if self.peak_mb is None:
            self.scope = "process"
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def as_dict(self) -> dict[str, Any]:
        """``peak_memory_mb``, ``peak_memory_scope`` and, on CUDA, ``peak_gpu_memory_mb``."""
        values = {"peak_memory_mb": self.peak_mb, "peak_memory_scope": self.scope}
        if self.gpu_peak_mb is not None:
            values["peak_gpu_memory_mb"] = self.gpu_peak_mb
        return values


def _high_water_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
