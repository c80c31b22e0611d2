"""qem: differentially private fine-tuning by exact sampling from a quadratic exponential
mechanism (see docs/theory.md).

``qem.fine_tune``, ``qem.check_data`` and ``qem.load`` are imported lazily, so that
``qem.privacy`` and ``qem.mechanism`` stay usable without loading torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fine_tune": ("qem.finetune", "fine_tune"),
    "FineTuneResult": ("qem.finetune", "FineTuneResult"),
    "load": ("qem.io", "load"),
    "check_data": ("qem.data_check", "check_data"),
}

__all__ = ["FineTuneResult", "__version__", "check_data", "fine_tune", "load"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'qem' has no attribute {name!r}")
