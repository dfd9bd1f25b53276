"""Run a field-test scenario: a real deployment, a fault schedule, an exactness check.

Every role is its own process (as in ``fedmq demo``); every agent reaches the broker
through its own :class:`TcpProxy`, so its network can be cut without touching the
others. The harness watches the broker like an operator, applies each fault at its
moment (a round's start, an agent's first upload chunk, ...), and after the run
checks every round's aggregate against the exact weighted mean of the updates of
the agents the round says took part (the test-only oracle).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedmq.runtime import config as cfgmod
from fedmq.privacy import masking
from fedmq.tools.fieldtest import oracle
from fedmq.tools.fieldtest.scenario import Fault, Scenario
from fedmq.tools.fieldtest.tcp_proxy import TcpProxy
from fedmq.tools.local_broker import MosquittoProcess, resolve_kind
from fedmq.tools.local_cluster import Cluster, Observer, free_port
from fedmq.tools.rabbitmq_cluster import RabbitMQCluster

log = logging.getLogger("fedmq.tools.fieldtest")


@dataclass
class RoundReport:
    round: int  # training round, 1-based
    wire_round: int  # the aggregator's round number (a mask agreement comes first)
    status: str = "open"
    selected: int = 0
    participants: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    close_s: float | None = None
    bytes_received: int = 0
    faults: list[str] = field(default_factory=list)
    ok: bool = False
    max_error: float | None = None
    verdict: str = "not checked"


@dataclass
class FieldReport:
    scenario: str
    broker: str
    agents: int
    rounds: list[RoundReport]
    wall_s: float
    faults_applied: int
    faults_skipped: list[str]
    aggregator_resumes: int
    interrupted: bool = False  # Ctrl-C or SIGTERM: the rounds that closed until then

    @property
    def ok(self) -> bool:
        return len(self.rounds) > 0 and all(r.ok for r in self.rounds) and not self.interrupted

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class _Pending:
    when: float
    action: Callable[[], None]


class FieldTest:
    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.sc = scenario
        self.workdir = workdir
        self.offset = int(masking.needs_agreement(scenario.protection.scheme, scenario.protection.p,
                                                  scenario.protection.mode))
        self.broker_kind = resolve_kind(scenario.broker)
        self.cluster = Cluster(workdir=workdir, port=free_port(), n_agents=scenario.agents,
                               rounds=scenario.rounds, chunk_size=scenario.chunk_size,
                               round_timeout_s=scenario.round_timeout_s,
                               selection_grace_s=scenario.selection_grace_s,
                               offline_grace_s=scenario.offline_grace_s, protection=scenario.protection,
                               max_samples=scenario.max_samples, shard_workers=scenario.shard_workers)
        self.mosquitto = MosquittoProcess(workdir / "mosquitto", self.cluster.port) \
            if self.broker_kind == "mosquitto" else None
        self.rabbitmq = None
        if self.broker_kind == "rabbitmq-cluster":
            self.rabbitmq = RabbitMQCluster(workdir / "rabbitmq", [self.cluster.port, free_port(), free_port()])
            self.cluster.broker_ports = self.rabbitmq.mqtt_ports
        # Each agent's own proxy to its own node (node i mod n of a cluster).
        self.proxies = {a: TcpProxy(self.cluster.endpoint(i).port, name=f"net-{a}")
                        for i, a in enumerate(scenario.agent_ids)}
        self.rng = np.random.default_rng(scenario.seed)
        self.reports: dict[int, RoundReport] = {}
        self.started_at: dict[int, float] = {}
        self.pending: list[_Pending] = []
        self.arms: list[tuple[Callable[[], bool], Callable[[], None], int, str]] = []
        self.stopped: dict[int, list[str]] = {}  # wire round -> agents SIGSTOPped in it
        self.applied = 0
        self.skipped: list[str] = []
        self.observer: Observer | None = None

    # ------------------------------------------------------------------ processes
    def _start_broker(self) -> None:
        if self.rabbitmq:
            self.rabbitmq.start()
        elif self.mosquitto:
            self.mosquitto.start()
        else:
            self.cluster.start_broker()

    def _stop_broker(self) -> None:
        if self.mosquitto:
            self.mosquitto.stop()
        else:
            self.cluster.kill("broker", signal.SIGTERM)
            self.cluster.procs["broker"].wait(10)

    def _alive(self, name: str) -> bool:
        proc = self.cluster.procs.get(name)
        return proc is not None and proc.poll() is None

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        self.pending.append(_Pending(time.monotonic() + delay, action))

    # ------------------------------------------------------------------ faults
    def _note(self, wire_round: int, text: str) -> None:
        self.applied += 1
        self.reports[wire_round].faults.append(text)
        log.info("round %d: %s", wire_round - self.offset, text)

    def _skip(self, wire_round: int, text: str) -> None:
        self.skipped.append(f"round {wire_round - self.offset}: {text}")
        log.info("round %d: skipped %s", wire_round - self.offset, text)

    def _proc(self, agent: str) -> str:
        """The process an agent fault hits: the agent's own, or its host's."""
        return self.sc.host_of(agent)

    def _describe(self, agent: str) -> str:
        host = self._proc(agent)
        return agent if host == agent else f"{host} ({len(self.sc.hosts[host])} agents, {agent} first)"

    def _start_proc(self, name: str) -> None:
        if self.sc.agents_per_host == 1:
            self.cluster.start_role(name)
        else:
            self.cluster.start(name, "fleet-host", "--list", str(self.workdir / "configs" / f"{name}.txt"))

    def _kill_agent(self, r: int, f: Fault, label: str) -> None:
        proc = self._proc(f.agent)
        if not self._alive(proc):
            self._skip(r, f"SIGKILL {self._describe(f.agent)}: not running")
            return
        self.cluster.kill(proc, signal.SIGKILL)
        self._note(r, f"SIGKILL {self._describe(f.agent)} ({label})")
        if f.restart_after_s is not None:
            self._later(f.restart_after_s, lambda: self._start_proc(proc))

    def _kill_aggregator(self, r: int, f: Fault, label: str, name: str = "aggregator") -> None:
        """kill -9 of the aggregator (or of a shard worker), restarted on the same state dir."""
        self.cluster.kill(name, signal.SIGKILL)
        self.cluster.procs[name].wait(10)
        self._note(r, f"kill -9 {name} ({label})")
        self._later(f.restart_after_s or 0.0, lambda: self.cluster.start_role(name))

    def _uploads(self, r: int, agent: str) -> tuple[int, int]:
        seen, total = self.observer.upload_progress.get((r, agent), [0, 0])
        return seen, total

    def _schedule(self, r: int, f: Fault) -> None:
        """Arrange one fault of wire round ``r``, which has just started."""
        obs = self.observer
        if f.kind == "kill" and f.phase == "upload":
            self.arms.append((lambda: self._uploads(r, f.agent)[0] >= 1,
                              lambda: self._kill_agent(r, f, "mid-upload"), r, f"SIGKILL {f.agent} mid-upload"))
        elif f.kind == "kill":
            def kill_training() -> None:
                seen, total = self._uploads(r, f.agent)
                self._kill_agent(r, f, "training" if seen == 0 else f"after {seen}/{total} chunks")
            self._later(f.after_s, kill_training)
        elif f.kind == "stop":
            def stop() -> None:
                proc = self._proc(f.agent)
                if not self._alive(proc) or r not in self.reports or self.reports[r].status != "open":
                    self._skip(r, f"SIGSTOP {self._describe(f.agent)}: not running or round over")
                    return
                self.cluster.kill(proc, signal.SIGSTOP)
                self.stopped.setdefault(r, []).append(proc)
                self._note(r, f"SIGSTOP {self._describe(f.agent)} until the round closes")
            self._later(f.after_s, stop)
        elif f.kind == "network":
            proxy = self.proxies[f.agent]

            def cut() -> None:
                proxy.set_mode(f.mode, f.delay_s)
                self._note(r, f"network {f.mode} {f.agent} {f.duration_s:.1f}s")
                self._later(f.duration_s, lambda: proxy.set_mode("pass"))
            self._later(f.after_s, cut)
        elif f.kind == "broker-node-kill":
            def kill_node() -> None:
                self.rabbitmq.kill(f.node)
                self._note(r, f"RabbitMQ node {f.node} of 3 SIGKILLed mid-round (stays down)")
            self._later(f.after_s, kill_node)
        elif f.kind == "broker-restart":
            def restart() -> None:
                self._stop_broker()
                self._note(r, f"broker ({self.broker_kind}) restart, down {f.duration_s:.1f}s")
                self._later(f.duration_s, self._start_broker)
            self._later(f.after_s, restart)
        elif f.kind in ("aggregator-kill", "worker-kill") and f.phase == "upload":
            def mid_round() -> bool:
                progress = [v for (rr, _), v in obs.upload_progress.items() if rr == r]
                return any(s >= t for s, t in progress) and any(0 < s < t for s, t in progress)
            name = f.agent if f.kind == "worker-kill" else "aggregator"
            self.arms.append((mid_round, lambda: self._kill_aggregator(r, f, "mid-round: one upload done, "
                                                                              "another in flight", name),
                              r, f"kill -9 {name} mid-round"))
        elif f.kind == "aggregator-kill" and f.phase == "unmask":
            self.arms.append((lambda: obs.mask_requests.get(r, 0) >= 1,
                              lambda: self._kill_aggregator(r, f, "mid-unmasking: correction asked for"),
                              r, "kill -9 aggregator mid-unmasking"))
        else:
            self._later(f.after_s, lambda: self._kill_aggregator(r, f, "as the round starts"))

    # ------------------------------------------------------------------ events
    def _on_start(self, r: int) -> None:
        if r in self.reports:
            return  # a retained start delivered again (reconnect, restart)
        view = self.observer.rounds[r]
        rep = self.reports[r] = RoundReport(round=r - self.offset, wire_round=r, selected=len(view.selected))
        self.started_at[r] = time.monotonic()
        if r <= self.offset:
            return  # the mask agreement round: no faults, not a training round
        faults = [f for f in self.sc.faults if f.round == rep.round]
        faults += self.sc.draw(rep.round, view.selected, self.rng)
        for f in faults:
            if f.kind != "worker-kill" and f.agent is not None and f.agent not in view.selected:
                self._skip(r, f"{f.kind} {f.agent}: not selected")
                continue
            self._schedule(r, f)

    def _on_closed(self, r: int) -> bool:
        """True when this is the round's close (not a retained copy delivered again)."""
        rep = self.reports.get(r)
        c = self.observer.rounds[r].closed
        if rep is None or rep.status != "open":
            return False
        rep.status, rep.participants, rep.dropped = c.status, list(c.participants), list(c.dropped)
        rep.bytes_received = c.bytes_received
        rep.close_s = time.monotonic() - self.started_at[r]
        for agent in self.stopped.pop(r, []):
            self.cluster.kill(agent, signal.SIGCONT)  # the straggler wakes after the close
        for i, (_, _, rr, what) in reversed(list(enumerate(self.arms))):
            if rr == r:
                self._skip(r, f"{what}: the round closed first")
                del self.arms[i]
        return True

    def _tick(self) -> None:
        now = time.monotonic()
        due = [p for p in self.pending if p.when <= now]
        self.pending = [p for p in self.pending if p.when > now]
        for p in due:
            p.action()
        fired = [a for a in self.arms if a[0]()]
        self.arms = [a for a in self.arms if a not in fired]
        for _, action, _, _ in fired:
            action()

    # ------------------------------------------------------------------ run
    def run(self, on_round: Callable[[RoundReport], None] | None = None) -> FieldReport:
        sc, cluster = self.sc, self.cluster
        oracle_dir = self.workdir / "oracle"
        for a, proxy in self.proxies.items():
            proxy.start()
            own = cluster.endpoint(sc.agent_ids.index(a))  # its node first, then the others (a cluster)
            cluster.agent_overrides[a] = {
                "broker": own.model_copy(update={"port": proxy.port, "keepalive": sc.keepalive_s}),
                "faults": cfgmod.FaultSettings(oracle_dir=oracle_dir, test_plaintext_dumps=True,
                                               chunk_delay_s=sc.chunk_delay_s)}
        cluster.write_configs(min_agents=sc.min_agents)
        t0 = time.monotonic()
        last = sc.rounds + self.offset
        interrupted = False
        try:
            self._start_broker()
            cluster.start_role("keyauthority")
            cluster.start_role("aggregator")
            for name in cluster.worker_ids:
                cluster.start_role(name)
            for host, agents in sc.hosts.items():
                if sc.agents_per_host > 1:
                    (self.workdir / "configs" / f"{host}.txt").write_text(
                        "".join(f"{cluster.config_path(a)}\n" for a in agents))
                self._start_proc(host)
            self.observer = Observer(cluster.port, watch_uploads_of="+", collect_results=True)
            self.observer.connect()
            end = t0 + sc.time_limit_s
            finished_at = None
            while time.monotonic() < end:
                event = self.observer.poll(timeout=0.05)
                if event and event[0] == "start":
                    self._on_start(event[1])
                elif event and event[0] == "closed":
                    if self._on_closed(event[1]) and on_round and event[1] > self.offset:
                        on_round(self.reports[event[1]])
                self._tick()
                closed = [r for r, rep in self.reports.items() if rep.status != "open" and r > self.offset]
                if len(closed) >= sc.rounds and all(r in self.observer.results or self.reports[r].status != "aggregated"
                                                    for r in closed):
                    break
                code = cluster.procs["aggregator"].poll()
                if code is not None and not self.pending:
                    if code != 0:
                        log.error("the aggregator exited with %s; see %s", code, self.workdir / "logs/aggregator.log")
                        break
                    finished_at = finished_at or time.monotonic()
                    if time.monotonic() - finished_at > 15:  # its last words had time to arrive
                        log.error("the aggregator finished, but not every round was seen to close")
                        break
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: stopping every process, then reporting the rounds that closed")
        finally:
            for agents in self.stopped.values():
                for agent in agents:
                    cluster.kill(agent, signal.SIGCONT)
            if self.observer:
                self.observer.close()
            cluster.stop_all()
            if self.mosquitto:
                self.mosquitto.stop()
            if self.rabbitmq:
                self.rabbitmq.stop()
            for proxy in self.proxies.values():
                proxy.stop()
        wall = time.monotonic() - t0
        if interrupted:
            last = max([r for r, rep in self.reports.items() if rep.status != "open"], default=self.offset)
        report = self._verify(oracle_dir, last, wall)
        report.interrupted = interrupted
        return report

    def _verify(self, oracle_dir: Path, last: int, wall: float) -> FieldReport:
        ctx = oracle.secret_context(self.workdir / "state/keyauthority")
        rounds = []
        for r in range(self.offset + 1, last + 1):
            rep = self.reports.get(r) or RoundReport(round=r - self.offset, wire_round=r, status="never started")
            view = self.observer.rounds.get(r) if self.observer else None
            v = oracle.check_round(ctx, oracle_dir, r, self.observer.results.get(r) if self.observer else None,
                                   view.closed if view else None, self.sc.tolerance)
            rep.ok, rep.max_error, rep.verdict = v.ok, v.max_error, v.detail
            rounds.append(rep)
        resumes = sum(self.cluster.log_text(n).count("after a restart:") for n in ["aggregator",
                                                                                     *self.cluster.worker_ids])
        return FieldReport(scenario=self.sc.name, broker=self.broker_kind, agents=self.sc.agents, rounds=rounds,
                           wall_s=wall, faults_applied=self.applied, faults_skipped=self.skipped,
                           aggregator_resumes=resumes)


def write_json(report: FieldReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2))
