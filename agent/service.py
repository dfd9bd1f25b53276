"""The agent daemon: enroll, wait for rounds, train, encrypt, upload, decrypt results.

It keeps its place across rounds with the model version carried by each round
start: a start whose base model has not arrived yet is parked until the result it
builds on is decrypted, so no round ever trains from the wrong weights.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import threading
import time
from pathlib import Path

import numpy as np

from fedmq import he, masking, protection, topics, wire
from fedmq.chunking import Reassembler, single
from fedmq.config import AgentConfig
from fedmq.mqtt_session import BrokerError, Inbound, MqttSession
from fedmq.quantization import QuantPlan
from fedmq.sealing import SealedBox, agent_box_info, enrollment_proof, new_keypair, open_box
from fedmq.telemetry import PhaseClock
from fedmq.signals import stop_event

log = logging.getLogger("fedmq.agent")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class EnrollmentRefused(RuntimeError):
    pass


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.id = cfg.agent_id
        self.task = cfg.task
        offline = wire.encode_envelope(single(wire.AgentStatus(state="offline"), task=self.task, rnd=0, sender=self.id))
        self.session = MqttSession(cfg.broker, self.id, will=(topics.agent_status(self.id), offline))
        self.chunks = Reassembler(max_stream_bytes=1 << 34)
        self.ctx = None
        self.bfv = None
        self.plan: QuantPlan | None = None
        self._rng = np.random.default_rng()  # stochastic rounding
        self._x25519, self._x25519_public = new_keypair()
        self._pending_nonces: set[bytes] = set()
        self.trainer = None
        self.models: dict[int, np.ndarray] = {}  # model version -> global weights
        self.latest_version = -1
        self.parked: tuple[int, wire.RoundStart] | None = None
        self.sensitivity: dict[int, np.ndarray] = {}  # sensitivity round -> decrypted aggregate map
        self.masks: dict[bytes, np.ndarray] = {}  # mask digest -> mask
        self.clipped: dict[int, int] = {}  # round -> values clipped to the quantization plan
        # round -> (encoded update, chunk size), kept until the round's result: the
        # aggregator may ask for chunks it lacks after its restart or our reconnect.
        self.uploads: dict[int, tuple[tuple[str, bytes], int]] = {}
        self.handled_rounds: set[int] = set()
        self.clocks: dict[int, PhaseClock] = {}
        self.sent_bytes: dict[int, int] = {}
        self.last_accuracy: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        s = self.session
        s.subscribe(topics.own_keys(self.task, self.id))
        s.connect()
        self._enroll(stop)
        if stop.is_set():
            return
        s.subscribe(topics.all_round_starts(self.task))
        s.subscribe(topics.all_results(self.task))
        s.subscribe(topics.own_resends(self.task, self.id))
        s.subscribe(topics.all_round_closed(self.task))
        self._announce_online()
        s.on_reconnect = self._announce_online
        log.info("%s online and waiting for rounds of task %s", self.id, self.task)
        while not stop.is_set():
            try:
                msg = s.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.dispatch(msg)

    def _announce_online(self) -> None:
        """Retained 'online' — again after every reconnect, since the broker published
        our last will ('offline') when the connection dropped."""
        self.session.send(topics.agent_status(self.id), wire.AgentStatus(state="online"), task=self.task, rnd=0,
                          retain=True)

    def stop(self) -> None:
        """Clean shutdown: say offline ourselves (the last will covers crashes)."""
        try:
            self.session.send(topics.agent_status(self.id), wire.AgentStatus(state="offline"),
                              task=self.task, rnd=0, retain=True).wait_for_publish(2)
        except Exception as exc:  # best effort on the way out
            log.debug("could not publish offline status: %s", exc)
        self.session.close()

    # ------------------------------------------------------------------ enrollment
    def _enroll(self, stop: threading.Event) -> None:
        credential = self.cfg.credential.get_secret_value()
        while self.ctx is None and not stop.is_set():
            nonce = os.urandom(16)
            self._pending_nonces.add(nonce)
            proof = enrollment_proof(credential, self.task, self.id, self._x25519_public, nonce)
            self.session.send(topics.enroll(self.task, self.id),
                              wire.EnrollRequest(public_key=self._x25519_public, nonce=nonce, proof=proof),
                              task=self.task, rnd=0)
            log.info("%s: enrollment requested", self.id)
            end = time.monotonic() + self.cfg.enroll_retry_s
            while self.ctx is None and time.monotonic() < end and not stop.is_set():
                try:
                    self.dispatch(self.session.inbox.get(timeout=0.2), raise_refusal=True)
                except queue.Empty:
                    pass

    def _on_key(self, env: wire.Envelope, raise_refusal: bool) -> None:
        if env.kind == "key_refused":
            body: wire.KeyRefused = wire.decode_body(env.kind, env.body)
            if body.request_nonce in self._pending_nonces and raise_refusal:
                raise EnrollmentRefused(f"key authority refused enrollment of {self.id!r}: {body.reason}")
            return
        done = self.chunks.add(env)
        if done is None:
            return
        grant: wire.KeyGrant = wire.decode_body(done.kind, done.body)
        if grant.request_nonce not in self._pending_nonces:
            raise wire.WireError("key grant answers no request of ours (replayed?)")
        box = SealedBox(grant.ephemeral_key, grant.aead_nonce, grant.sealed_context)
        try:
            secret = open_box(self._x25519, box, agent_box_info(self.task, self.id))
        except Exception:
            raise wire.WireError("key grant does not open with our key: not sealed to us") from None
        keys: wire.SealedKeys = wire.decode_body("sealed_keys", secret)
        del secret
        ctx = he.load_context(keys.ckks)
        if not ctx.is_private():
            raise wire.WireError("key grant holds no secret key")
        self.bfv = he.load_context(keys.bfv) if keys.bfv else None
        self.plan = QuantPlan.from_wire(keys.plan) if keys.plan else None
        self.ctx = ctx
        self._pending_nonces.clear()
        log.info("%s: enrolled; secret CKKS context received sealed (%s)", self.id, he.params_of(ctx))

    # ------------------------------------------------------------------ inbound
    def dispatch(self, msg: Inbound, raise_refusal: bool = False) -> None:
        try:
            if msg.payload == b"":
                return  # a retained message being cleared
            info = topics.parse(msg.topic)
            env = wire.decode_envelope(msg.payload, max_bytes=MAX_MESSAGE_BYTES)
            wire.check_against_topic(env, info, task=self.task)
            if info.family == "key":
                if info.agent != self.id:
                    raise wire.WireError("key message for another agent")
                self._on_key(env, raise_refusal)
            elif info.family == "round_start":
                self._on_round_start(env)
            elif info.family == "result":
                self._on_result_chunk(env)
            elif info.family == "round_closed":
                self._on_round_closed(env)
            elif info.family == "resend":
                if info.agent != self.id:
                    raise wire.WireError("resend request for another agent")
                self._on_resend(env)
            else:
                raise wire.WireError(f"agent does not consume {info.family} messages")
        except (ValueError, he.HEError) as exc:
            log.warning("%s rejected %s: %s", self.id, msg.topic, exc)

    def _on_round_start(self, env: wire.Envelope) -> None:
        start: wire.RoundStart = wire.decode_body(env.kind, env.body)
        rnd = env.round
        if rnd in self.handled_rounds or rnd <= self.latest_version:
            return  # a retained start we have already dealt with
        if self.id not in start.selected:
            log.info("%s: not selected for round %d", self.id, rnd)
            self.handled_rounds.add(rnd)
            self._mask_for(start)  # still learn the mask, to rebuild the model from the result
            return
        if time.time() > start.deadline:
            log.info("%s: round %d is past its deadline; skipping", self.id, rnd)
            self.handled_rounds.add(rnd)
            return
        if not self._ready_for(start):
            log.info("%s: round %d waits for model %d / mask round %d", self.id, rnd,
                     start.model_version, start.mask_round)
            self.parked = (rnd, start)
            return
        self._run_round(rnd, start)

    def _ready_for(self, start: wire.RoundStart) -> bool:
        has_model = start.model_version == 0 or start.model_version in self.models
        has_mask = start.purpose == "sensitivity" or self._mask_for(start) is not None
        return has_model and has_mask

    def _run_round(self, rnd: int, start: wire.RoundStart) -> None:
        self.handled_rounds.add(rnd)
        try:
            if start.purpose == "sensitivity":
                self._send_sensitivity(rnd, start)
            else:
                self._participate(rnd, start)
        except Exception as exc:  # one failed round must not kill the daemon
            log.exception("%s: round %d failed: %s", self.id, rnd, exc)

    def _on_result_chunk(self, env: wire.Envelope) -> None:
        if env.round <= self.latest_version or env.round in self.sensitivity:
            return
        done = self.chunks.add(env)
        if done is None:
            return
        result: wire.Result = wire.decode_body(done.kind, done.body)
        rnd = env.round
        clock = self.clocks.setdefault(rnd, PhaseClock())
        trainer = self._trainer()
        accuracy = None
        mask = self._mask_of_result(result)
        with clock.phase("decrypt"):
            if result.scheme != "ckks":
                weights = protection.rebuild_quantized(self.bfv, self.plan, result, mask, trainer.layer_sizes(),
                                                       self._base_weights(result.base_version))
            else:
                weights = protection.rebuild_ckks(self.ctx, result, mask)
        if result.purpose == "sensitivity":
            self.sensitivity[rnd] = weights
            log.info("%s: aggregated sensitivity map of round %d decrypted (%d agents)",
                     self.id, rnd, len(result.participants))
        else:
            with clock.phase("evaluate"):
                accuracy = trainer.evaluate(weights)
            self._adopt(rnd, weights, accuracy, result)
        self._publish_telemetry(rnd, clock, accuracy, len(done.body))
        self._settle_upload(rnd, result.participants, "aggregated", f"{len(result.participants)} agents made it")
        for old in [r for r in self.uploads if r < rnd]:
            del self.uploads[old]
        self.chunks.discard(keep=lambda key: key[0] != "result" or key[1] >= rnd)
        if self.parked and self._ready_for(self.parked[1]):
            prnd, start = self.parked
            self.parked = None
            self._run_round(prnd, start)

    def _adopt(self, rnd: int, weights: np.ndarray, accuracy: float, result: wire.Result) -> None:
        self.models = {rnd: weights}
        self.latest_version = rnd
        self.last_accuracy = accuracy
        log.info("%s: round %d result from %d agents decrypted; test accuracy %.4f",
                 self.id, rnd, len(result.participants), accuracy)

    def _on_round_closed(self, env: wire.Envelope) -> None:
        """A round closed without our update (we were late, or it was aborted): say so
        and let the kept upload go — it contributes to nothing."""
        closed: wire.RoundClosed = wire.decode_body(env.kind, env.body)
        self._settle_upload(env.round, closed.participants, closed.status, closed.reason)

    def _settle_upload(self, rnd: int, participants: list[str], status: str, reason: str) -> None:
        """The round is over: forget the kept upload, and say so if it did not count."""
        if self.uploads.pop(rnd, None) is not None and self.id not in participants:
            log.warning("%s: round %d %s without my update (%s); it contributes nothing", self.id, rnd, status,
                        reason)

    def _on_resend(self, env: wire.Envelope) -> None:
        req: wire.ResendRequest = wire.decode_body(env.kind, env.body)
        kept = self.uploads.get(env.round)
        if kept is None:
            log.info("%s: aggregator asks for round %d chunks, but no upload of that round is kept", self.id,
                     env.round)
            return
        encoded, chunk_size = kept
        only = set(req.missing) or None
        sent, chunks = self.session.send_stream(
            lambda seq: topics.update_chunk(self.task, env.round, self.id, seq), None, task=self.task,
            rnd=env.round, chunk_size=chunk_size, encoded=encoded, only=only)
        log.info("%s: resent %d chunk(s) (%d bytes) of round %d at the aggregator's request", self.id, chunks, sent,
                 env.round)

    def _mask_of_result(self, result: wire.Result) -> np.ndarray:
        if result.n_encrypted in (0, result.n_params):
            return np.full(result.n_params, result.n_encrypted == result.n_params)
        mask = self.masks.get(result.mask_digest or b"")
        if mask is None:
            raise wire.WireError("result was split by a mask this agent cannot derive")
        return mask

    def _mask_for(self, start: wire.RoundStart) -> np.ndarray | None:
        """This task's mask, or None while the agreement it depends on is pending."""
        prot = start.protection
        trainer = self._trainer()
        n = trainer.n_params
        mask = masking.full_mask(n, 0.0 if prot.scheme == "quantize" else prot.p)
        if mask is not None:
            return mask
        forced = masking.first_last_layers(trainer.layer_sizes()) if prot.include_first_last else None
        if prot.mode == "random":
            mask = masking.random_mask(n, prot.p, prot.seed, forced)
        else:
            scores = self.sensitivity.get(start.mask_round)
            if scores is None:
                return None
            mask = masking.top_p_mask(scores, prot.p, forced)
        self.masks.setdefault(masking.mask_digest(mask), mask)
        return mask

    # ------------------------------------------------------------------ a round
    def _trainer(self):
        if self.trainer is None:
            from agent.training import DigitsTrainer  # torch only once there is work

            c = self.cfg
            self.trainer = DigitsTrainer(c.model, c.data, c.train)
        return self.trainer

    def _base_weights(self, version: int) -> np.ndarray:
        if version == 0:
            return self._trainer().initial_weights()
        return self.models[version]

    def _participate(self, rnd: int, start: wire.RoundStart) -> None:
        clock = self.clocks.setdefault(rnd, PhaseClock())
        trainer = self._trainer()
        base = self._base_weights(start.model_version)
        prot = start.protection
        mask = self._mask_for(start)
        digest = masking.mask_digest(mask) if 0 < mask.sum() < mask.size else None
        if start.mask_digest is not None and digest != start.mask_digest:
            log.error("%s: my mask (digest %s) differs from the task's (%s); not uploading a round-%d update "
                      "that would be rejected", self.id, digest.hex()[:16] if digest else None,
                      start.mask_digest.hex()[:16], rnd)
            return
        with clock.phase("train"):
            weights = trainer.train(base, rnd)
        n = trainer.num_samples
        if self.cfg.faults.oracle_dir is not None:
            self._dump_oracle(f"round{rnd}", weights=weights, num_samples=n, mask=mask, base=base)
        if prot.scheme != "ckks":
            if self.plan is None:
                raise he.HEError("the task quantizes but the key authority sent no quantization plan")
            with clock.phase("encrypt"):  # quantize, and BFV-encrypt the selected codes
                update, clipped = protection.protect_quantized(
                    self.bfv, self.plan, weights - base, n, mask, trainer.layer_sizes(), self._rng,
                    len(start.selected), digest)
            self.clipped[rnd] = clipped
            if clipped:
                log.warning("%s: round %d clipped %d of %d values to the plan's ranges",
                            self.id, rnd, clipped, weights.size)
        else:
            with clock.phase("encrypt"):
                update = protection.protect_ckks(self.ctx, weights, n, mask, prot.plain_dtype,
                                                 len(start.selected), digest)
        self._upload(rnd, clock, update)

    def _send_sensitivity(self, rnd: int, start: wire.RoundStart) -> None:
        """Step 1 of the mask agreement: our sensitivity map, encrypted, weighted by our samples."""
        clock = self.clocks.setdefault(rnd, PhaseClock())
        trainer = self._trainer()
        base = self._base_weights(start.model_version)
        with clock.phase("sensitivity"):
            scores = trainer.sensitivity(base, self.cfg.train.sensitivity_samples)
        n = trainer.num_samples
        if self.cfg.faults.oracle_dir is not None:
            self._dump_oracle(f"round{rnd}-sensitivity", scores=scores, num_samples=n)
        with clock.phase("encrypt"):
            update = protection.protect_ckks(self.ctx, scores, n, np.ones(scores.size, dtype=bool), "float32",
                                             len(start.selected), None)
        self._upload(rnd, clock, update)

    def _upload(self, rnd: int, clock: PhaseClock, update: wire.Update) -> None:
        with clock.phase("serialize"):
            encoded = wire.encode_body(update)
        self.uploads[rnd] = (encoded, self.cfg.chunk_size)
        with clock.phase("upload"):
            try:
                sent, _ = self.session.send_stream(
                    lambda seq: topics.update_chunk(self.task, rnd, self.id, seq), None, task=self.task, rnd=rnd,
                    chunk_size=self.cfg.chunk_size, delay_s=self.cfg.faults.chunk_delay_s, encoded=encoded)
            except BrokerError as exc:
                # The update is kept: once we are back, the aggregator asks for what it lacks.
                log.warning("%s: round %d upload interrupted (%s); kept for resumption", self.id, rnd, exc)
                return
        self.sent_bytes[rnd] = sent
        log.info("%s: round %d update sent: %d samples, %d/%d values encrypted in %d ciphertexts, %d bytes",
                 self.id, rnd, update.num_samples, update.n_encrypted, update.n_params,
                 len(update.ciphertexts), sent)

    def _dump_oracle(self, name: str, **arrays) -> None:
        """Test-only: what we protected, in the clear, for checking encrypted aggregates exactly."""
        out = Path(self.cfg.faults.oracle_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"{self.id}-{name}.npz", **arrays)

    def _publish_telemetry(self, rnd: int, clock: PhaseClock, accuracy: float | None, received: int) -> None:
        peak = max(clock.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        tele = wire.Telemetry(phases=clock.phases, bytes_sent=self.sent_bytes.pop(rnd, 0), bytes_received=received,
                              peak_rss=peak, num_samples=self._trainer().num_samples, accuracy=accuracy,
                              clipped=self.clipped.pop(rnd, 0))
        self.session.send(topics.telemetry(self.id), tele, task=self.task, rnd=rnd)
        self.clocks.pop(rnd, None)


def run(cfg: AgentConfig) -> int:
    stop = stop_event()
    agent = Agent(cfg)
    try:
        agent.run(stop)
    except EnrollmentRefused as exc:
        log.error("%s", exc)
        agent.session.close()
        return 2
    agent.stop()
    return 0
