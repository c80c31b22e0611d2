"""The privacy ledger of a run: every executed round, and what the run has spent so far.

What a mechanism did (the DpEvent of ``qem.schedules``) is kept apart from how it is accounted
(dp-accounting's PLD accountant under the plan's neighbouring relation; basic composition for
pure epsilon-DP rounds), as dp-accounting does. The event serialises to JSON
(``dp_event_to_json``) so that a qem release composes with other DP stages: read it back with
``dp_event_from_json`` and compose it under the same relation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import attr
import dp_accounting
from dp_accounting import dp_event

from qem.checks import MAX_EPSILON, check_delta
from qem.errors import InvalidParameterError
from qem.privacy.budget import Budget
from qem.privacy.pld import pld_accountant


class AccountedRound(Protocol):
    """What the ledger reads of an executed round (qem.schedules.Round)."""

    index: int
    epoch: int
    N: float
    noise_multiplier: float | None
    epsilon: float | None


class AccountedPlan(Protocol):
    """What the ledger reads of a calibrated plan (qem.schedules.Plan): the events of its
    prefixes, their relation, its budget and, in pure mode, the epsilon of a prefix."""

    @property
    def budget(self) -> Budget: ...

    @property
    def relation(self) -> dp_accounting.NeighboringRelation: ...

    def dp_event(self, completed: int) -> dp_event.DpEvent: ...

    def epsilon_after(self, completed: int) -> float | None: ...


@dataclass(frozen=True)
class LedgerEntry:
    """One executed round: its public weight, privacy parameter and epoch (no private value:
    a Poisson round's realised rows are not recorded)."""

    round: int
    epoch: int
    N: float
    noise_multiplier: float | None
    epsilon: float | None


class PrivacyLedger:
    """The rounds a plan has executed, their DpEvent and the composed epsilon at delta."""

    def __init__(self, plan: AccountedPlan) -> None:
        self.plan = plan
        self.entries: list[LedgerEntry] = []

    def record(self, executed: AccountedRound) -> None:
        """Record a round once its noise has been drawn (its budget is then spent)."""
        self.entries.append(
            LedgerEntry(
                round=executed.index + 1,
                epoch=executed.epoch + 1,
                N=executed.N,
                noise_multiplier=executed.noise_multiplier,
                epsilon=executed.epsilon,
            )
        )

    @property
    def completed(self) -> int:
        """Rounds whose noise has been drawn."""
        return len(self.entries)

    def dp_event(self) -> dp_event.DpEvent:
        """What the recorded rounds released."""
        return self.plan.dp_event(self.completed)

    def epsilon(self, delta: float | None = None) -> float:
        """epsilon spent so far at ``delta`` (default: the budget's delta); see
        :func:`spent_epsilon`."""
        return spent_epsilon(self.plan, self.completed, delta)

    def to_dict(self) -> dict:
        """The public record: relation, event (JSON) and each round's parameters."""
        return {
            "neighboring_relation": self.plan.relation.name,
            "dp_event": dp_event_to_json(self.dp_event()),
            "rounds": [entry.__dict__ for entry in self.entries],
        }

    def report_block(self, name: str, epsilon: float, delta: float) -> dict:
        """The report's accountant block (``accountant_block``) of the recorded rounds."""
        return accountant_block(
            self.dp_event(), self.plan.relation, name=name, epsilon=epsilon, delta=delta,
            rounds=[entry.__dict__ for entry in self.entries],
        )  # fmt: skip


def accountant_block(
    event: dp_event.DpEvent,
    relation: dp_accounting.NeighboringRelation,
    *,
    name: str,
    epsilon: float,
    delta: float,
    **details: object,
) -> dict:
    """What a release spent, as every report (qem's and the DP-SGD baseline's) states it: the
    accountant's name and its epsilon at delta, the neighbouring relation, the DpEvent as JSON
    (compose it with other DP stages: ``dp_event_from_json``) and the mechanism's details."""
    return {
        "name": name,
        "epsilon": epsilon,
        "delta": delta,
        "neighboring_relation": relation.name,
        "dp_event": dp_event_to_json(event),
        **details,
    }


def spent_epsilon(plan: AccountedPlan, completed: int, delta: float | None = None) -> float:
    """epsilon at ``delta`` (default: the budget's) of the first ``completed`` rounds of
    ``plan``. Gaussian rounds: dp-accounting's PLD accountant (an upper bound), its interval
    widened for huge epsilons so that the grid stays bounded (qem.privacy.calibration). Pure
    rounds: the sum of their epsilons (basic composition)."""
    if plan.budget.mode == "pure":
        return plan.epsilon_after(completed)
    if completed == 0:
        return 0.0
    delta = check_delta(plan.budget.delta if delta is None else delta)
    accountant = pld_accountant(plan.relation, epsilon=plan.budget.epsilon)
    return float(accountant.compose(plan.dp_event(completed)).get_epsilon(delta))


_EVENT_CLASSES = {
    name: cls
    for name, cls in vars(dp_event).items()
    if isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)
}


