"""A shard worker: one aggregator process folding one shard of a sharded round.

The root aggregator opens rounds and names the shards in the round start (contiguous
ranges of the sorted selection, fedmq/protocol/shards.py). A worker follows the
starts that give it a shard, folds its agents' updates from its own topic prefix
(``shards/<task>/<worker>/…``, which the broker's ACL lets no one else read) with the
same verification and crash-safe store as a single aggregator, and when its shard
closes — every agent reported or went offline, or the deadline — publishes its
encrypted partial sum, signed, for the root to combine.

Killed mid-round, a worker restarted with the same state directory resumes the
round from its store (folded updates counted once, unfinished uploads asked for
again) and still delivers; the root waits ``partial_grace_s`` past the agents'
deadline for it. We chose resumption over reassignment: the shard's uploads sit on
the broker for the worker's persistent session, so a restarted worker loses nothing,
while a reassigned shard would need every agent to upload again.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

from fedmq.privacy.aggregation import RoundSum
from fedmq.protocol import shards, topics, wire
from fedmq.runtime.mqtt_session import BrokerError

from aggregator.folding import layout_to_json
from aggregator.round_state import Decision, RoundState
from aggregator.service import Aggregator

log = logging.getLogger("fedmq.aggregator")
RETRY_PUBLISH_S = 1.0


class ShardWorker(Aggregator):
    """Folds the shard the round start gives it; the root does everything else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._own_shard = self.cfg.aggregator_id
        self._starts: dict[int, wire.RoundStart] = {}  # rounds that give us a shard, not yet folded

    def _subscriptions(self) -> list[str]:
        return [topics.ALL_STATUS, topics.shard_updates(self.task, self._own_shard),
                topics.all_round_starts(self.task)]

    def _handlers(self) -> dict:
        return {**super()._handlers(), "round_start": self._on_round_start}

    def _on_round_start(self, env: wire.Envelope) -> None:
        if self.policy is None:
            return  # retained starts arrive before the context; they arrive again after the restore's pump
        wire.check_signature(env, self.policy.aggregator_key, "the aggregator")
        start: wire.RoundStart = wire.decode_body(env.kind, env.body)
        if start.protection != self.protection:
            raise wire.WireError(f"round {env.round} start asks for protection other than the task's policy")
        mine = shards.members(start.selected, start.shards).get(self._own_shard)
        if not mine:
            return  # not sharded, or no shard of ours
        if self.state is not None and env.round == self.state.round:
            self._follow(start)  # the open round (resumed after a restart): the task's model and mask
        elif env.round >= self.next_round:
            self._starts[env.round] = start

    def _follow(self, start: wire.RoundStart) -> None:
        self.model_version = start.model_version
        self.fingerprint = start.fingerprint or self.fingerprint
        self.mask_digest = start.mask_digest if start.purpose == "train" else self.mask_digest
        self.mask_round = start.mask_round

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self._connect_and_load(stop)
        resumed = self._resume()
        while not stop.is_set():
            if not resumed and self._idle():
                if not self._pump(stop, until=lambda: bool(self._starts) or not self._idle()):
                    break
                if self._idle():
                    rnd = min(self._starts)
                    self._open_shard(rnd, self._starts.pop(rnd))
            resumed = False
            self._pump(stop, until=self._closable)
            if stop.is_set():
                break
            self._deliver(self.state.decide(time.time()), stop)
        log.info("shard worker %s stopped", self._own_shard)

    def _idle(self) -> bool:
        return self.state is None or self.state.closed

    def _on_update_chunk(self, env: wire.Envelope, info: topics.TopicInfo | None = None) -> None:
        """An upload that overtakes the round start it answers (published by another
        client, it may) opens the shard rather than being refused."""
        if self._idle() and env.round in self._starts:
            self._open_shard(env.round, self._starts.pop(env.round))
        super()._on_update_chunk(env, info)

    def _open_shard(self, rnd: int, start: wire.RoundStart) -> None:
        mine = shards.members(start.selected, start.shards)[self._own_shard]
        # Layout agreement inside the shard needs the shard's share of the quorum; the
        # root alone decides whether the round has its quorum.
        quorum = max(1, min(len(mine), math.ceil(start.quorum * len(mine) / len(start.selected))))
        self._follow(start)
        self.state = RoundState(rnd, start.model_version, frozenset(mine), quorum, start.deadline,
                                purpose=start.purpose, offline_grace_s=self.cfg.offline_grace_s)
        self.bytes_received, self.agg_s = 0, 0.0
        self._held, self._agreed_key = {}, None
        self.sum = RoundSum(quantized=self.protection.scheme != "ckks" and start.purpose == "train",
                            ckks=self.ctx, bfv=self.bfv_ctx)
        self.store.open(self.state)
        log.info("round %d: folding shard %s of %d agent(s) (layout quorum %d)", rnd, self._own_shard, len(mine),
                 quorum)
        for agent in mine:  # uploads that began before we saw the start (or while we were down)
            if agent in self.online and self.chunks.missing("update", rnd, agent) is not None:
                self._ask_for_missing(agent)

    def _deliver(self, decision: Decision | None, stop: threading.Event) -> None:
        """Publish the shard's partial sum (whatever the shard decided: the root
        judges the quorum), then forget the round."""
        st = self.state
        st.closed = True
        self.chunks.discard(keep=lambda key: key[1] > st.round)
        participants = sorted(st.weights)
        partial = wire.PartialSum(
            participants=participants, weights=[st.weights[a] for a in participants], dropped=st.dropped,
            layout=json.dumps(layout_to_json(self._agreed_key) if self._agreed_key else None),
            sum_meta=self.sum.meta_bytes(), ciphertexts=list(self.sum.serialized_ciphertexts()),
            bytes_received=self.bytes_received, agg_s=self.agg_s)
        while not stop.is_set():
            try:
                self.session.send_stream(lambda seq: topics.partial_chunk(self.task, st.round, self._own_shard, seq),
                                         partial, task=self.task, rnd=st.round, chunk_size=self.cfg.chunk_size)
                break
            except BrokerError as exc:  # the store stays open: a restart would deliver it too
                log.warning("round %d: partial sum not delivered (%s); retrying", st.round, exc)
                stop.wait(RETRY_PUBLISH_S)
        if stop.is_set():
            return
        log.info("round %d: shard %s delivered (%s): %d update(s) folded in %.3fs, dropped %s", st.round,
                 self._own_shard, decision.reason if decision else "stopped", len(participants), self.agg_s,
                 st.dropped)
        self.sum = None
        self.next_round = st.round + 1
        self._starts = {r: s for r, s in self._starts.items() if r > st.round}
        self._persist()
        self.store.close()

