"""A whole fedmq deployment on one machine, as separate processes.

Used by ``fedmq demo``, the integration tests and field tests: each role runs as
its own ``python -m fedmq`` process with its own YAML config, as it would on its
own host, and the :class:`Observer` watches the broker like an operator does.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.runtime import config as cfgmod
from fedmq.privacy import signing
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import Reassembler
from fedmq.runtime.mqtt_session import MqttSession
from fedmq.runtime.private_files import ensure_private_dir, write_private

log = logging.getLogger("fedmq.cluster")
TASK = "digits"
# Aggregator settings a shard worker shares with the root when a test overrides them.
WORKER_SETTINGS = {"max_update_bytes", "max_message_bytes", "inbox_max_bytes", "offline_grace_s", "chunk_size"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class RoundView:
    selected: list[str] = field(default_factory=list)
    purpose: str = "train"
    closed: wire.RoundClosed | None = None
    telemetry: dict[str, wire.Telemetry] = field(default_factory=dict)
    killed: str | None = None
    # When the aggregator sent the start and the close (their envelopes' clock): exact
    # even when the observer reads them late, as a busy machine's observer does.
    started_ts: float | None = None
    closed_ts: float | None = None


@dataclass
class Cluster:
    """Configs and processes of one local deployment (demo, tests, field tests)."""

    workdir: Path
    port: int
    n_agents: int
    rounds: int
    chunk_size: int = 64 * 1024
    round_timeout_s: float = 60.0
    selection_grace_s: float = 30.0
    offline_grace_s: float = 3.0  # one machine: a reconnect takes a second, not a Wi-Fi association
    target_agents: int | None = None  # default: every agent
    protection: wire.Protection = field(default_factory=wire.Protection)
    quantization: cfgmod.QuantizationSettings | None = None  # the key authority's secret plan
    dp: cfgmod.DpSettings | None = None  # client-level differential privacy
    max_samples: int = 1_000_000  # the policy's bound on an update's weight (masked floats: their resolution)
    # A clustered broker: every node's port (``port`` is the first). Agent i connects to
    # node i mod n, with the others as its failover list; the services to the first.
    broker_ports: list[int] = field(default_factory=list)
    shard_workers: int = 0  # sharded aggregation: this many workers fold the rounds' shards, the aggregator combines
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    agent_overrides: dict[str, dict] = field(default_factory=dict)
    aggregator_overrides: dict = field(default_factory=dict)

    @property
    def worker_ids(self) -> list[str]:
        return [f"shard-{k + 1}" for k in range(self.shard_workers)]

    @property
    def agent_ids(self) -> list[str]:
        return [f"agent-{i + 1}" for i in range(self.n_agents)]

    def log_text(self, name: str) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def endpoint(self, i: int = 0) -> cfgmod.BrokerEndpoint:
        """Node ``i`` (mod the cluster's size) first, the other nodes to fail over to."""
        ports = self.broker_ports or [self.port]
        order = ports[i % len(ports):] + ports[:i % len(ports)]
        return cfgmod.BrokerEndpoint(port=order[0], failover=[f"127.0.0.1:{p}" for p in order[1:]])

    def write_configs(self, min_agents: int = 2) -> None:
        ensure_private_dir(self.workdir / "configs")
        endpoint = self.endpoint()
        creds = {a: secrets.token_urlsafe(24) for a in self.agent_ids}
        # The signing keys are made first: each role's config names the other's public key.
        authority_key = signing.public_bytes(signing.load_or_create(self.authority_key_file)).hex()
        aggregator_key = signing.public_bytes(
            signing.load_or_create(self.workdir / "state/aggregator/signing.key")).hex()
        worker_keys = {w: signing.public_bytes(signing.load_or_create(self.workdir / f"state/{w}/signing.key")).hex()
                       for w in self.worker_ids}
        self._write("keyauthority", cfgmod.KeyAuthorityConfig(
            task=TASK, broker=endpoint, state_dir=self.workdir / "state/keyauthority", credentials=creds,
            quantization=self.quantization, aggregator_key=aggregator_key, worker_keys=worker_keys,
            policy=cfgmod.PolicySettings(protection=self.protection, min_agents=min_agents, dp=self.dp,
                                         max_samples=self.max_samples)))
        self._write("aggregator", cfgmod.AggregatorConfig(**{
            **dict(task=TASK, broker=endpoint, state_dir=self.workdir / "state/aggregator", rounds=self.rounds,
                   min_agents=min_agents, target_agents=self.target_agents or self.n_agents,
                   selection_grace_s=self.selection_grace_s, round_timeout_s=self.round_timeout_s,
                   offline_grace_s=self.offline_grace_s, chunk_size=self.chunk_size, authority_key=authority_key,
                   shard_workers=self.worker_ids),
            **self.aggregator_overrides}))  # an override wins over the cluster's default
        for w in self.worker_ids:
            self._write(w, cfgmod.AggregatorConfig(
                aggregator_id=w, shard_worker=True, task=TASK, broker=endpoint, state_dir=self.workdir / f"state/{w}",
                offline_grace_s=self.offline_grace_s, chunk_size=self.chunk_size, authority_key=authority_key,
                **{k: v for k, v in self.aggregator_overrides.items() if k in WORKER_SETTINGS}))
        for i, a in enumerate(self.agent_ids):
            raw = dict(agent_id=a, credential=creds[a], task=TASK, broker=self.endpoint(i),
                       authority_key=authority_key,
                       state_dir=self.workdir / f"state/{a}", chunk_size=self.chunk_size,
                       data=cfgmod.DataSettings(shard=i, num_shards=self.n_agents))
            raw.update(self.agent_overrides.get(a, {}))
            self._write(a, cfgmod.AgentConfig(**raw))

    @property
    def authority_key_file(self) -> Path:
        """The key authority's signing key (tests use it to play a forger who has it, or not)."""
        return self.workdir / "state/keyauthority/signing.key"

    def config_path(self, name: str) -> Path:
        return self.workdir / "configs" / f"{name}.yaml"

    def _write(self, name: str, cfg) -> None:
        write_private(self.config_path(name), cfgmod.dump(cfg).encode())

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Its own session: a Ctrl-C at the terminal reaches only the demo or field test,
        # which then stops the roles in order (agents first, the broker last) — not all
        # at once, which left agents logging a lost broker while they were being stopped.
        proc = subprocess.Popen([sys.executable, "-m", "fedmq", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=Path(__file__).resolve().parents[2], start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_broker(self) -> None:
        self.start("broker", "broker", "--port", str(self.port))
        wait_for_port(self.port)

    def start_role(self, name: str, env: dict | None = None) -> subprocess.Popen:
        role = "agent" if name.startswith("agent-") else "aggregator" if name in self.worker_ids else name
        return self.start(name, role, "--config", str(self.config_path(name)), env=env)

    def start_all(self, embedded_broker: bool = True) -> None:
        if embedded_broker:
            self.start_broker()
        self.start_role("keyauthority")
        self.start_role("aggregator")
        for w in self.worker_ids:
            self.start_role(w)
        for a in self.agent_ids:
            self.start_role(a)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            proc.send_signal(sig)

    def stop_all(self) -> None:
        """Roles first (agents, aggregator, key authority: they say goodbye through the
        broker), the broker last."""
        roles = [p for n, p in reversed(list(self.procs.items())) if n != "broker"]
        broker = [self.procs["broker"]] if "broker" in self.procs else []
        for group in (roles, broker):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Observer:
    """Watches round starts, closes and telemetry on the broker, like an operator."""

    def __init__(self, port: int, watch_uploads_of: str | None = None, collect_results: bool = False) -> None:
        self.session = MqttSession(cfgmod.BrokerEndpoint(port=port, persistent_session=False),
                                   f"observer-{secrets.token_hex(3)}")
        filters = [topics.all_round_starts(TASK), topics.all_round_closed(TASK), topics.ALL_TELEMETRY]
        if watch_uploads_of:
            filters.append(f"updates/{TASK}/+/{watch_uploads_of}/+")
            filters.append(f"shards/{TASK}/+/+/{watch_uploads_of}/+")  # sharded rounds
        if collect_results:
            filters.append(topics.all_results(TASK))
            filters.append(topics.all_mask_requests(TASK))
        for filt in filters:
            self.session.subscribe(filt)
        self.rounds: dict[int, RoundView] = {}
        self.results: dict[int, wire.Result] = {}
        self.mask_requests: dict[int, int] = {}  # round -> unmask requests seen (secure masking)
        self.uploads: dict[int, list[bytes]] = {}  # raw chunks of the watched agent, per round
        self._keep_uploads = watch_uploads_of not in (None, "+")
        # (round, agent) -> [chunks seen, chunks in the stream], for every watched agent
        self.upload_progress: dict[tuple[int, str], list[int]] = {}
        self._chunks = Reassembler(max_stream_bytes=1 << 32)

    def connect(self) -> None:
        self.session.connect()

    def poll(self, timeout: float = 0.2) -> tuple[str, int] | None:
        """Handle one message; returns (event, round) for starts, closes and watched uploads."""
        try:
            msg = self.session.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if not msg.payload:
            return None
        try:
            info = topics.parse(msg.topic)
            if info.family == "update":
                if self._keep_uploads:
                    self.uploads.setdefault(info.round, []).append(msg.payload)
                total = wire.decode_envelope(msg.payload, max_bytes=1 << 26).total
                seen = self.upload_progress.setdefault((info.round, info.agent), [0, total])
                seen[0] += 1
                return "upload", info.round
            env = wire.decode_envelope(msg.payload, max_bytes=1 << 26)
            wire.check_against_topic(env, info, task=TASK)
            if info.family == "result":
                if env.round in self.results:
                    return None  # delivered again after a reconnect: we have it
                done = self._chunks.add(env)
                if done is not None:
                    self.results[env.round] = wire.decode_body(done.kind, done.body)
                    return "result", env.round
                return None
            body = wire.decode_body(env.kind, env.body)
        except ValueError as exc:
            log.warning("observer ignored %s: %s", msg.topic, exc)
            return None
        view = self.rounds.setdefault(env.round, RoundView())
        if info.family == "round_start":
            view.selected, view.purpose, view.started_ts = body.selected, body.purpose, env.ts
            return "start", env.round
        if info.family == "round_closed":
            view.closed, view.closed_ts = body, env.ts
            return "closed", env.round
        if info.family == "telemetry":
            view.telemetry[env.sender] = body
        if info.family == "mask_request":
            self.mask_requests[env.round] = self.mask_requests.get(env.round, 0) + 1
            return "mask_request", env.round
        return None

    def wait_for(self, event: str, rnd: int, timeout: float, on_event=None) -> None:
        """Pump messages until (event, rnd) is seen; ``on_event`` sees every event."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.poll()
            if got and on_event:
                on_event(*got)
            if got == (event, rnd) or (event == "result" and rnd in self.results) or (
                    event == "closed" and self.rounds.get(rnd, RoundView()).closed):
                return
        raise TimeoutError(f"no {event} of round {rnd} within {timeout}s")

    def close(self) -> None:
        self.session.close()
