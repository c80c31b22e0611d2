"""Exceptions raised by qem. Each message says what to change.

All derive from :class:`QemError`, and from the matching built-in (``ValueError``,
``TypeError``, ``FileExistsError``, ``ImportError``) so that generic handlers keep working.
"""


class QemError(Exception):
    """Base class of every error qem raises on purpose."""


class InvalidParameterError(QemError, ValueError):
    """A privacy or mechanism parameter is out of its domain (eps, delta, C, gamma, lam, N, ...)."""


class CurvatureError(QemError, ValueError):
    """The quadratic's matrix A is not symmetric, not finite, or not positive definite."""


class ShapeError(QemError, ValueError):
    """An array or tensor does not have the shape the computation needs."""


class NonFiniteError(QemError, ValueError):
    """A NaN or infinity reached privacy-critical arithmetic."""


class DataError(QemError, ValueError):
    """The data is empty, malformed, or has labels out of range."""


class UnsupportedModelError(QemError, TypeError):
    """The model has layers or parameters the chosen subspace or curvature cannot handle."""


class RejectionSamplingError(QemError, ValueError):
    """The pure-eps rejection sampler would need an unreasonable number of draws."""


class OutputExistsError(QemError, FileExistsError):
    """The output directory exists and overwriting was not requested."""


class MissingExtraError(QemError, ImportError):
    """A feature needs a package of one of qem's optional extras, which is not installed."""


class PrivacyWarning(UserWarning):
    """A setting is legal but weakens the guarantee (for example delta >= 1/N)."""


class SpentBudgetError(QemError, RuntimeError):
    """A run failed AFTER noise was drawn on private data. ``result`` holds what was released
    up to then (model, privacy report with the budget spent, releases): save it, do not rerun
    blindly, since a rerun spends the budget again."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class DistributedError(QemError, RuntimeError):
    """A data-parallel run cannot proceed: no process group where one is required, ranks that
    disagree on the data, or another rank's failure (that rank's error says why)."""
