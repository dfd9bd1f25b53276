"""One round's bookkeeping, free of I/O so every rule is unit-testable.

Rules (DESIGN.md, Dropouts): a round closes when every selected agent has
reported or is known offline, or at the deadline; it aggregates if the quorum
reported and is aborted otherwise. A round short of its quorum is not aborted
early when the rest are offline: offline agents often come back (a Wi-Fi drop, a
broker restart takes every agent offline at once) and resume their uploads, so it
waits for them until the deadline. Weights are whatever the completed agents
declared, so re-normalization over survivors is automatic: the agents divide the
encrypted sum by ``total_weight`` of the agents that completed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Rejected(Exception):
    """An update that must not count; the text says why."""


class Outcome(str, Enum):
    AGGREGATE = "aggregated"
    ABORT = "aborted"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str


@dataclass
class RoundState:
    round: int
    model_version: int
    selected: frozenset[str]
    quorum: int
    deadline: float
    purpose: str = "train"  # or "sensitivity": the encrypted mask agreement
    weights: dict[str, int] = field(default_factory=dict)
    offline: dict[str, float] = field(default_factory=dict)  # agent -> when its last will arrived
    # An agent offline for less than this is not yet given up on: a broker restart or a
    # Wi-Fi blip takes agents offline for the few seconds their reconnect takes.
    offline_grace_s: float = 0.0
    closed: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.quorum <= len(self.selected):
            raise ValueError(f"quorum {self.quorum} impossible with {len(self.selected)} selected agents")

    def check(self, agent: str, now: float) -> None:
        """Raise Rejected if an update from ``agent`` may not count now."""
        if self.closed:
            raise Rejected(f"round {self.round} is closed")
        if agent not in self.selected:
            raise Rejected(f"{agent!r} was not selected for round {self.round}")
        if agent in self.weights:
            raise Rejected(f"{agent!r} already contributed to round {self.round}")
        if now > self.deadline:
            raise Rejected(f"update from {agent!r} arrived after the deadline of round {self.round}")

    def record(self, agent: str, weight: int, now: float) -> None:
        self.check(agent, now)
        if weight < 1:
            raise Rejected(f"weight {weight} of {agent!r} is not a positive sample count")
        self.weights[agent] = weight
        self.offline.pop(agent, None)

    def mark_offline(self, agent: str, now: float) -> None:
        if agent in self.selected and agent not in self.weights:
            self.offline.setdefault(agent, now)

    def withdraw(self, agent: str) -> None:
        """The agent said it sits this round out (its workload failed): a dropout now,
        no grace period, no waiting for the deadline."""
        if agent in self.selected and agent not in self.weights:
            self.offline[agent] = float("-inf")

    def mark_online(self, agent: str) -> None:
        if self.offline.get(agent) != float("-inf"):  # a withdrawal stands; a reconnect does not undo it
            self.offline.pop(agent, None)  # it reconnected and may still deliver

    @property
    def total_weight(self) -> int:
        return sum(self.weights.values())

    @property
    def dropped(self) -> list[str]:
        return sorted(self.selected - self.weights.keys())

    def decide(self, now: float) -> Decision | None:
        """What to do now: None while the round should stay open."""
        gone = {a for a, since in self.offline.items() if now - since >= self.offline_grace_s}
        outstanding = self.selected - self.weights.keys() - gone
        done = len(self.weights)
        if not outstanding and done >= self.quorum:
            return Decision(Outcome.AGGREGATE, f"all selected agents reported or went offline ({done} reported)")
        if now >= self.deadline:
            if done >= self.quorum:
                return Decision(Outcome.AGGREGATE, f"deadline reached with quorum ({done}/{self.quorum})")
            return Decision(Outcome.ABORT, f"deadline reached without quorum ({done}/{self.quorum})")
        return None
