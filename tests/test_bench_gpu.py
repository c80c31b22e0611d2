"""bench/gpu.sh runs the scale benchmark on a GPU where torch sees one and falls back, saying
so, to a tiny CPU run where it does not (its dry run prints the command without running it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def dry_run() -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: no fallback")
def test_without_a_gpu_it_falls_back_to_a_tiny_cpu_run_and_says_so():
    out = dry_run()
    assert "FALLING BACK to a tiny CPU run" in out
    command = out.splitlines()[-1]
    assert command.startswith("+ ") and "bench/scale.py --device cpu --tiny" in command


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_with_a_gpu_it_runs_the_scale_benchmark_on_cuda():
    out = dry_run()
    assert "FALLING BACK" not in out and "--device cuda" in out.splitlines()[-1]
