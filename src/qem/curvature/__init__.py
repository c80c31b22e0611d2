"""The public quadratic A = P^T H0 P + gamma I_k (one curvature type per file)."""

from qem.curvature.base import Curvature, DataCurvature
from qem.curvature.factory import CURVATURES, make_curvature
from qem.curvature.fisher import EmpiricalFisher
from qem.curvature.ggn import GaussNewton
from qem.curvature.hessian import Hessian
from qem.curvature.identity import IdentityCurvature
from qem.curvature.kfac import KFAC
from qem.data import fingerprint

__all__ = [
    "CURVATURES",
    "KFAC",
    "Curvature",
    "DataCurvature",
    "EmpiricalFisher",
    "GaussNewton",
    "Hessian",
    "IdentityCurvature",
    "fingerprint",
    "make_curvature",
]
