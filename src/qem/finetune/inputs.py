"""The data of a run as the round engine reads it: public data for the curvature and clip
passes, the addressable private data, and public validation data for the line search (a held-out
public split when none is given), with the checks that read PUBLIC examples only."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset, Subset

from qem.data import DataLike, as_dataset
from qem.errors import InvalidParameterError

HOLDOUT_FRACTION, HOLDOUT_MAX = 0.2, 2000
"""Without validation data, the last min(20%, 2000) public examples are held out for the
line search (public, so free)."""


@dataclass(frozen=True)
class RunData:
    """``public`` for the passes, ``private`` (addressable by row), ``validation`` for the line
    search (None without one) and the description of where it came from (for the report)."""

    public: Dataset
    private: Dataset
    validation: Dataset | None
    validation_source: dict
    confirmation: Dataset | None = None

    @classmethod
    def build(
        cls,
        public_data: DataLike,
        private_data: DataLike,
        validation_data: DataLike | None,
        *,
        searches: bool,
        line_search_size: int | None = None,
        public_sample_size: int | None = None,
        confirmation_size: int | None = None,
    ) -> RunData:
        """Read the data forms (qem.data); hold out a public validation split when a line
        search runs without validation data; set its last ``confirmation_size`` examples apart
        for the acceptance test; cut validation and public data to the sizes asked for."""
        public = as_dataset(public_data, "public data")
        private = as_dataset(private_data, "private data", addressable=True)
        public, validation, source = _validation_split(public, validation_data, searches)
        confirmation = None
        if confirmation_size is not None and validation is not None:
            validation, confirmation = _confirmation_split(validation, confirmation_size)
            source = {**source, "confirmation_n": len(confirmation)}
        if line_search_size is not None and validation is not None:
            validation = _head(validation, line_search_size)
        if public_sample_size is not None:
            public = _head(public, public_sample_size)
        return cls(public, private, validation, source, confirmation)


def _head(data: Dataset, size: int) -> Dataset:
    return data if size >= len(data) else Subset(data, range(size))


def _confirmation_split(validation: Dataset, size: int) -> tuple[Dataset, Dataset]:
    """(the examples the search reads, the last ``size`` that only the acceptance test reads)."""
    n = len(validation)
    if size >= n:
        raise InvalidParameterError(
            f"confirmation_size={size} leaves none of the {n} validation examples for the step "
            "search; use fewer confirmation examples or more validation data."
        )
    return Subset(validation, range(n - size)), Subset(validation, range(n - size, n))


def _validation_split(
    public: Dataset, validation_data: DataLike | None, searches: bool
) -> tuple[Dataset, Dataset | None, dict]:
    """(public for the passes, validation for the line search, its description)."""
    if validation_data is not None:
        validation = as_dataset(validation_data, "validation data")
        return public, validation, {"source": "user", "n": len(validation)}
    if not searches:
        return public, None, {"source": "none (no line search: prior_weight or pure mode)", "n": 0}
    n = len(public)
    held = min(HOLDOUT_MAX, int(n * HOLDOUT_FRACTION))
    if held < 1:
        raise InvalidParameterError(
            f"the public data has {n} examples, too few to hold out a validation split for the "
            "step line search; pass validation_data (public) or prior_weight."
        )
    return (
        Subset(public, range(n - held)),
        Subset(public, range(n - held, n)),
        {"source": f"held-out public split (the last {held} of {n} public examples)", "n": held},
    )
