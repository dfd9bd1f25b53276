"""Intake: every inbound message is decoded, checked against its topic and
handed to its handler; update chunks go to the on-disk part store (parked while
a restarted aggregator waits for the public context), acknowledged only once
handled; agent statuses and telemetry are recorded."""

from __future__ import annotations

import logging
import queue
import threading
import time


from fedmq.privacy import he
from fedmq.runtime.telemetry import PHASES
from fedmq.protocol import topics, wire
from fedmq.runtime.mqtt_session import Inbound

from aggregator.round_state import Rejected

log = logging.getLogger("fedmq.aggregator")
RECENT_ROUNDS = 4  # telemetry is taken for the open round and this many before it


class Intake:
    """Inbound messages, one handler per topic family."""

    def _pump(self, stop: threading.Event, until, timeout: float | None = None,
              park_updates: bool = False) -> bool:
        """Handle inbound messages until ``until()`` holds; False on timeout/stop.

        ``park_updates``: before the open round is restored (after a restart), update
        chunks — which our persistent session kept for us while we were down — go
        straight to the round store on disk, where the restore picks them up; handled
        now they would be rejected, held unacknowledged they would block the broker's
        in-flight window and with it the public context we are waiting for."""
        end = None if timeout is None else time.monotonic() + timeout
        while not until():
            if stop.is_set() or (end is not None and time.monotonic() > end):
                return False
            try:
                msg = self.session.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if park_updates and _is_update(msg.topic):
                self._park(msg)
            else:
                self.dispatch(msg)
            self.session.ack(msg)  # only now: a chunk is on disk before the broker forgets it
        return True

    def _park(self, msg: Inbound) -> None:
        try:
            env = wire.decode_envelope(msg.payload, max_bytes=self.cfg.max_message_bytes)
            wire.check_against_topic(env, topics.parse(msg.topic), task=self.task)
        except ValueError as exc:
            log.warning("rejected %s: %s", msg.topic, exc)
            return
        if self._parked_bytes + len(msg.payload) > self.cfg.max_parked_bytes:
            # Acknowledged and dropped: once the round resumes, the agent is asked for what is missing.
            log.warning("rejected %s: %d bytes already parked while waiting for the public context (limit "
                        "max_parked_bytes %d); asked for again after the restore", msg.topic, self._parked_bytes,
                        self.cfg.max_parked_bytes)
            return
        self._parked_bytes += len(msg.payload)
        self.store.add_chunk(env, msg.payload)

    def dispatch(self, msg: Inbound) -> None:
        try:
            info = topics.parse(msg.topic)
            if msg.payload == b"":
                return  # a retained message being cleared
            env = wire.decode_envelope(msg.payload, max_bytes=self.cfg.max_message_bytes)
            wire.check_against_topic(env, info, task=self.task)
            handler = self._handlers().get(info.family)
            if handler is None:
                raise wire.WireError(f"{self.cfg.aggregator_id} does not consume {info.family} messages")
            self._inbound_bytes = len(msg.payload)
            handler(env, info) if info.family == "update" else handler(env)
        except (ValueError, Rejected, he.HEError) as exc:  # WireError is a ValueError
            self.metrics.rejected.inc()
            log.warning("rejected %s: %s", msg.topic, exc)

    def _handlers(self) -> dict:
        """Topic family -> handler; a shard worker and the root of a sharded round add theirs."""
        out = {"update": self._on_update_chunk, "status": self._on_status, "public_context": self._on_public_context,
               "telemetry": self._on_telemetry, "mask_correction": self._on_mask_correction}
        if self.cfg.shard_workers:
            out["partial"] = self._on_partial_chunk
        return out

    def _on_telemetry(self, env: wire.Envelope) -> None:
        """Recorded only for an open or recent round, once per agent and round, with
        phases the agent really has: disk and Prometheus series must not grow at an
        agent's whim."""
        oldest = max(0, self.next_round - RECENT_ROUNDS)
        if not oldest <= env.round <= self.next_round:
            raise wire.WireError(f"telemetry for round {env.round}; only rounds {oldest}..{self.next_round} are "
                                 "open or recent")
        tele: wire.Telemetry = wire.decode_body(env.kind, env.body)
        key = (env.round, env.sender) if tele.failed is None else (env.round, f"{env.sender}/failed")
        if key in self._telemetry_seen:
            raise wire.WireError(f"{env.sender} already reported round {env.round}'s telemetry")
        unknown = sorted(set(tele.phases) - set(PHASES))
        if unknown:
            raise wire.WireError(f"telemetry names unknown phase(s) {unknown[:5]}; known: {', '.join(PHASES)}")
        st = self.state
        if tele.failed is not None and st is not None and not st.closed and env.round == st.round:
            log.warning("%s sits round %d out: %s", env.sender, env.round, tele.failed)
            st.withdraw(env.sender)
        self.telemetry.record(env.round, env.sender, tele)
        self._telemetry_seen.add(key)
        self.metrics.telemetry(env.sender, tele)

    def _on_public_context(self, env: wire.Envelope) -> None:
        wire.check_signature(env, self.authority_key, "the key authority")
        done = self._context_chunks.add(env)
        if done is None:
            return
        body: wire.PublicContext = wire.decode_body(done.kind, done.body)
        ctx = he.load_context(body.context)
        bfv = he.load_context(body.bfv_context) if body.bfv_context else None
        if ctx.is_private() or (bfv is not None and bfv.is_private()):
            # Refuse to hold a secret key even if someone publishes one.
            raise wire.WireError("the 'public' context carries a secret key; refusing it")
        if body.policy is None:
            raise wire.WireError("the public context carries no task policy")
        self.apply_policy(body.policy)
        self.ctx, self.bfv_ctx = ctx, bfv
        self.max_summands = body.max_summands
        log.info("loaded the public CKKS context %s%s", he.params_of(ctx), " and BFV parameters" if bfv else "")

    def _on_status(self, env: wire.Envelope) -> None:
        body: wire.AgentStatus = wire.decode_body(env.kind, env.body)
        if body.state == "online":
            back = env.sender in self.gone
            self.online.add(env.sender)
            self.gone.discard(env.sender)
            if self.state:
                self.state.mark_online(env.sender)
                st = self.state
                in_progress = self.chunks.missing("update", st.round, env.sender) is not None
                if (back or in_progress) and not st.closed and env.sender in st.selected \
                        and env.sender not in st.weights and not self.cfg.shard_workers:
                    # It reconnected (or restarted: then no last will reached us) mid-round: resume its upload.
                    self._ask_for_missing(env.sender)
        else:
            self.online.discard(env.sender)
            self.gone.add(env.sender)
            if self.state:
                self.state.mark_offline(env.sender, time.time())
        self.metrics.agents_online.set(len(self.online))
        log.info("agent %s is %s (%d online)", env.sender, body.state, len(self.online))

    def _on_update_chunk(self, env: wire.Envelope, info: topics.TopicInfo | None = None) -> None:
        st = self.state
        if self.cfg.shard_workers:
            raise Rejected("this aggregator's rounds are sharded: updates go to the shard workers")
        if (info.shard if info else None) != self._own_shard:
            raise Rejected(f"update addressed to {info.shard or 'the unsharded topic'}; this is "
                           f"{self._own_shard or 'an unsharded aggregator'}")
        if st is None or env.round != st.round:
            raise Rejected(f"chunk for round {env.round}, which is not open")
        st.check(env.sender, time.time())
        done = self.chunks.add(env)
        self.telemetry.add_upload(env.round, env.sender, self._inbound_bytes)
        self.metrics.update_bytes.inc(self._inbound_bytes)
        if done is not None:
            try:
                self._fold(done)
            except (Rejected, ValueError, he.HEError):
                # Its upload is complete and refused: it sends no other, so the round
                # stops waiting for it (a valid update that still arrives would count).
                st.withdraw(env.sender)
                raise

def _is_update(topic: str) -> bool:
    try:
        return topics.parse(topic).family == "update"
    except ValueError:
        return False
