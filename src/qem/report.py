"""The privacy report: a typed, publishable record of what a run released and why it is private
(docs/theory.md §14), kept apart from the diagnostics measured while it ran.

Every field of :class:`PrivacyReport` is a public value: the budget, the schedule and its
accountant, public hyperparameters (C from public data, N, lam, gamma, k), the public subspace
and curvature (with the fingerprint of the public data), and post-processing of the releases
(step lengths chosen on public validation data). Nothing in it is measured on private data, so
``privacy_report.json`` may be published with the model.

:class:`Diagnostics` holds what is NOT safe to publish: wall-clock seconds per phase (under
add/remove they reveal the private record count; with a Poisson schedule, the realised batch
sizes), the number of invalid private records of each round (shown to the person running qem,
who holds the data) and the reproducibility seed (anyone who knows it can regenerate the
noise). It is written to ``diagnostics.json``, labelled as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qem.errors import DataError

REPORT_SCHEMA = "qem.privacy_report/2"
DIAGNOSTICS_WARNING = (
    "NOT FOR PUBLICATION: measured while reading private data (timings reveal dataset and batch "
    "sizes). Strip this file before publishing a run; privacy_report.json is the publishable "
    "record."
)


@dataclass(frozen=True)
class RoundRecord:
    """One round: its public parameters and the post-processing of its release.

    ``mu`` is the GDP parameter of the round's mechanism on the records it read (s / z);
    under a Poisson schedule the run's guarantee is the accountant's, not a composition of
    these. ``step_length`` is alpha, chosen on public validation data (0: the release did not
    lower the public validation loss and was not applied)."""

    round: int
    epoch: int
    N: float
    noise_multiplier: float | None
    mu: float | None
    epsilon: float | None
    beta: float
    lam: float
    clip_norm: float
    clip_norm_source: str
    subspace_seed: int | None
    step_length: float
    public_validation_loss: float | None
    preview: dict[str, Any]
    snapping: dict[str, Any] | None = None


@dataclass(frozen=True)
class PrivacyReport:
    """What a qem run released and the guarantee it carries (docs/theory.md §14).

    ``epsilon``/``delta`` are the target; ``accountant`` holds dp-accounting's epsilon of the
    executed rounds, the neighbouring relation and the run's DpEvent as JSON (compose it with
    other DP stages with ``qem.privacy.ledger.dp_event_from_json``); ``mu`` is the composed GDP
    parameter when the run is a GDP statement (sequential and partitioned schedules), else None.
    ``world_size`` is the number of processes whose shards one all-reduced sum covered
    (docs/theory.md §16; 1 without a process group).
    """

    qem_version: str
    guarantee: str
    mode: str
    adjacency: str
    clipping: str
    epsilon: float
    delta: float
    mu: float | None
    accountant: dict[str, Any]
    schedule: dict[str, Any]
    N: float
    lam: float
    gamma: float
    k: int
    C: list[float]
    subspace: dict[str, Any]
    curvature: dict[str, Any]
    validation: dict[str, Any]
    rounds: list[RoundRecord]
    step_lengths: list[float]
    zero_step_rounds: int
    noise: dict[str, Any]
    invalid_records: str
    momentum: float = 0.0
    world_size: int = 1
    schema: str = REPORT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, the schema ``REPORT_SCHEMA``."""
        return asdict(self)

    def to_json(self) -> str:
        """The report as JSON text (strict: NaN and infinity are refused)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyReport:
        """Read back ``to_dict``'s output; refuses another schema or missing fields."""
        if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"not a qem privacy report of schema {REPORT_SCHEMA} (got {found!r}).")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"schema"})
        if missing:
            raise DataError(f"the privacy report lacks the fields {missing}.")
        values = {name: data[name] for name in names if name in data}
        values["rounds"] = [RoundRecord(**entry) for entry in data["rounds"]]
        return cls(**values)


@dataclass(frozen=True)
class BaselineReport:
    """The report of a comparison method (DP-SGD, non-private, none): the guarantee in words,
    the epsilon its accountant certifies (None when not private), its accountant's inputs and
    its hyperparameters. Publishable like :class:`PrivacyReport`."""

    qem_version: str
    method: str
    privacy: str
    epsilon: float | None
    delta: float | None
    adjacency: str
    N: int
    accountant: dict[str, Any] | None
    hyperparameters: dict[str, Any]
    noise: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)


@dataclass
class Diagnostics:
    """Measurements of a run that are NOT publishable (see the module docstring)."""

    seconds: dict[str, float] = field(default_factory=dict)
    round_seconds: list[dict[str, float]] = field(default_factory=list)
    invalid_records: list[int] = field(default_factory=list)
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, with the warning first."""
        return {"warning": DIAGNOSTICS_WARNING, **asdict(self)}


def report_as_dict(report: object) -> dict[str, Any]:
    """A method's report as plain JSON types: ``to_dict()`` of qem's typed reports, or a dict
    as a user-defined method plugged into the experiment runner may return it."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict):
        return dict(report)
    raise DataError(f"a method's report must be a dict or have to_dict(), got {report!r}.")
