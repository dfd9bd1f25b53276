"""When the key authority may answer a mask-recovery request: the rules, free of I/O.

The correction for survivors ``S`` reveals the self masks of ``S`` and the pairwise
masks between ``S`` and the agents claimed dropped. Against an aggregator that
lies about who dropped, one rule carries the guarantee: **one survivor set per
round**. Asked twice with different sets, the authority would reveal a live
agent's self mask (first claim: it survived) and its pairwise masks (second
claim: it dropped) — together, its update. So the first claim stands: the same
set again gets the same answer (a restarted aggregator), any other set is refused.

Further rules: the survivors are selected agents, at least the policy's
``min_agents`` and never fewer than two (a "sum" of one update is that update).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ROUNDS_KEPT = 10_000


class RecoveryRefused(Exception):
    """The request must not be answered; the text says why."""


@dataclass
class MaskLedger:
    min_survivors: int
    claims: dict[int, tuple[str, ...]] = field(default_factory=dict)  # round -> survivors it was answered for

    def check(self, rnd: int, selected: list[str], survivors: list[str]) -> tuple[str, ...]:
        """The survivor set to answer for, recorded; raises RecoveryRefused."""
        claim = tuple(sorted(set(survivors)))
        if len(claim) != len(survivors):
            raise RecoveryRefused(f"round {rnd}: survivors listed twice")
        if not set(claim) <= set(selected):
            raise RecoveryRefused(f"round {rnd}: survivors {sorted(set(claim) - set(selected))[:5]} were not "
                                  "selected")
        need = max(2, self.min_survivors)
        if len(claim) < need:
            raise RecoveryRefused(f"round {rnd}: {len(claim)} survivor(s); unmasking fewer than {need} would "
                                  "expose single updates")
        earlier = self.claims.get(rnd)
        if earlier is not None and earlier != claim:
            raise RecoveryRefused(f"round {rnd} was already unmasked for survivors {list(earlier)}; a second, "
                                  f"different claim {list(claim)} would unmask a live agent (lying aggregator?)")
        if earlier is None:
            self.claims[rnd] = claim
            for old in sorted(self.claims)[:-MAX_ROUNDS_KEPT]:
                del self.claims[old]
        return claim

    def to_json(self) -> dict:
        return {str(r): list(c) for r, c in self.claims.items()}

    @classmethod
    def from_json(cls, raw: dict, min_survivors: int) -> MaskLedger:
        return cls(min_survivors, {int(r): tuple(c) for r, c in raw.items()})
