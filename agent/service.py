"""The agent daemon: enroll, wait for rounds, train, encrypt, upload, decrypt results.

It keeps its place across rounds with the model version carried by each round
start: a start whose base model has not arrived yet is parked until the result it
builds on is decrypted, so no round ever trains from the wrong weights.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np

from fedmq.privacy import he
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import Reassembler, single
from fedmq.runtime import config as cfgmod
from fedmq.runtime.config import AgentConfig
from fedmq.runtime.mqtt_session import Inbound, MqttSession
from fedmq.privacy.quantization import QuantPlan
from fedmq.privacy.sealing import new_keypair
from fedmq.runtime.telemetry import PhaseClock
from fedmq.runtime.private_files import ensure_private_dir
from fedmq.runtime.sd_notify import Notifier
from fedmq.runtime.signals import reload_event, stop_event

from agent.enrollment import Enrollment, EnrollmentRefused, StartRefused
from agent.kept_uploads import KeptUploads
from agent.results import Results
from agent.round_work import RoundWork

log = logging.getLogger("fedmq.agent")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_WAITING_BEFORE_KEYS = 64 * 1024 * 1024  # bytes of round traffic held until enrolled
# What only the aggregator sends: believed only with its signature (its key comes in the sealed policy).
FROM_AGGREGATOR = {"round_start", "result", "round_closed", "resend", "roll_call"}


class Agent(Enrollment, RoundWork, Results):
    """The daemon: lifecycle, configuration reload and the inbound dispatch; the
    work itself lives in the mixins (enrollment, round_work, results)."""

    def __init__(self, cfg: AgentConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = Notifier()
        self._heartbeat = time.monotonic()
        self._busy_until: float | None = None
        self.id = cfg.agent_id
        self.task = cfg.task
        self.authority_key = b""  # the key authority's Ed25519 public key, from the config
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
        self._before_keys_bytes = 0
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
        self.dp_clipped: dict[int, bool] = {}  # round -> whether DP clipping shortened the update
        # Encoded updates kept on disk until the round's result: the aggregator may ask
        # for chunks it lacks after its restart, our reconnect or our restart.
        self.uploads = KeptUploads(Path(cfg.state_dir))
        self._stop = threading.Event()
        self.handled_rounds: set[int] = set()
        self.clocks: dict[int, PhaseClock] = {}
        self.sent_bytes: dict[int, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event | None = None, reload: threading.Event | None = None) -> None:
        stop = self._stop = stop or threading.Event()
        s = self.session
        ensure_private_dir(Path(self.cfg.state_dir))
        if self.cfg.faults.oracle_dir is not None:
            log.warning("%s: TEST MODE: plaintext updates are written to %s (faults.oracle_dir); this defeats "
                        "every protection and must never run on a real device", self.id, self.cfg.faults.oracle_dir)
        self._check_workload()
        self._resolve_authority_key()
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
        waiting, self._before_keys, self._before_keys_bytes = self._before_keys, [], 0
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

    def _check_workload(self) -> None:
        """A workload that cannot be found stops the agent now (exit 2), not at the
        first round; importing it (and torch) waits for that round."""
        from fedmq.learning import workload as workload_api

        settings = self.cfg.effective_workload()
        try:
            workload_api.check_reference(settings.name)
        except workload_api.WorkloadError as exc:
            raise StartRefused(f"{exc}" + (f" (workload.name in {self.config_path})" if self.config_path else ""))
        if settings.data_dir is not None and not Path(settings.data_dir).is_dir():
            raise StartRefused(f"workload.data_dir {settings.data_dir} is not a directory"
                               + (f" ({self.config_path})" if self.config_path else ""))

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
        fixed = [k for k in ("agent_id", "credential", "authority_key", "task", "broker", "state_dir")
                 if getattr(new, k) != getattr(self.cfg, k)]
        if new.faults.oracle_dir != self.cfg.faults.oracle_dir:  # never switched on (or moved) by a reload
            fixed.append("faults.oracle_dir")
            new = new.model_copy(update={"faults": new.faults.model_copy(
                update={"oracle_dir": self.cfg.faults.oracle_dir,
                        "test_plaintext_dumps": self.cfg.faults.test_plaintext_dumps})})
        if fixed:
            log.warning("%s: %s changed in %s; that takes a restart (systemctl restart)", self.id,
                        ", ".join(fixed), self.config_path)
            new = new.model_copy(update={k: getattr(self.cfg, k) for k in fixed if "." not in k})
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
                if self._before_keys_bytes + len(msg.payload) <= MAX_WAITING_BEFORE_KEYS:
                    self._before_keys.append(msg)  # handled once enrolled
                    self._before_keys_bytes += len(msg.payload)
                else:
                    log.warning("%s dropped %s: %d bytes of messages already wait for enrollment", self.id,
                                msg.topic, self._before_keys_bytes)
                return
            env = wire.decode_envelope(msg.payload, max_bytes=MAX_MESSAGE_BYTES)
            wire.check_against_topic(env, info, task=self.task)
            if info.family in FROM_AGGREGATOR:
                pol = self._keys.policy
                if info.family == "resend" and env.sender in pol.worker_keys:  # a shard worker asks for our upload
                    wire.check_signature(env, pol.worker_keys[env.sender], f"shard worker {env.sender}")
                else:
                    wire.check_signature(env, pol.aggregator_key, "the aggregator")
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
        except (EnrollmentRefused, StartRefused):
            raise
        except Exception:  # a daemon under Restart=on-failure must not crash-loop on one message
            log.exception("%s: internal error handling %s; message dropped", self.id, msg.topic)


def run(cfg: AgentConfig, config_path: Path | None = None) -> int:
    stop = stop_event()
    reload = reload_event()
    agent = Agent(cfgmod.apply_profile(cfg), config_path=config_path)
    try:
        agent.run(stop, reload)
    except (EnrollmentRefused, StartRefused) as exc:
        log.error("%s", exc)
        agent.session.close()
        return 2
    agent.stop()
    return 0
