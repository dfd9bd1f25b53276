"""The root of a sharded round: each shard worker's partial sum is verified and
combined into the round's sum, in one store transaction per partial.

The root never reads an agent's update: the broker's ACL keeps the shard topics to
their workers. What it learns per shard is what a single aggregator learns per
round — an encrypted (or masked) sum and who contributed with which weight.
Partials are signed by the workers the key authority's policy lists, and must
account for exactly the agents the round start gave their worker.
"""

from __future__ import annotations

import json
import logging
import time

from fedmq.privacy.aggregation import RoundSum
from fedmq.protocol import shards, wire
from fedmq.protocol.chunking import Completed

from aggregator.folding import layout_from_json, layout_to_json
from aggregator.round_state import Rejected

log = logging.getLogger("fedmq.aggregator")


class PartialSums:
    """Intake and folding of shard workers' partial sums (the root's side)."""

    def _shard_plan(self) -> dict[str, list[str]]:
        """worker -> its agents in the open round (the same rule the round start announced);
        computed once per round, not for every chunk of every partial."""
        st = self.state
        if self._plan_round != st.round:
            selected = sorted(st.selected)
            self._plan_round = st.round
            self._plan = shards.members(selected, shards.assign(selected, self.cfg.shard_workers))
        return self._plan

    def _on_partial_chunk(self, env: wire.Envelope) -> None:
        st = self.state
        if st is None or env.round != st.round or st.closed:
            raise Rejected(f"partial sum for round {env.round}, which is not open")
        key = self.policy.worker_keys.get(env.sender) if self.policy else None
        if key is None:
            raise Rejected(f"{env.sender!r} is not a shard worker of the task's policy")
        wire.check_signature(env, key, f"shard worker {env.sender}")
        if env.sender not in self._shard_plan():
            raise Rejected(f"{env.sender!r} has no shard in round {st.round}")
        if env.sender in self._partials_done:
            raise Rejected(f"{env.sender!r} already delivered round {st.round}'s partial sum")
        done = self.chunks.add(env)
        if done is not None:
            self._fold(done)  # routed to _fold_partial

    def _fold_partial(self, done: Completed) -> None:
        st, worker = self.state, done.envelope.sender
        body: wire.PartialSum = wire.decode_body("partial", b"".join(done.parts()))
        members = set(self._shard_plan()[worker])
        _check_accounts(body, members, worker)
        if self.protection.dp is not None and st.purpose == "train" and any(w != 1 for w in body.weights):
            raise Rejected(f"{worker}'s partial counts weights other than 1 under differential privacy")
        if any(w > self.max_samples for w in body.weights):
            raise Rejected(f"{worker}'s partial declares a weight over the policy's max_samples {self.max_samples}")
        t0 = time.perf_counter()
        if body.participants:
            key = layout_from_json(json.loads(body.layout))
            if self._agreed_key is not None and key != self._agreed_key:
                raise Rejected(f"{worker}'s partial has another layout than the round's other shards")
            part = RoundSum.from_stored(body.sum_meta, body.ciphertexts, ckks=self.ctx, bfv=self.bfv_ctx)
            if part.quantized != self.sum.quantized or part.n_params != key[0]:
                raise Rejected(f"{worker}'s partial sum does not match its declared layout")
            self.sum.merge(part)  # ValueError: rejected by the caller, the committed sum untouched
            del part
            self._adopt(key)
        now = time.time()
        for agent, weight in zip(body.participants, body.weights):
            st.record(agent, weight, min(now, st.deadline))
        for agent in members - set(body.participants):
            st.withdraw(agent)  # dropped, refused or never heard of by its worker: settled for this round
        self._partials_done.add(worker)
        self.store.fold(st, {"agreed": layout_to_json(self._agreed_key) if self._agreed_key else None, "partials": sorted(self._partials_done)},
                        self.sum.meta_bytes(), self.sum.serialized_ciphertexts(), senders=[worker])
        self.bytes_received += body.bytes_received
        # The shards fold in parallel: the round's fold time is the slowest shard's plus the combining.
        self._worker_agg_s = max(self._worker_agg_s, body.agg_s)
        self.agg_s += time.perf_counter() - t0
        log.info("round %d: combined %s's partial sum (%d update(s), %d dropped, shard fold %.3fs); %d/%d shards",
                 st.round, worker, len(body.participants), len(members) - len(body.participants), body.agg_s,
                 len(self._partials_done), len(self._shard_plan()))


def _check_accounts(body: wire.PartialSum, members: set[str], worker: str) -> None:
    """A partial accounts for its own shard's agents only, each once, each with a weight."""
    if len(body.weights) != len(body.participants):
        raise Rejected(f"{worker}'s partial has {len(body.weights)} weights for {len(body.participants)} agents")
    named = body.participants + body.dropped
    if len(set(named)) != len(named):
        raise Rejected(f"{worker}'s partial names an agent twice")
    strangers = sorted(set(named) - members)
    if strangers:
        raise Rejected(f"{worker}'s partial names agents outside its shard: {strangers[:5]}")

