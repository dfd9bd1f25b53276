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
import psutil

from fedmq.privacy import he, masking, protection
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import Reassembler, single
from fedmq.runtime import config as cfgmod
from fedmq.runtime.config import AgentConfig
from fedmq.runtime.mqtt_session import BrokerError, Inbound, MqttSession
from fedmq.privacy.quantization import QuantPlan
from fedmq.privacy.sealing import SealedBox, agent_box_info, enrollment_proof, new_keypair, open_box
from fedmq.runtime.telemetry import PhaseClock
from fedmq.runtime.private_files import ensure_private_dir, write_private
from fedmq.runtime.sd_notify import Notifier
from fedmq.runtime.signals import reload_event, stop_event

from agent.kept_uploads import KeptUploads

log = logging.getLogger("fedmq.agent")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_WAITING_BEFORE_KEYS = 64 * 1024 * 1024  # bytes of round traffic held until enrolled
KEEP_STARTS = 16  # round starts remembered, to check results against


class EnrollmentRefused(RuntimeError):
    pass


class StateDirTaken(RuntimeError):
    """The configured state directory belongs to another agent id."""


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = Notifier()
        self._heartbeat = time.monotonic()
        self._busy_until: float | None = None
        self.id = cfg.agent_id
        self.task = cfg.task
        offline = wire.encode_envelope(single(wire.AgentStatus(state="offline"), task=self.task, rnd=0, sender=self.id))
        self.session = MqttSession(cfg.broker, self.id, will=(topics.agent_status(self.id), offline))
        self.chunks = Reassembler(max_stream_bytes=1 << 34)
        self._keys: wire.SealedKeys | None = None  # as granted; HE contexts are built on first use
        self._ctx = None
        self._bfv = None
        self.plan: QuantPlan | None = None
        self._rng = np.random.default_rng()  # stochastic rounding
        self._x25519, self._x25519_public = new_keypair()
        self._pending_nonces: set[bytes] = set()
        # Round traffic that arrives before our keys (a persistent session of a wiped
        # device, retained starts): it waits here until enrollment is done.
        self._before_keys: list[Inbound] = []
        self.seen_starts: dict[int, wire.RoundStart] = {}  # round -> its start, as received
        # A result whose start has not arrived yet (brokers may reorder retained
        # messages across subscriptions): held, and handled when its start arrives.
        self._early_results: dict[int, tuple[wire.Envelope, wire.Result, int]] = {}
        self.trainer = None
        self.models: dict[int, np.ndarray] = {}  # model version -> global weights
        self.latest_version = -1
        self.parked: tuple[int, wire.RoundStart] | None = None
        self.sensitivity: dict[int, np.ndarray] = {}  # sensitivity round -> decrypted aggregate map
        self.masks: dict[bytes, np.ndarray] = {}  # mask digest -> mask
        self.clipped: dict[int, int] = {}  # round -> values clipped to the quantization plan
        # Encoded updates kept on disk until the round's result: the aggregator may ask
        # for chunks it lacks after its restart, our reconnect or our restart.
        self.uploads = KeptUploads(Path(cfg.state_dir))
        self._stop = threading.Event()
        self.handled_rounds: set[int] = set()
        self.clocks: dict[int, PhaseClock] = {}
        self.sent_bytes: dict[int, int] = {}
        self.last_accuracy: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event | None = None, reload: threading.Event | None = None) -> None:
        stop = self._stop = stop or threading.Event()
        s = self.session
        ensure_private_dir(Path(self.cfg.state_dir))
        self._claim_state_dir()
        self._load_state()
        s.subscribe(topics.own_keys(self.task, self.id))
        s.connect()
        self.notifier.status("enrolling")
        self._enroll(stop)
        if stop.is_set():
            return
        s.subscribe(topics.all_round_starts(self.task))
        s.subscribe(topics.all_results(self.task))
        s.subscribe(topics.own_resends(self.task, self.id))
        s.subscribe(topics.all_round_closed(self.task))
        s.subscribe(topics.roll_call(self.task))
        self._announce_online()
        s.on_reconnect = self._announce_online
        waiting, self._before_keys = self._before_keys, []
        for msg in waiting:
            self.dispatch(msg)
        log.info("%s online and waiting for rounds of task %s", self.id, self.task)
        self.notifier.ready(f"online; waiting for rounds of task {self.task}")
        self.notifier.start_watchdog(self._alive, stop)
        while not stop.is_set():
            self._heartbeat = time.monotonic()
            if reload is not None and reload.is_set():
                reload.clear()
                self.reload()
            try:
                msg = s.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.dispatch(msg)
        self.notifier.stopping()

    def _alive(self) -> bool:
        """For the systemd watchdog: the main loop turns over, or a round is being
        worked on within its deadline (training a big model can take minutes)."""
        if time.monotonic() - self._heartbeat < 30:
            return True
        return self._busy_until is not None and time.time() < self._busy_until

    def reload(self) -> None:
        """SIGHUP: re-read the YAML. Training, chunking, profile and fault settings
        apply from the next round; identity and broker changes need a restart."""
        if self.config_path is None:
            log.warning("%s: SIGHUP, but no config file to reload", self.id)
            return
        self.notifier.reloading()
        try:
            new = cfgmod.apply_profile(cfgmod.load(AgentConfig, self.config_path))
        except cfgmod.ConfigError as exc:
            log.error("%s: reload failed, keeping the running configuration:\n%s", self.id, exc)
            self.notifier.ready("reload failed; running configuration kept")
            return
        fixed = [k for k in ("agent_id", "credential", "task", "broker", "state_dir") if getattr(new, k) != getattr(
            self.cfg, k)]
        if fixed:
            log.warning("%s: %s changed in %s; that takes a restart (systemctl restart)", self.id,
                        ", ".join(fixed), self.config_path)
            new = new.model_copy(update={k: getattr(self.cfg, k) for k in fixed})
        self.cfg = new
        self.trainer = None  # rebuilt with the new settings at the next round
        log.info("%s: configuration reloaded from %s", self.id, self.config_path)
        self.notifier.ready(f"online; configuration reloaded; waiting for rounds of task {self.task}")

    def _announce_online(self) -> None:
        """Retained 'online' — again after every reconnect, since the broker published
        our last will ('offline') when the connection dropped."""
        self.session.send(topics.agent_status(self.id), wire.AgentStatus(state="online"), task=self.task, rnd=0,
                          retain=True)

    def stop(self) -> None:
        """Clean shutdown: say offline ourselves (the last will covers crashes). With
        the broker away there is nobody to tell: the last will speaks for us."""
        if not self.session.connected:
            self.session.close()
            return
        try:
            self.session.send(topics.agent_status(self.id), wire.AgentStatus(state="offline"),
                              task=self.task, rnd=0, retain=True).wait_for_publish(2)
        except Exception as exc:  # best effort on the way out
            log.debug("could not publish offline status: %s", exc)
        self.session.close()

    # ------------------------------------------------------------------ enrollment
    def _enroll(self, stop: threading.Event) -> None:
        credential = self.cfg.credential.get_secret_value()
        while self._keys is None and not stop.is_set():
            nonce = os.urandom(16)
            self._pending_nonces.add(nonce)
            proof = enrollment_proof(credential, self.task, self.id, self._x25519_public, nonce)
            self.session.send(topics.enroll(self.task, self.id),
                              wire.EnrollRequest(public_key=self._x25519_public, nonce=nonce, proof=proof),
                              task=self.task, rnd=0)
            log.info("%s: enrollment requested", self.id)
            end = time.monotonic() + self.cfg.enroll_retry_s
            while self._keys is None and time.monotonic() < end and not stop.is_set():
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
        self._adopt_keys(secret)
        write_private(self._keys_file, secret)  # StateDirectory, 0600: a restart need not re-enroll
        del secret
        self._pending_nonces.clear()
        log.info("%s: enrolled; secret HE context received sealed", self.id)

    def _claim_state_dir(self) -> None:
        """A state directory holds one agent's keys and model: another agent id's is
        refused (two agents sharing one would mix keys and models)."""
        owner = Path(self.cfg.state_dir) / "agent_id"
        if owner.exists():
            who = owner.read_text().strip()
            if who != self.id:
                raise StateDirTaken(f"state_dir {self.cfg.state_dir} belongs to agent {who!r}, not {self.id!r}: "
                                    f"give each agent its own state_dir (e.g. state/{self.id})"
                                    + (f" in {self.config_path}" if self.config_path else ""))
        else:
            write_private(owner, f"{self.id}\n".encode())

    @property
    def _keys_file(self) -> Path:
        return Path(self.cfg.state_dir) / "keys.bin"

    def _adopt_keys(self, sealed_keys_body: bytes) -> None:
        keys: wire.SealedKeys = wire.decode_body("sealed_keys", sealed_keys_body)
        self.plan = QuantPlan.from_wire(keys.plan) if keys.plan else None
        self._keys, self._ctx, self._bfv = keys, None, None

    @property
    def ctx(self):
        """The secret CKKS context, built when a round first needs it: the HE library
        costs ~20 MB, which an idle agent on a Pi should not pay."""
        if self._keys is None:
            raise he.HEError("no keys yet: enrollment has not completed")
        if self._ctx is None:
            ctx = he.load_context(self._keys.ckks, n_threads=self.cfg.he_threads)
            if not ctx.is_private():
                raise he.HEError("the granted context holds no secret key; delete the state dir and re-enroll")
            self._ctx = ctx
            log.info("%s: secret CKKS context loaded (%s)", self.id, he.params_of(ctx))
        return self._ctx

    @property
    def bfv(self):
        if self._bfv is None and self._keys is not None and self._keys.bfv:
            self._bfv = he.load_context(self._keys.bfv, n_threads=self.cfg.he_threads)
        return self._bfv

    def _load_state(self) -> None:
        """Keys and the last global model from the state directory (a restart resumes)."""
        if self._keys_file.exists():
            try:
                self._adopt_keys(self._keys_file.read_bytes())
                log.info("%s: keys loaded from %s; not re-enrolling", self.id, self._keys_file)
            except (ValueError, he.HEError) as exc:
                log.warning("%s: stored keys unusable (%s); enrolling again", self.id, exc)
                self._keys = None
        progress = Path(self.cfg.state_dir) / "model.npz"
        if progress.exists():
            try:
                saved = np.load(progress)
                version = int(saved["version"])
                self.models, self.latest_version = {version: saved["weights"]}, version
                log.info("%s: resuming from global model version %d", self.id, version)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s: stored model unusable (%s); starting fresh", self.id, exc)
        kept = self.uploads.rounds()
        if kept:
            # Not trained again: the aggregator asks for what it lacks once we are online.
            self.handled_rounds.update(kept)
            log.info("%s: kept upload(s) of round(s) %s found on disk", self.id, kept)

    # ------------------------------------------------------------------ inbound
    def dispatch(self, msg: Inbound, raise_refusal: bool = False) -> None:
        try:
            if msg.payload == b"":
                return  # a retained message being cleared
            info = topics.parse(msg.topic)
            if self._keys is None and info.family != "key":
                waiting = sum(len(m.payload) for m in self._before_keys)
                if waiting + len(msg.payload) <= MAX_WAITING_BEFORE_KEYS:
                    self._before_keys.append(msg)  # handled once enrolled
                else:
                    log.warning("%s dropped %s: %d bytes of messages already wait for enrollment", self.id,
                                msg.topic, waiting)
                return
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
            elif info.family == "roll_call":
                wire.decode_body(env.kind, env.body)  # validated, then answered
                self._announce_online()
            else:
                raise wire.WireError(f"agent does not consume {info.family} messages")
        except (ValueError, he.HEError) as exc:
            log.warning("%s rejected %s: %s", self.id, msg.topic, exc)
        except EnrollmentRefused:
            raise
        except Exception:  # a daemon under Restart=on-failure must not crash-loop on one message
            log.exception("%s: internal error handling %s; message dropped", self.id, msg.topic)

    def _on_round_start(self, env: wire.Envelope) -> None:
        start: wire.RoundStart = wire.decode_body(env.kind, env.body)
        rnd = env.round
        self.seen_starts[rnd] = start
        for old in sorted(self.seen_starts)[:-KEEP_STARTS]:
            del self.seen_starts[old]
        try:
            self._handle_start(rnd, start)
        finally:
            early = self._early_results.pop(rnd, None)
            if early is not None:
                self._on_result(*early)

    def _handle_start(self, rnd: int, start: wire.RoundStart) -> None:
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
        if not self._memory_allows(rnd):
            return
        self._busy_until = start.deadline + 60
        self.notifier.status(f"round {rnd}: {start.purpose}")
        try:
            if start.purpose == "sensitivity":
                self._send_sensitivity(rnd, start)
            else:
                self._participate(rnd, start)
        except Exception as exc:  # one failed round must not kill the daemon
            log.exception("%s: round %d failed: %s", self.id, rnd, exc)
        finally:
            self._busy_until = None
            self.notifier.status(f"round {rnd} done; waiting for rounds of task {self.task}")

    def _memory_allows(self, rnd: int) -> bool:
        """Decline a round that would take the agent over its memory ceiling: better
        one round without this device than the OOM killer mid-upload."""
        limit = self.cfg.memory_limit_mb
        if limit is None:
            return True
        rss = psutil.Process().memory_info().rss
        n = self.trainer.n_params if self.trainer is not None else 0
        # weights, gradients and optimizer state (float32/64), plus the encrypted update
        # (~31 B/param serialized, about twice that while being built)
        need = rss + n * (8 * 4 + 2 * 31)
        if need > limit * 1024 * 1024:
            log.error("%s: declining round %d: it needs about %.0f MB, over the %d MB ceiling", self.id, rnd,
                      need / 1e6, limit)
            return False
        return True

    def _clock(self, rnd: int) -> PhaseClock:
        clock = self.clocks.get(rnd)
        if clock is None:
            s = self.session
            clock = self.clocks[rnd] = PhaseClock(counters=lambda: (s.bytes_sent, s.bytes_received))
        return clock

    def _on_result_chunk(self, env: wire.Envelope) -> None:
        if env.round <= self.latest_version or env.round in self.sensitivity:
            return
        self._clock(env.round).begin("download")  # from the first result chunk to the last
        done = self.chunks.add(env)
        if done is None:
            return
        self._clock(env.round).end("download")
        result: wire.Result = wire.decode_body(done.kind, done.body)
        if env.round not in self.seen_starts:
            # Only a round we saw start can have a result; its start may still be on its way.
            log.info("%s: holding the round-%d result until that round's start arrives", self.id, env.round)
            self._early_results[env.round] = (env, result, len(done.body))
            for old in sorted(self._early_results)[:-2]:
                del self._early_results[old]
            return
        self._on_result(env, result, len(done.body))

    def _check_result(self, rnd: int, result: wire.Result) -> None:
        """A result must fit the round it claims: same purpose, the scheme and base
        model the round started with (WireError otherwise)."""
        start = self.seen_starts[rnd]
        if result.purpose != start.purpose:
            raise wire.WireError(f"round {rnd} started as {start.purpose!r}, its result says {result.purpose!r}")
        scheme = start.protection.scheme if start.purpose == "train" else "ckks"
        if result.scheme != scheme:
            raise wire.WireError(f"round {rnd} uses scheme {scheme!r}, its result says {result.scheme!r}")
        if result.base_version != start.model_version:
            raise wire.WireError(f"round {rnd} trained from model {start.model_version}, its result says "
                                 f"{result.base_version}")
        if result.scheme != "ckks" and result.base_version != 0 and result.base_version not in self.models:
            raise wire.WireError(f"round {rnd}'s quantized result adds to model version {result.base_version}, "
                                 "which this agent does not hold (it missed that round); skipping it")

    def _on_result(self, env: wire.Envelope, result: wire.Result, received: int) -> None:
        rnd = env.round
        if rnd <= self.latest_version or rnd in self.sensitivity:
            return
        self._check_result(rnd, result)
        clock = self._clock(rnd)
        trainer = self._trainer()
        accuracy = None
        mask = self._mask_of_result(result)
        with clock.phase("decrypt"):
            if result.scheme != "ckks":
                weights = protection.rebuild_quantized(self.bfv, self.plan, result, mask, trainer.layer_sizes(),
                                                       self._base_weights(result.base_version))
            else:
                weights = protection.rebuild_ckks(self.ctx, result, mask)
        if not np.isfinite(weights).all():
            raise wire.WireError(f"round {rnd}'s result decrypts to NaN or infinity; not adopted")
        if result.purpose == "sensitivity":
            self.sensitivity[rnd] = weights
            log.info("%s: aggregated sensitivity map of round %d decrypted (%d agents)",
                     self.id, rnd, len(result.participants))
        else:
            with clock.phase("evaluate"):
                accuracy = trainer.evaluate(weights)
            self._adopt(rnd, weights, accuracy, result)
        self._publish_telemetry(rnd, clock, accuracy, received)
        self._settle_upload(rnd, result.participants, "aggregated", f"{len(result.participants)} agents made it")
        self.uploads.drop_before(rnd)
        for old in [r for r in self.clocks if r < rnd]:
            self.clocks.pop(old).close()
        self.chunks.discard(keep=lambda key: key[0] != "result" or key[1] >= rnd)
        if self.parked and self._ready_for(self.parked[1]):
            prnd, start = self.parked
            self.parked = None
            self._run_round(prnd, start)

    def _adopt(self, rnd: int, weights: np.ndarray, accuracy: float, result: wire.Result) -> None:
        self.models = {rnd: weights}
        self.latest_version = rnd
        tmp = Path(self.cfg.state_dir) / "model.tmp.npz"
        np.savez(tmp, version=rnd, weights=weights)
        os.replace(tmp, Path(self.cfg.state_dir) / "model.npz")  # atomic: a crash leaves the old or the new
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
        if self.uploads.drop(rnd) and self.id not in participants:
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
        only = req.chunks() or None
        try:
            sent, chunks = self.session.send_stream(
                lambda seq: topics.update_chunk(self.task, env.round, self.id, seq), None, task=self.task,
                rnd=env.round, chunk_size=chunk_size, encoded=encoded, only=only, abort=self._stop)
        except BrokerError as exc:
            log.warning("%s: resending round %d interrupted (%s); still kept", self.id, env.round, exc)
            return
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
        clock = self._clock(rnd)
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
        clock = self._clock(rnd)
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
            self.uploads.put(rnd, encoded[1], self.cfg.chunk_size)
        with clock.phase("upload"):
            try:
                sent, _ = self.session.send_stream(
                    lambda seq: topics.update_chunk(self.task, rnd, self.id, seq), None, task=self.task, rnd=rnd,
                    chunk_size=self.cfg.chunk_size, delay_s=self.cfg.faults.chunk_delay_s, encoded=encoded,
                    abort=self._stop)
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


def run(cfg: AgentConfig, config_path: Path | None = None) -> int:
    stop = stop_event()
    reload = reload_event()
    agent = Agent(cfgmod.apply_profile(cfg), config_path=config_path)
    try:
        agent.run(stop, reload)
    except (EnrollmentRefused, StateDirTaken) as exc:
        log.error("%s", exc)
        agent.session.close()
        return 2
    agent.stop()
    return 0
