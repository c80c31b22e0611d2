"""Public bases P of the fine-tuning subspace (one class per file)."""

from qem.subspace.base import Subspace
from qem.subspace.dense import DenseGaussian
from qem.subspace.factory import KINDS, make_subspace
from qem.subspace.identity import Identity
from qem.subspace.kronecker import Kronecker
from qem.subspace.srht import SRHT
from qem.subspace.subset import ParameterSubset, biases, last_layer

__all__ = [
    "KINDS",
    "SRHT",
    "DenseGaussian",
    "Identity",
    "Kronecker",
    "ParameterSubset",
    "Subspace",
    "biases",
    "last_layer",
    "make_subspace",
]
