"""The round lifecycle: who is online, which agents a round selects, opening it
(retained start), asking for missing chunks, closing it (result, close message,
retained clean-up) and persisting where the task stands."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np

from fedmq.privacy import client_dp, he, masking
from fedmq.protocol import shards, topics, wire
from fedmq.privacy.aggregation import RoundSum

from aggregator.intake import RECENT_ROUNDS
from aggregator.round_state import Decision, Outcome, RoundState
from aggregator.unmasking import UnmaskFailed

log = logging.getLogger("fedmq.aggregator")


class RoundLifecycle:
    """Open, drive and close rounds; the rules themselves live in round_state.py."""

    def _select(self, online: list[str], cap: int, rnd: int) -> list[str]:
        """Every online agent, or — over-provisioned — ceil(overprovision x quorum) of them
        at random (seeded per round, so a restarted aggregator would pick the same)."""
        want = len(online)
        if self.cfg.overprovision:
            want = max(self.cfg.min_agents, math.ceil(self.cfg.overprovision * self.cfg.min_agents))
        want = min(want, cap, len(online))
        if want == len(online):
            return online
        rng = np.random.default_rng([self.cfg.selection_seed, rnd])
        return sorted(rng.choice(online, size=want, replace=False).tolist())

    def _roll_call(self) -> None:
        """Ask agents to announce themselves: a status we could not get retained
        (RabbitMQ, or a broker that lost its retained store) arrives this way."""
        self.session.send(topics.roll_call(self.task), wire.RollCall(aggregator=self.cfg.aggregator_id),
                          task=self.task, rnd=0)

    def _ask_for_missing(self, agent: str) -> None:
        st = self.state
        missing = self.chunks.missing("update", st.round, agent) or []
        self.session.send(topics.resend(self.task, st.round, agent), wire.ResendRequest.of(missing),
                          task=self.task, rnd=st.round)
        log.info("asked %s for %s of its round-%d upload", agent,
                 f"{len(missing)} missing chunk(s)" if missing else "all", st.round)

    def _needs_mask_agreement(self) -> bool:
        prot = self.protection
        return masking.needs_agreement(prot.scheme, prot.p, prot.mode) and self.mask_round == 0

    def _enough_online(self) -> bool:
        """Target reached, or quorum online for a whole grace period (stragglers
        of a simultaneous fleet start get their chance to enroll)."""
        n, c = len(self.online), self.cfg
        if n >= max(c.target_agents - len(self.gone), c.min_agents):
            return True
        if n < c.min_agents:
            self._quorum_online_since = None
            return False
        if self._quorum_online_since is None:
            self._quorum_online_since = time.monotonic()
        return time.monotonic() - self._quorum_online_since >= c.selection_grace_s

    def _closable(self) -> bool:
        return self.state is not None and self.state.decide(time.time()) is not None

    def _open_round(self, purpose: str = "train") -> None:
        rnd = self.next_round
        cap = self.cfg.max_agents
        if self.protection.scheme != "ckks" and self.max_summands:
            cap = min(cap, self.max_summands)  # more would overflow the plan's integer lanes
        selected = self._select(sorted(self.online), cap, rnd)
        quorum = min(self.cfg.min_agents, len(selected))
        deadline = time.time() + self.cfg.round_timeout_s
        plan = shards.assign(selected, self.cfg.shard_workers)
        # Sharded: the agents' deadline is the workers'; the root waits a grace longer for their partial sums.
        grace = self.cfg.partial_grace_s if plan else 0.0
        self._round_opened = time.monotonic()
        self.state = RoundState(rnd, self.model_version, frozenset(selected), quorum, deadline + grace,
                                purpose=purpose, offline_grace_s=self.cfg.offline_grace_s)
        self.bytes_received, self.agg_s, self._worker_agg_s, self._partials_done = 0, 0.0, 0.0, set()
        self._held, self._agreed_key = {}, None  # the round's layout: agreed by a quorum of its updates
        self.sum = RoundSum(quantized=self.protection.scheme != "ckks" and purpose == "train",
                            ckks=self.ctx, bfv=self.bfv_ctx)
        start = wire.RoundStart(model_version=self.model_version, deadline=deadline, selected=selected,
                                quorum=quorum, purpose=purpose, protection=self.protection,
                                mask_round=self.mask_round, mask_digest=self.mask_digest,
                                fingerprint=self.fingerprint, shards=plan)
        self.store.open(self.state)
        self.session.send(topics.round_start(self.task, rnd), start, task=self.task, rnd=rnd, retain=True)
        log.info("round %d (%s) open: %d agents selected, quorum %d, deadline in %.0fs, p=%s%s",
                 rnd, purpose, len(selected), quorum, self.cfg.round_timeout_s, self.protection.p,
                 f", {len(plan)} shards" if plan else "")

    def _dp_budget_left(self) -> bool:
        """Differential privacy: open no training round that would overspend the budget."""
        dp = self.protection.dp
        if dp is None or self._needs_mask_agreement() or client_dp.budget_allows(dp, self.dp_rounds):
            return True
        log.warning("privacy budget spent: %d aggregated round(s) reach epsilon %.3g of %.3g at delta %.1g; another "
                    "would exceed it, so no further round opens", self.dp_rounds,
                    client_dp.epsilon_after(dp.noise_multiplier, self.dp_rounds, dp.delta), dp.epsilon, dp.delta)
        return False

    def _account_dp(self, rnd: int) -> None:
        dp = self.protection.dp
        self.dp_rounds += 1
        eps = client_dp.epsilon_after(dp.noise_multiplier, self.dp_rounds, dp.delta)
        self.metrics.dp_epsilon.set(eps)
        self.telemetry.record_round_metric(rnd, "dp_epsilon", eps)
        log.info("round %d: privacy spent so far epsilon %.3f at delta %.1g (budget %.3g)", rnd, eps, dp.delta,
                 dp.epsilon)

    def _close_round(self, decision: Decision, stop=None) -> Outcome:
        st = self.state
        st.closed = True
        dropped_partials = self.chunks.discard(keep=lambda key: key[1] > st.round)
        participants = sorted(st.weights)
        chunks = 0
        result = None
        if decision.outcome is Outcome.AGGREGATE and self._round_is_masked():
            try:
                self._unmask(stop or threading.Event())
            except UnmaskFailed as exc:
                log.error("round %d: %s; aborting the round", st.round, exc)
                decision = Decision(Outcome.ABORT, f"sum could not be unmasked: {exc}")
        if decision.outcome is Outcome.AGGREGATE:
            t0 = time.perf_counter()
            try:
                result = self.sum.result(participants, st.total_weight, purpose=st.purpose,
                                         mask_digest=self.mask_digest if st.purpose == "train" else None,
                                         base_version=st.model_version,
                                         scheme=self.protection.scheme if st.purpose == "train" else "ckks")
            except (ValueError, OverflowError, he.HEError) as exc:
                # Never raise on the close path: a restart would close the same round and die again.
                log.error("round %d: cannot build its result (%s); aborting the round", st.round, exc)
                decision = Decision(Outcome.ABORT, f"result could not be built: {exc}")
            self.agg_s += time.perf_counter() - t0
        if result is not None:
            _, chunks = self.session.send_stream(lambda seq: topics.round_result(self.task, st.round, seq), result,
                                     task=self.task, rnd=st.round, chunk_size=self.cfg.chunk_size, retain=True)
            if st.purpose == "train":
                self.model_version = st.round
                if self.protection.dp is not None:
                    self._account_dp(st.round)
        closed = wire.RoundClosed(status=decision.outcome.value, participants=participants, dropped=st.dropped,
                                  reason=decision.reason, total_weight=min(st.total_weight, 1 << 62),
                                  bytes_received=self.bytes_received, agg_s=self.agg_s + self._worker_agg_s)
        self.session.send(topics.round_closed(self.task, st.round), closed, task=self.task, rnd=st.round,
                          retain=True)
        self._retained[st.round] = chunks
        self._clear_retained(keep_from=st.round - 1)
        log.info("round %d %s: %s; participants %s, dropped %s, %d partial upload(s) discarded, agg %.3fs",
                 st.round, decision.outcome.value, decision.reason, _few(participants), _few(st.dropped),
                 dropped_partials, self.agg_s)
        self.metrics.rounds.labels(decision.outcome.value).inc()
        self.metrics.round_seconds.observe(time.monotonic() - self._round_opened)
        self.metrics.participants.set(len(participants))
        self._last_participants = (st.round, participants)
        self.sum = None  # free the sums: O(model) memory per open round only
        self.next_round = st.round + 1
        # Telemetry is taken for recent rounds only (intake.RECENT_ROUNDS): forget older ones,
        # or a fleet running for months grows this set without bound.
        oldest = self.next_round - RECENT_ROUNDS
        self._telemetry_seen = {k for k in self._telemetry_seen if k[0] >= oldest}
        if st.purpose == "train":
            self.rounds_done += 1
        elif decision.outcome is Outcome.AGGREGATE:
            self.mask_round = st.round
        self._persist()
        self.store.close()
        return decision.outcome

    def _clear_retained(self, keep_from: int) -> None:
        """Drop the retained start/result/closed messages of old rounds from the broker,
        keeping the last two rounds (agents rebuild from them) and the mask-agreement
        round (late joiners derive the mask from it)."""
        for rnd in [r for r in self._retained if r < keep_from and r != self.mask_round]:
            for seq in range(self._retained.pop(rnd)):
                self.session.delete_retained(topics.round_result(self.task, rnd, seq))
            self.session.delete_retained(topics.round_start(self.task, rnd))
            self.session.delete_retained(topics.round_closed(self.task, rnd))


def _few(agents: list[str], limit: int = 20) -> str:
    """A list for a log line: whole when short; a thousand ids on one line help nobody
    (the round-closed message and the telemetry database have them all)."""
    if len(agents) <= limit:
        return str(agents)
    return f"{len(agents)} agents ({', '.join(agents[:5])}, ...)"
