"""``fedmq demo``: the whole system on one machine, as separate processes.

Embedded broker, key authority, aggregator and N agents each run as their own
``python -m fedmq`` process with their own YAML config, exactly as they would on
separate hosts. The demo watches the broker like an operator would (round starts,
round closes, telemetry), SIGKILLs one agent in the middle of a round to show the
round still closes, and prints a table per round.
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmq import config as cfgmod
from fedmq import topics, wire
from fedmq.chunking import Reassembler
from fedmq.mqtt_session import MqttSession
from fedmq.private_files import ensure_private_dir, write_private

log = logging.getLogger("fedmq.demo")
TASK = "digits"


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
    closed: wire.RoundClosed | None = None
    telemetry: dict[str, wire.Telemetry] = field(default_factory=dict)
    killed: str | None = None


@dataclass
class Cluster:
    """Configs and processes of one local deployment (demo, tests, field tests)."""

    workdir: Path
    port: int
    n_agents: int
    rounds: int
    chunk_size: int = 64 * 1024
    round_timeout_s: float = 60.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    agent_overrides: dict[str, dict] = field(default_factory=dict)

    @property
    def agent_ids(self) -> list[str]:
        return [f"agent-{i + 1}" for i in range(self.n_agents)]

    def write_configs(self, min_agents: int = 2) -> None:
        ensure_private_dir(self.workdir / "configs")
        endpoint = cfgmod.BrokerEndpoint(port=self.port)
        creds = {a: secrets.token_urlsafe(24) for a in self.agent_ids}
        self._write("keyauthority", cfgmod.KeyAuthorityConfig(
            task=TASK, broker=endpoint, state_dir=self.workdir / "state/keyauthority", credentials=creds))
        self._write("aggregator", cfgmod.AggregatorConfig(
            task=TASK, broker=endpoint, state_dir=self.workdir / "state/aggregator", rounds=self.rounds,
            min_agents=min_agents, target_agents=self.n_agents, selection_grace_s=3.0,
            round_timeout_s=self.round_timeout_s, chunk_size=self.chunk_size))
        for i, a in enumerate(self.agent_ids):
            raw = dict(agent_id=a, credential=creds[a], task=TASK, broker=endpoint,
                       state_dir=self.workdir / f"state/{a}", chunk_size=self.chunk_size,
                       data=cfgmod.DataSettings(shard=i, num_shards=self.n_agents))
            raw.update(self.agent_overrides.get(a, {}))
            self._write(a, cfgmod.AgentConfig(**raw))

    def config_path(self, name: str) -> Path:
        return self.workdir / "configs" / f"{name}.yaml"

    def _write(self, name: str, cfg) -> None:
        write_private(self.config_path(name), cfgmod.dump(cfg).encode())

    def start(self, name: str, *args: str) -> subprocess.Popen:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "fedmq", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=Path(__file__).resolve().parent.parent)
        self.procs[name] = proc
        return proc

    def start_broker(self) -> None:
        self.start("broker", "broker", "--port", str(self.port))
        wait_for_port(self.port)

    def start_role(self, name: str) -> subprocess.Popen:
        role = "agent" if name.startswith("agent-") else name
        return self.start(name, role, "--config", str(self.config_path(name)))

    def start_all(self) -> None:
        self.start_broker()
        self.start_role("keyauthority")
        self.start_role("aggregator")
        for a in self.agent_ids:
            self.start_role(a)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            proc.send_signal(sig)

    def stop_all(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Observer:
    """Watches round starts, closes and telemetry on the broker, like an operator."""

    def __init__(self, port: int, watch_uploads_of: str | None = None) -> None:
        self.session = MqttSession(cfgmod.BrokerEndpoint(port=port), f"observer-{secrets.token_hex(3)}")
        filters = [topics.all_round_starts(TASK), topics.all_round_closed(TASK), topics.ALL_TELEMETRY]
        if watch_uploads_of:
            filters.append(f"updates/{TASK}/+/{watch_uploads_of}/+")
        for filt in filters:
            self.session.subscribe(filt)
        self.rounds: dict[int, RoundView] = {}
        self._chunks = Reassembler(max_stream_bytes=1 << 20)

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
                return "upload", info.round
            env = wire.decode_envelope(msg.payload, max_bytes=1 << 20)
            wire.check_against_topic(env, info, task=TASK)
            body = wire.decode_body(env.kind, env.body)
        except ValueError as exc:
            log.warning("observer ignored %s: %s", msg.topic, exc)
            return None
        view = self.rounds.setdefault(env.round, RoundView())
        if info.family == "round_start":
            view.selected = body.selected
            return "start", env.round
        if info.family == "round_closed":
            view.closed = body
            return "closed", env.round
        if info.family == "telemetry":
            view.telemetry[env.sender] = body
        return None

    def close(self) -> None:
        self.session.close()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _phase(view: RoundView, name: str) -> float | None:
    return _mean([t.phases[name].wall_s for t in view.telemetry.values() if name in t.phases])


def render(rounds: dict[int, RoundView], console: Console) -> float | None:
    table = Table(title="fedmq demo: encrypted FedAvg on digits (CKKS, full encryption)")
    for col in ("round", "status", "agents", "dropped", "accuracy", "uploaded",
                "train s", "encrypt s", "aggregate s", "decrypt s"):
        table.add_column(col, justify="right")
    final = None
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for rnd in sorted(r for r in rounds if r > 0):
        v = rounds[rnd]
        c = v.closed
        acc = _mean([t.accuracy for t in v.telemetry.values() if t.accuracy is not None])
        if c and c.status == "aggregated" and acc is not None:
            final = acc
        dropped = ", ".join(c.dropped) if c else "-"
        if v.killed:
            dropped = dropped.replace(v.killed, f"{v.killed} (SIGKILL)")
        table.add_row(str(rnd), c.status if c else "open",
                      f"{len(c.participants)}/{len(v.selected)}" if c else "-", dropped,
                      "-" if acc is None else f"{acc:.4f}", f"{c.bytes_received / 1e6:.2f} MB" if c else "-",
                      fmt(_phase(v, "train")), fmt(_phase(v, "encrypt")), fmt(c.agg_s if c else None),
                      fmt(_phase(v, "decrypt")))
    console.print(table)
    return final


def run_demo(*, agents: int, rounds: int, kill_round: int, workdir: Path | None, chunk_kib: int,
             timeout: float) -> int:
    console = Console(width=max(Console().width, 120))
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedmq-demo-")
        workdir = Path(tmp.name)
    cluster = Cluster(workdir=workdir, port=free_port(), n_agents=agents, rounds=rounds,
                      chunk_size=chunk_kib * 1024)
    victim = cluster.agent_ids[-1] if kill_round else None
    if victim:
        # The victim uploads slowly so that the SIGKILL lands mid-upload, deterministically.
        cluster.agent_overrides[victim] = {"faults": cfgmod.FaultSettings(chunk_delay_s=0.4)}
    cluster.write_configs(min_agents=max(2, agents // 2))
    console.print(f"[bold]fedmq demo[/]: {agents} agents, {rounds} rounds, broker on 127.0.0.1:{cluster.port}, "
                  f"work dir {workdir}")
    observer = None
    try:
        cluster.start_all()
        observer = Observer(cluster.port, watch_uploads_of=victim)
        observer.connect()
        end = time.monotonic() + timeout
        last_closed, telemetry_wait_until = 0, None
        while time.monotonic() < end:
            event = observer.poll()
            if event and event[0] == "start":
                console.print(f"round {event[1]} started with {len(observer.rounds[event[1]].selected)} agents")
            elif event and event[0] == "upload" and event[1] == kill_round:
                if not observer.rounds.setdefault(event[1], RoundView()).killed:
                    cluster.kill(victim)
                    observer.rounds[event[1]].killed = victim
                    console.print(f"  [red]SIGKILL {victim}[/] in the middle of its upload in round {event[1]}")
            elif event and event[0] == "closed":
                c = observer.rounds[event[1]].closed
                console.print(f"round {event[1]} {c.status}: {c.reason}")
                last_closed = max(last_closed, event[1])
                if last_closed >= rounds:
                    telemetry_wait_until = time.monotonic() + 10
            if telemetry_wait_until is not None:
                view = observer.rounds[rounds]
                if set(view.closed.participants) <= set(view.telemetry) or time.monotonic() > telemetry_wait_until:
                    break
            if cluster.procs["aggregator"].poll() not in (None, 0):
                console.print(f"[red]aggregator exited with {cluster.procs['aggregator'].returncode}; "
                              f"see {workdir / 'logs/aggregator.log'}[/]")
                break
    finally:
        if observer:
            observer.close()
        cluster.stop_all()
    final = render(observer.rounds if observer else {}, console)
    closed = sum(1 for r, v in (observer.rounds.items() if observer else []) if v.closed and
                 v.closed.status == "aggregated" and r > 0)
    print(f"demo: {closed} rounds closed, final accuracy {final if final is not None else 0:.2f}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if closed == rounds else 1
