"""One round of secure aggregation, run with the product's own code, for the audit.

Why: the audit must attack what really travels, not a model of it. A masked mode's
upload is the agent's ring values plus ``secure_aggregation.agent_mask`` under
real X25519 keys of a roster, and what the aggregator finally learns is the
key authority's ``unmask`` of the int64 sum of uploads. Both come from here, so a
change to the masking code changes what the audit attacks.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmq.privacy import secure_aggregation as sa

TASK = "audit"


class SecureRound:
    """A roster of ``size`` agents with fresh mask keys, selected for one round."""

    def __init__(self, size: int, rnd: int = 1) -> None:
        if size < 1:
            raise ValueError("a round needs at least one agent")
        self.rnd = rnd
        self.agents = [f"agent-{i:03d}" for i in range(size)]
        self.keys: dict[str, X25519PrivateKey] = {
            a: sa.agent_private_key(os.urandom(32), TASK, a) for a in self.agents}
        self.roster = {a: sa.public_bytes(k) for a, k in self.keys.items()}

    def upload(self, index: int, values: list[np.ndarray], lanes: list[sa.Lane]) -> list[np.ndarray]:
        """Agent ``index``'s lanes as they travel: its ring values plus its round mask."""
        me = self.agents[index]
        masks = sa.agent_mask(me, self.keys[me], self.roster, self.agents, TASK, self.rnd, lanes)
        return sa.mask(values, masks)

    def unmasked_sum(self, uploads: list[list[np.ndarray]], lanes: list[sa.Lane]) -> list[np.ndarray]:
        """What the aggregator learns once every agent survived: the ring sum of the values."""
        sums = [np.sum([u[i].astype(np.int64) for u in uploads], axis=0) for i in range(len(lanes))]
        corr = sa.correction(self.keys, self.agents, self.agents, TASK, self.rnd, lanes)
        return sa.unmask(sums, lanes, corr)


def signed(ring: np.ndarray) -> np.ndarray:
    """Ring elements read as two's-complement integers: the attacker's centered view."""
    return ring.view(np.dtype(f"<i{ring.dtype.itemsize}")).astype(np.float64)
