"""Public bases P of the fine-tuning subspace (one class per file)."""

from qem.subspace.base import LossFn, Subspace

__all__ = ["LossFn", "Subspace"]
