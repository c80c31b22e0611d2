"""Round schedules (docs/theory.md §13): which private rows each round reads, the public weight
N_t of its quadratic, the noise multiplier z of its Gaussian, and the privacy cost of the whole
run as a dp-accounting DpEvent; one schedule per file, registered in ``SCHEDULES``.

* ``sequential(T)``: every round reads all records (qem.schedules.sequential);
* ``partitioned(T, epochs=E)``: disjoint chunks, parallel composition (qem.schedules.partitioned);
* ``poisson(q or expected_batch=B, T)``: Poisson-subsampled rounds (qem.schedules.poisson).
"""

from __future__ import annotations

import inspect

from qem.errors import InvalidParameterError
from qem.schedules.base import Plan, Round, Schedule, UniformPlan
from qem.schedules.partitioned import Partitioned
from qem.schedules.poisson import Poisson
from qem.schedules.sequential import Sequential

sequential, partitioned, poisson = Sequential, Partitioned, Poisson
"""The schedules by their lower-case names, as the README and configs spell them."""

SCHEDULES: dict[str, type[Schedule]] = {cls.kind: cls for cls in (Sequential, Partitioned, Poisson)}


def make_schedule(spec: Schedule | dict) -> Schedule:
    """A schedule from its JSON form, e.g. {"kind": "poisson", "sampling_rate": 0.02,
    "rounds": 50} (configs and the command line), or the schedule
    itself."""
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, dict) or spec.get("kind") not in SCHEDULES:
        raise InvalidParameterError(
            f"a schedule is one of {sorted(SCHEDULES)} given as {{'kind': ..., parameters}}, "
            f"got {spec!r}."
        )
    cls = SCHEDULES[spec["kind"]]
    parameters = {k: v for k, v in spec.items() if k != "kind"}
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        moved = (
            " (a new subspace every R rounds is fine_tune's resample_subspace=R: the public side "
            "decides it, not the schedule)"
            if "resample_every" in unknown
            else ""
        )
        raise InvalidParameterError(
            f"the {spec['kind']} schedule takes no parameters {unknown}; it accepts {accepted}"
            f"{moved}."
        )
    return cls(**parameters)


__all__ = [
    "SCHEDULES",
    "Partitioned",
    "Plan",
    "Poisson",
    "Round",
    "Schedule",
    "Sequential",
    "UniformPlan",
    "make_schedule",
    "partitioned",
    "poisson",
    "sequential",
]
