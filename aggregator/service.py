"""The aggregator daemon: publishes rounds, folds verified encrypted updates into a
running ciphertext sum as they complete, and publishes the encrypted result.

It loads the task's *public* CKKS context (parameters only): it can add
ciphertexts, and cannot decrypt a single one.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from pathlib import Path

import numpy as np

from fedmq.privacy import he, masking
from fedmq.protocol import topics, update_stream, wire
from fedmq.protocol.chunking import Completed, Reassembler
from fedmq.runtime.config import AggregatorConfig
from fedmq.runtime.mqtt_session import Inbound, MqttSession
from fedmq.runtime.private_files import write_private
from fedmq.privacy.aggregation import RoundSum
from fedmq.runtime.signals import stop_event
from fedmq.runtime.telemetry_db import TelemetryDB

from aggregator.round_state import Decision, Outcome, Rejected, RoundState
from aggregator.metrics import Metrics
from aggregator.round_store import RoundStore, StoredParts

log = logging.getLogger("fedmq.aggregator")
MAX_CONTEXT_CHUNKS = 64  # of the key authority's chunk size: 16 MiB at 256 KiB
MIN_CHUNK_BYTES = 1024  # an agent's smallest chunk_size


class Aggregator:
    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self.task = cfg.task
        # Inbound payloads beyond inbox_max_bytes wait on disk: a backlog of fifty
        # uploads must not become fifty uploads in memory.
        self.session = MqttSession(cfg.broker, cfg.aggregator_id, manual_ack=True,
                                   inbox_max_bytes=cfg.inbox_max_bytes, spool_dir=Path(cfg.state_dir) / "spool")
        self._context_chunks = Reassembler(max_stream_bytes=cfg.max_update_bytes)
        self.ctx = None
        self.bfv_ctx = None
        self.max_summands = 0  # the quantization plan's bound on agents per sum (0: none)
        self.online: set[str] = set()
        self.gone: set[str] = set()  # seen online once, now offline: not worth waiting for
        self.state: RoundState | None = None
        self.sum: RoundSum | None = None  # the open round's running sum
        self.code_layout: list[tuple[int, int]] | None = None  # (codes, width) per segment of the open round
        self.n_encrypted: int | None = None  # layout of the open round, set by its first update
        self.protection = cfg.protection
        self.mask_round = 0  # the sensitivity round whose sum defines the task's mask
        self.mask_digest: bytes | None = None
        self.bytes_received = 0
        self.agg_s = 0.0
        self.n_params: int | None = None
        self.model_version = 0
        self.next_round = 1
        self.rounds_done = 0  # training rounds closed (aggregated or aborted)
        self._quorum_online_since: float | None = None
        self._retained: dict[int, int] = {}  # round -> result chunks this process left retained
        self._state_file = Path(cfg.state_dir) / "aggregator_state.json"
        self.store = RoundStore(Path(cfg.state_dir))
        self.telemetry = TelemetryDB(Path(cfg.state_dir) / "telemetry.sqlite")
        self.metrics = Metrics(cfg.metrics_port, cfg.metrics_host)
        self._inbound_bytes = 0
        self._telemetry_seen: set[tuple[int, str]] = set()
        self._last_participants: tuple[int, list[str]] | None = None
        self._round_opened = time.monotonic()
        # Completed uploads are not joined in memory: they are read back from disk (update_stream.py).
        self.chunks = Reassembler(max_stream_bytes=cfg.max_update_bytes, parts=StoredParts(self.store),
                                  assemble=False, min_chunk=MIN_CHUNK_BYTES)
        self._restore()

    # ------------------------------------------------------------------ persistence
    def _restore(self) -> None:
        if self._state_file.exists():
            saved = json.loads(self._state_file.read_text())
            self.next_round, self.model_version = saved["next_round"], saved["model_version"]
            self.n_params = saved.get("n_params")
            self.rounds_done = saved.get("rounds_done", 0)
            if saved.get("protection") == _protection_key(self.protection):
                self.mask_round = saved.get("mask_round", 0)
                digest = saved.get("mask_digest")
                self.mask_digest = bytes.fromhex(digest) if digest else None
            log.info("resuming at round %d (model version %d)", self.next_round, self.model_version)

    def _persist(self) -> None:
        write_private(self._state_file, json.dumps({
            "next_round": self.next_round, "model_version": self.model_version, "n_params": self.n_params,
            "rounds_done": self.rounds_done,
            "protection": _protection_key(self.protection), "mask_round": self.mask_round,
            "mask_digest": self.mask_digest.hex() if self.mask_digest else None,
        }).encode())

    # ------------------------------------------------------------------ main loop
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        s = self.session
        for filt in (topics.ALL_STATUS, topics.all_updates(self.task), topics.ALL_TELEMETRY):
            s.subscribe(filt)
        # The public context's chunks one exact topic each, not by wildcard: RabbitMQ's
        # MQTT plugin delivers retained messages to exact-topic subscriptions only.
        for seq in range(MAX_CONTEXT_CHUNKS):
            s.subscribe(topics.public_context(self.task, seq))
        s.connect()
        log.info("waiting for the public context of task %s", self.task)
        self._pump(stop, until=lambda: self.ctx is not None, park_updates=True)
        resumed = self._resume()
        self._roll_call()
        while not stop.is_set() and (self.cfg.rounds == 0 or self.rounds_done < self.cfg.rounds):
            if resumed:
                resumed = False
                self._pump(stop, until=self._closable)
                if stop.is_set():
                    break
                self._close_round(self.state.decide(time.time()))
                continue
            self._quorum_online_since = None
            if not self._pump(stop, until=self._enough_online, timeout=self.cfg.wait_for_agents_s):
                log.warning("only %d agent(s) online, need %d; still waiting", len(self.online), self.cfg.min_agents)
                self._roll_call()
                continue
            purpose = "sensitivity" if self._needs_mask_agreement() else "train"
            self._open_round(purpose)
            self._pump(stop, until=self._closable)
            if stop.is_set():
                break
            self._close_round(self.state.decide(time.time()))
        if not stop.is_set() and self._last_participants:
            # The agents report a round's costs after decrypting its result: give the
            # last round's telemetry a moment to arrive before we go.
            rnd, people = self._last_participants
            self._pump(stop, until=lambda: all((rnd, a) in self._telemetry_seen for a in people),
                       timeout=self.cfg.telemetry_linger_s)
        self.telemetry.close()
        log.info("aggregator done after %d training round(s)", self.rounds_done)

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
        self.store.add_chunk(env, msg.payload)

    def _resume(self) -> bool:
        """Pick up the round that was open when this process died (``kill -9``): its
        state, its running sum, and the chunks of unfinished uploads. Agents that had
        finished are not asked again; the others are asked for what is missing."""
        saved = self.store.load()
        if saved is None:
            return False
        st, layout, blob = saved
        if st.round < self.next_round:  # it closed; we died before forgetting it
            self.store.close()
            return False
        self.state = st
        self.n_encrypted = layout.get("n_encrypted")
        self.code_layout = [tuple(x) for x in layout["code_layout"]] if layout.get("code_layout") else None
        quantized = self.protection.scheme != "ckks" and st.purpose == "train"
        self.sum = self._stored_sum(blob) if blob else \
            RoundSum(quantized=quantized, ckks=self.ctx, bfv=self.bfv_ctx)
        self.bytes_received, self.agg_s = 0, 0.0
        restored = 0
        complete: list[Completed] = []
        for env in self.store.chunk_envelopes():
            if env.round != st.round:
                continue  # parked while we were down, but for a round that is over
            try:
                done = self.chunks.add(env, stored=True)
                restored += 1
            except wire.WireError:
                continue
            if done is not None:  # every chunk had arrived; we died before folding it
                complete.append(done)
        while complete:
            sender, rnd = complete[0].sender, complete[0].round
            try:
                self._fold(complete.pop(0))
            except (ValueError, Rejected, he.HEError) as exc:
                log.warning("rejected %s's restored round-%d update: %s", sender, rnd, exc)
        log.info("resumed round %d after a restart: %d update(s) already folded %s, %d chunk(s) of unfinished "
                 "uploads restored", st.round, len(st.weights), sorted(st.weights), restored)
        for agent in sorted(st.selected - st.weights.keys()):
            self._ask_for_missing(agent)
        return True

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

    def _stored_sum(self, meta: bytes) -> RoundSum:
        return RoundSum.from_stored(meta, self.store.sum_ciphertexts(), ckks=self.ctx, bfv=self.bfv_ctx)

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

    # ------------------------------------------------------------------ inbound
    def dispatch(self, msg: Inbound) -> None:
        try:
            info = topics.parse(msg.topic)
            if msg.payload == b"":
                return  # a retained message being cleared
            env = wire.decode_envelope(msg.payload, max_bytes=self.cfg.max_message_bytes)
            wire.check_against_topic(env, info, task=self.task)
            handler = {"update": self._on_update_chunk, "status": self._on_status,
                       "public_context": self._on_public_context, "telemetry": self._on_telemetry}.get(info.family)
            if handler is None:
                raise wire.WireError(f"aggregator does not consume {info.family} messages")
            self._inbound_bytes = len(msg.payload)
            handler(env)
        except (ValueError, Rejected, he.HEError) as exc:  # WireError is a ValueError
            self.metrics.rejected.inc()
            log.warning("rejected %s: %s", msg.topic, exc)

    def _on_telemetry(self, env: wire.Envelope) -> None:
        tele: wire.Telemetry = wire.decode_body(env.kind, env.body)
        self.telemetry.record(env.round, env.sender, tele)
        self._telemetry_seen.add((env.round, env.sender))
        self.metrics.telemetry(env.sender, tele)

    def _on_public_context(self, env: wire.Envelope) -> None:
        done = self._context_chunks.add(env)
        if done is None:
            return
        body: wire.PublicContext = wire.decode_body(done.kind, done.body)
        ctx = he.load_context(body.context)
        bfv = he.load_context(body.bfv_context) if body.bfv_context else None
        if ctx.is_private() or (bfv is not None and bfv.is_private()):
            # Refuse to hold a secret key even if someone publishes one.
            raise wire.WireError("the 'public' context carries a secret key; refusing it")
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
                        and env.sender not in st.weights:
                    # It reconnected (or restarted: then no last will reached us) mid-round: resume its upload.
                    self._ask_for_missing(env.sender)
        else:
            self.online.discard(env.sender)
            self.gone.add(env.sender)
            if self.state:
                self.state.mark_offline(env.sender, time.time())
        self.metrics.agents_online.set(len(self.online))
        log.info("agent %s is %s (%d online)", env.sender, body.state, len(self.online))

    def _on_update_chunk(self, env: wire.Envelope) -> None:
        st = self.state
        if st is None or env.round != st.round:
            raise Rejected(f"chunk for round {env.round}, which is not open")
        st.check(env.sender, time.time())
        done = self.chunks.add(env)
        self.telemetry.add_upload(env.round, env.sender, self._inbound_bytes)
        self.metrics.update_bytes.inc(self._inbound_bytes)
        if done is not None:
            self._fold(done)

    def _fold(self, done: Completed) -> None:
        """Verify a whole update and fold it into the running sum (one transaction)."""
        st, env = self.state, done.envelope
        nbytes, parts = done.size, done.parts
        limit = self.cfg.max_update_bytes
        streamed = not self.sum.quantized
        if streamed:  # CKKS: validated, then folded ciphertext by ciphertext straight off disk
            update, count = update_stream.read_update(parts, limit)
        else:  # quantized updates are small (a few bytes per parameter): decoded whole
            update = wire.decode_body("update", b"".join(parts()))
        if update.num_samples > self.cfg.max_samples_per_agent:
            raise Rejected(f"{env.sender} declares {update.num_samples} samples, over the "
                           f"max_samples_per_agent bound of {self.cfg.max_samples_per_agent}")
        plain = self._check_layout(st, update)
        t0 = time.perf_counter()
        try:
            if streamed:
                self.sum.fold_stream(update, count, update_stream.iter_ciphertexts(parts, limit), plain)
            else:
                self.sum.fold(update, plain, consume=True)
        except (he.HEError, wire.WireError):
            if self.sum.corrupt:  # half-added: back to the sum as last committed
                saved = self.store.load()
                self.sum = self._stored_sum(saved[2]) if saved and saved[2] \
                    else RoundSum(quantized=self.sum.quantized, ckks=self.ctx, bfv=self.bfv_ctx)
            raise
        st.record(env.sender, update.num_samples, time.time())
        self.code_layout = [(len(c) // w, w) for c, w in zip(update.codes, update.code_widths)]
        self.store.fold(st, {"n_encrypted": update.n_encrypted, "code_layout": self.code_layout},
                        self.sum.meta_bytes(), self.sum.serialized_ciphertexts())
        self.agg_s += time.perf_counter() - t0
        self.n_params, self.n_encrypted = update.n_params, update.n_encrypted
        if st.purpose == "train" and self.mask_digest is None and update.mask_digest is not None:
            self.mask_digest = update.mask_digest
            log.info("task mask fixed by the first verified update: digest %s", update.mask_digest.hex()[:16])
        self.bytes_received += nbytes
        self.metrics.updates.inc()
        log.info("round %d: folded %s's update (%d samples, %d bytes); %d/%d reported",
                 st.round, env.sender, update.num_samples, nbytes, len(st.weights), len(st.selected))

    def _clear_retained(self, keep_from: int) -> None:
        """Drop the retained start/result/closed messages of old rounds from the broker,
        keeping the last two rounds (agents rebuild from them) and the mask-agreement
        round (late joiners derive the mask from it)."""
        for rnd in [r for r in self._retained if r < keep_from and r != self.mask_round]:
            for seq in range(self._retained.pop(rnd)):
                self.session.delete_retained(topics.round_result(self.task, rnd, seq))
            self.session.delete_retained(topics.round_start(self.task, rnd))
            self.session.delete_retained(topics.round_closed(self.task, rnd))

    def _check_layout(self, st: RoundState, update: wire.Update) -> np.ndarray:
        """Reject an update whose packing or mask does not fit the task; returns its plaintext part."""
        if self.n_params is not None and update.n_params != self.n_params:
            raise Rejected(f"update packs {update.n_params} parameters; the model has {self.n_params}")
        if update.n_encrypted > update.n_params:
            raise Rejected(f"{update.n_encrypted} encrypted values exceed the {update.n_params} parameters")
        prot = self.protection
        if st.purpose == "sensitivity":
            if update.n_encrypted != update.n_params:
                raise Rejected("a sensitivity map must travel fully encrypted")
        elif prot.scheme != "ckks":
            self._check_quantized_layout(update)
            return np.zeros(0)
        else:
            if prot.p in (0.0, 1.0) and update.n_encrypted != round(prot.p * update.n_params):
                raise Rejected(f"{update.n_encrypted} encrypted values where p={prot.p} means "
                               f"{round(prot.p * update.n_params)}")
            if self.mask_digest is not None and update.mask_digest != self.mask_digest:
                got = update.mask_digest.hex()[:16] if update.mask_digest else "none"
                raise Rejected(f"mask digest {got} differs from the task's mask {self.mask_digest.hex()[:16]}")
            if update.plain_dtype != prot.plain_dtype:
                raise Rejected(f"plaintext part is {update.plain_dtype}; the task sends {prot.plain_dtype}")
        if self.n_encrypted is not None and update.n_encrypted != self.n_encrypted:
            raise Rejected(f"{update.n_encrypted} encrypted values; this round's updates have {self.n_encrypted}")
        dtype = np.dtype(update.plain_dtype).newbyteorder("<")
        expected = (update.n_params - update.n_encrypted) * dtype.itemsize
        if len(update.plain) != expected:
            raise Rejected(f"wrong packing length: plaintext part has {len(update.plain)} bytes, "
                           f"expected {expected}")
        plain = np.frombuffer(update.plain, dtype=dtype)
        if not np.isfinite(plain).all():
            raise Rejected("plaintext part holds NaN or infinity")
        return plain

    def _check_quantized_layout(self, update: wire.Update) -> None:
        """Integer codes: segments consistent with the round's first update, nothing in float."""
        prot = self.protection
        if update.plain:
            raise Rejected("a quantized update carries no float part")
        if prot.scheme == "quantize" and (update.n_encrypted or update.ciphertexts):
            raise Rejected("scheme 'quantize' sends no ciphertexts")
        if prot.scheme == "quantize+he" and self.bfv_ctx is None:
            raise Rejected("no BFV parameters from the key authority yet")
        if len(update.codes) != len(update.code_widths):
            raise Rejected(f"{len(update.codes)} code segments but {len(update.code_widths)} widths")
        lengths = []
        for seg, width in zip(update.codes, update.code_widths):
            if len(seg) % width:
                raise Rejected(f"a segment of {len(seg)} bytes is not a whole number of {width}-byte codes")
            lengths.append((len(seg) // width, width))
        if sum(n for n, _ in lengths) + update.n_encrypted != update.n_params:
            raise Rejected(f"wrong packing length: {sum(n for n, _ in lengths)} plain codes + "
                           f"{update.n_encrypted} encrypted != {update.n_params} parameters")
        if self.code_layout is not None and lengths != self.code_layout:
            raise Rejected("code segments differ from this round's other updates")

    # ------------------------------------------------------------------ rounds
    def _open_round(self, purpose: str = "train") -> None:
        rnd = self.next_round
        cap = self.cfg.max_agents
        if self.protection.scheme != "ckks" and self.max_summands:
            cap = min(cap, self.max_summands)  # more would overflow the plan's integer lanes
        selected = self._select(sorted(self.online), cap, rnd)
        quorum = min(self.cfg.min_agents, len(selected))
        deadline = time.time() + self.cfg.round_timeout_s
        self._round_opened = time.monotonic()
        self.state = RoundState(rnd, self.model_version, frozenset(selected), quorum, deadline, purpose=purpose,
                                offline_grace_s=self.cfg.offline_grace_s)
        self.n_encrypted, self.code_layout, self.bytes_received, self.agg_s = None, None, 0, 0.0
        self.sum = RoundSum(quantized=self.protection.scheme != "ckks" and purpose == "train",
                            ckks=self.ctx, bfv=self.bfv_ctx)
        start = wire.RoundStart(model_version=self.model_version, deadline=deadline, selected=selected,
                                quorum=quorum, purpose=purpose, protection=self.protection,
                                mask_round=self.mask_round, mask_digest=self.mask_digest)
        self.store.open(self.state)
        self.session.send(topics.round_start(self.task, rnd), start, task=self.task, rnd=rnd, retain=True)
        log.info("round %d (%s) open: %d agents selected, quorum %d, deadline in %.0fs, p=%s",
                 rnd, purpose, len(selected), quorum, self.cfg.round_timeout_s, self.protection.p)

    def _close_round(self, decision: Decision) -> Outcome:
        st = self.state
        st.closed = True
        dropped_partials = self.chunks.discard(keep=lambda key: key[1] > st.round)
        participants = sorted(st.weights)
        chunks = 0
        result = None
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
        closed = wire.RoundClosed(status=decision.outcome.value, participants=participants, dropped=st.dropped,
                                  reason=decision.reason, total_weight=min(st.total_weight, 1 << 62),
                                  bytes_received=self.bytes_received, agg_s=self.agg_s)
        self.session.send(topics.round_closed(self.task, st.round), closed, task=self.task, rnd=st.round,
                          retain=True)
        self._retained[st.round] = chunks
        self._clear_retained(keep_from=st.round - 1)
        log.info("round %d %s: %s; participants %s, dropped %s, %d partial upload(s) discarded, agg %.3fs",
                 st.round, decision.outcome.value, decision.reason, participants, st.dropped,
                 dropped_partials, self.agg_s)
        self.metrics.rounds.labels(decision.outcome.value).inc()
        self.metrics.round_seconds.observe(time.monotonic() - self._round_opened)
        self.metrics.participants.set(len(participants))
        self._last_participants = (st.round, participants)
        self.sum = None  # free the sums: O(model) memory per open round only
        self.next_round = st.round + 1
        if st.purpose == "train":
            self.rounds_done += 1
        elif decision.outcome is Outcome.AGGREGATE:
            self.mask_round = st.round
        self._persist()
        self.store.close()
        return decision.outcome


def _is_update(topic: str) -> bool:
    try:
        return topics.parse(topic).family == "update"
    except ValueError:
        return False


def _protection_key(prot: wire.Protection) -> list:
    return [prot.scheme, prot.p, prot.mode, prot.include_first_last, prot.seed, prot.plain_dtype]


def run(cfg: AggregatorConfig) -> None:
    stop = stop_event()
    agg = Aggregator(cfg)
    try:
        agg.run(stop)
    finally:
        agg.session.close()