def dp_event_to_json(event: dp_event.DpEvent) -> dict:
    """A DpEvent as plain JSON: {"class_name": class, field: value, ...}, nested."""

    def encode(value):
        if isinstance(value, dp_event.DpEvent):
            return dp_event_to_json(value)
        if isinstance(value, list | tuple):
            return [encode(item) for item in value]
        return value

    fields = attr.asdict(event, recurse=False)
    return {"class_name": type(event).__name__, **{k: encode(v) for k, v in fields.items()}}


def dp_event_from_json(data: dict) -> dp_event.DpEvent:
    """The DpEvent written by ``dp_event_to_json``; only dp_accounting's own event classes
    are accepted (nothing is imported by name)."""

    def decode(value):
        if isinstance(value, dict):
            return dp_event_from_json(value)
        if isinstance(value, list):
            return [decode(item) for item in value]
        return value

    if not isinstance(data, dict) or data.get("class_name") not in _EVENT_CLASSES:
        raise InvalidParameterError(f"not a serialised dp-accounting event: {data!r}")
    fields = {k: decode(v) for k, v in data.items() if k != "class_name"}
    try:
        return _EVENT_CLASSES[data["class_name"]](**fields)
    except TypeError as error:  # a known class with missing or unknown fields
        raise InvalidParameterError(
            f"a serialised {data['class_name']} has the wrong fields {sorted(fields)}: {error}"
        ) from None


def total_spent(reports: list[dict], delta: float) -> dict:
    """The budget a list of releases spent together (e.g. every point of a tuning grid, each a
    release on the same private data): their DpEvents (``accountant.dp_event`` of each report)
    composed by dp-accounting's PLD accountant under their common relation. Releases under
    different relations are composed by basic composition (a valid but loose bound): each
    event's epsilon at delta / m under its own relation, summed, for a total delta of delta;
    a release without an event (not private) makes the total None; one that reads no private
    data costs nothing."""
    events, relations, epsilons = [], [], []
    for report in reports:
        accountant = report.get("accountant") or {}
        if report.get("epsilon") == 0.0 and not accountant:
            continue  # reads no private data
        if "dp_event" not in accountant:
            return {"epsilon": None, "delta": delta, "method": "a release is not private"}
        events.append(dp_event_from_json(accountant["dp_event"]))
        relations.append(dp_accounting.NeighboringRelation[accountant["neighboring_relation"]])
        epsilons.append(float(accountant.get("epsilon", report.get("epsilon"))))
    if not events:
        return {"epsilon": 0.0, "delta": delta, "method": "no private data read"}
    delta = check_delta(delta)
    if len(set(relations)) > 1:
        share = delta / len(events)
        parts = [
            pld_accountant(relation, epsilon=min(stated, MAX_EPSILON))
            .compose(event)
            .get_epsilon(share)
            for event, relation, stated in zip(events, relations, epsilons, strict=True)
        ]
        return {
            "epsilon": math.fsum(parts),
            "delta": delta,
            "method": "basic composition (releases under different neighbouring relations: "
            "each at delta / m)",
        }
    relation = relations[0]
    accountant = pld_accountant(relation, epsilon=min(max(epsilons) * len(epsilons), MAX_EPSILON))
    total = accountant.compose(dp_event.ComposedDpEvent(events)).get_epsilon(delta)
    method = f"dp_accounting PLD, {relation.name}"
    return {"epsilon": float(total), "delta": delta, "method": method}
