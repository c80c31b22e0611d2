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

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from qem.errors import DataError
from qem.jsonfiles import json_text

REPORT_SCHEMA = "qem.privacy_report/2"
PARTIAL_RUN = "PARTIAL RUN"
"""How the guarantee line of a run saved before its schedule ended begins."""
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
    lower the public validation loss by more than its paired standard error and was not
    applied; it is carried into the next round's direction). ``releases_in_step`` counts the
    releases in the direction the round searched along: its own and those carried."""

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
    releases_in_step: int = 1


@dataclass(frozen=True)
class PrivacyReport:
    """What a qem run released and the guarantee it carries (docs/theory.md §14).

    ``epsilon``/``delta`` are the target; ``accountant`` holds dp-accounting's epsilon of the
    executed rounds, the neighbouring relation and the run's DpEvent as JSON (compose it with
    other DP stages with ``qem.privacy.ledger.dp_event_from_json``); ``mu`` is the composed GDP
    parameter when the run is a GDP statement (sequential and partitioned schedules), else None.
    ``unapplied_releases`` counts the releases that no step has applied (a zero-step round's
    release is carried into the next round's direction: docs/theory.md §9b).
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
    unapplied_releases: int = 0
    schema: str = REPORT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, the schema ``REPORT_SCHEMA``."""
        return asdict(self)

    def to_json(self) -> str:
        """The report as JSON text (strict: NaN and infinity are refused)."""
        return json_text(self.to_dict())

    @property
    def partial(self) -> bool:
        """Whether the run stopped before its schedule ended (saved after a failure or an
        interrupt): fewer rounds released than planned, or the last release drawn but its
        step not taken. The guarantee line then starts with PARTIAL_RUN."""
        return self.guarantee.startswith(PARTIAL_RUN) or len(self.rounds) < int(
            self.schedule.get("rounds", len(self.rounds))
        )

    @property
    def spent_epsilon(self) -> float:
        """The epsilon the released rounds spent, by the run's accountant (``epsilon`` is the
        target: the two differ for a partial run)."""
        return float(self.accountant["epsilon"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyReport:
        """Read back ``to_dict``'s output. Refuses another schema, a missing field without a
        default, or a field this version does not know (DataError, naming the fields)."""
        if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"not a qem privacy report of schema {REPORT_SCHEMA} (got {found!r}).")
        values = _field_values(cls, data, "the privacy report")
        rounds = values["rounds"]
        if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
            raise DataError("the privacy report's 'rounds' must be a list of objects.")
        values["rounds"] = [
            RoundRecord(**_field_values(RoundRecord, entry, f"round {i + 1} of the privacy report"))
            for i, entry in enumerate(rounds)
        ]
        return cls(**values)


def _field_values(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls``; every field without a
    default must be there, and nothing else may be."""
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    names = {f.name for f in fields(cls)}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
    if missing:
        raise DataError(f"{what} lacks the fields {missing}.")
    if unknown:
        raise DataError(f"{what} has fields this qem version does not know: {unknown}.")
    return dict(data)


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
