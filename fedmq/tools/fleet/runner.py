"""``fedmq fleet --agents N``: N real agents in a few processes against one broker,
key authority and aggregator, with what each round costs.

The agents are real (``host.py``): each enrolls, trains the digits MLP on its shard,
encrypts its own update with TenSEAL and uploads it in chunks; nothing is replayed,
so the aggregator's intake, the broker's fan-in and the key authority's enrollment
meet what a fleet of that size sends. With ``verify`` every agent also writes its
plaintext update (test mode) and every round's result is checked against the exact
weighted mean of the round's participants (the field test's oracle).

Per round: close time (round start seen → close seen), bytes received, the
aggregator's fold time; per process group (broker, key authority, aggregator, the
agent hosts): peak RSS and CPU seconds, sampled with psutil.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from fedmq.protocol import wire
from fedmq.runtime import config as cfgmod
from fedmq.tools.fieldtest import oracle
from fedmq.tools.local_broker import MosquittoProcess, resolve_kind
from fedmq.tools.local_cluster import Cluster, Observer, free_port

log = logging.getLogger("fedmq.fleet")


@dataclass
class FleetSettings:
    agents: int
    processes: int = 4
    rounds: int = 3
    protection: wire.Protection = field(default_factory=wire.Protection)  # full CKKS
    broker: str = "auto"  # auto (mosquitto when installed) | mosquitto | embedded
    shards: int = 10  # agents train on shard (i mod shards) of digits: data per agent stays real at any N
    epochs: int = 1
    round_timeout_s: float = 300.0
    time_limit_s: float = 3600.0
    verify: bool = True
    keepalive_s: int = 120  # the agents' MQTT keep-alive (see run_fleet)
    workers: int = 0  # sharded aggregation: shard workers beside the root aggregator (0: one aggregator)


@dataclass
class FleetRound:
    round: int
    selected: int
    participants: int
    status: str
    close_s: float | None
    bytes_received: int
    agg_s: float
    exact: bool | None = None
    max_error: float | None = None


@dataclass
class FleetUsage:
    name: str
    processes: int
    peak_rss_mb: float  # the group's largest sum of RSS seen at one sample
    cpu_s: float


@dataclass
class FleetReport:
    agents: int
    processes: int
    workers: int
    broker: str
    protection: dict
    online_s: float | None  # hosts started → first round start (enrollment of the whole fleet)
    rounds: list[FleetRound]
    usage: list[FleetUsage]
    wall_s: float
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def ok(self) -> bool:
        return bool(self.rounds) and all(r.status == "aggregated" and r.exact is not False for r in self.rounds)

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class _Sampler(threading.Thread):
    """Peak RSS and CPU time of each group of processes, every ``interval`` seconds."""

    def __init__(self, groups: dict[str, list[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.groups, self.interval = groups, interval
        self.stop_event = threading.Event()
        self.peak: dict[str, float] = {g: 0.0 for g in groups}
        self.cpu: dict[str, dict[int, float]] = {g: {} for g in groups}
        self._procs = {pid: psutil.Process(pid) for pids in groups.values() for pid in pids}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            for name, pids in self.groups.items():
                rss = 0
                for pid in pids:
                    try:
                        p = self._procs[pid]
                        rss += p.memory_info().rss
                        t = p.cpu_times()
                        self.cpu[name][pid] = t.user + t.system
                    except psutil.Error:
                        continue  # exited: its last CPU reading stands
                self.peak[name] = max(self.peak[name], rss / 1e6)

    def usage(self) -> list[FleetUsage]:
        return [FleetUsage(name, len(pids), round(self.peak[name], 1), round(sum(self.cpu[name].values()), 2))
                for name, pids in self.groups.items()]


def _host_lists(cluster: Cluster, processes: int) -> list[list[Path]]:
    ids = cluster.agent_ids
    return [[cluster.config_path(a) for a in ids[k::processes]] for k in range(processes)]


def run_fleet(s: FleetSettings, workdir: Path, on_round=None) -> FleetReport:
    processes = max(1, min(s.processes, s.agents))
    port = free_port()
    cluster = Cluster(workdir=workdir, port=port, n_agents=s.agents, rounds=s.rounds, chunk_size=256 * 1024,
                      # Rounds wait for the whole fleet to be online, or 5 minutes with a quorum.
                      round_timeout_s=s.round_timeout_s, selection_grace_s=min(300.0, s.time_limit_s),
                      offline_grace_s=10.0, protection=s.protection, shard_workers=s.workers)
    cluster.aggregator_overrides.update(max_agents=max(1000, s.agents), wait_for_agents_s=s.time_limit_s)
    oracle_dir = workdir / "oracle"
    for i, a in enumerate(cluster.agent_ids):
        cluster.agent_overrides[a] = {
            # A hundred agents' threads share one interpreter's GIL on a busy machine: a paho
            # network loop can go quiet for tens of seconds (at 1,000 agents on 2 cores, 870
            # missed a 30 s keep-alive in round 1). Devices of their own keep the default.
            "broker": cfgmod.BrokerEndpoint(port=port, keepalive=s.keepalive_s),
            "data": cfgmod.DataSettings(shard=i % s.shards, num_shards=s.shards),
            "train": cfgmod.TrainSettings(epochs=s.epochs),
            "faults": cfgmod.FaultSettings(oracle_dir=oracle_dir if s.verify else None,
                                           test_plaintext_dumps=s.verify)}
    cluster.write_configs(min_agents=max(2, s.agents // 2))
    kind = resolve_kind(s.broker)
    mosquitto = MosquittoProcess(workdir / "mosquitto", port, persistence=False) if kind == "mosquitto" else None
    observer, sampler = None, None
    t0 = time.monotonic()
    started: dict[int, float] = {}
    closed_at: dict[int, float] = {}
    hosts_started = None
    try:
        if mosquitto:
            mosquitto.start()
        else:
            cluster.start_broker()
        cluster.start_role("keyauthority")
        cluster.start_role("aggregator")
        for w in cluster.worker_ids:
            cluster.start_role(w)
        observer = Observer(port, collect_results=s.verify)
        observer.connect()
        hosts_started = time.monotonic()
        for k, paths in enumerate(_host_lists(cluster, processes)):
            listing = workdir / "configs" / f"fleet-host-{k}.txt"
            listing.write_text("\n".join(str(p) for p in paths) + "\n")
            cluster.start(f"fleet-host-{k}", "fleet-host", "--list", str(listing))
        broker_pid = mosquitto.proc.pid if mosquitto else cluster.procs["broker"].pid
        sampler = _Sampler({"broker": [broker_pid], "keyauthority": [cluster.procs["keyauthority"].pid],
                            "aggregator": [cluster.procs["aggregator"].pid],
                            **({"shard workers": [cluster.procs[w].pid for w in cluster.worker_ids]}
                               if cluster.worker_ids else {}),
                            "agent hosts": [p.pid for n, p in cluster.procs.items() if n.startswith("fleet-host")]})
        sampler.start()
        end = t0 + s.time_limit_s
        while time.monotonic() < end:
            event = observer.poll(timeout=0.2)
            if event and event[0] == "start":
                started.setdefault(event[1], time.monotonic())
            elif event and event[0] == "closed":
                closed_at.setdefault(event[1], time.monotonic())
                if on_round:
                    on_round(event[1], observer.rounds[event[1]])
            done = [r for r in closed_at if r >= 1]
            if len(done) >= s.rounds and (not s.verify or all(
                    r in observer.results or observer.rounds[r].closed.status != "aggregated" for r in done)):
                break
            if cluster.procs["aggregator"].poll() not in (None, 0):
                log.error("the aggregator exited with %s; see %s", cluster.procs["aggregator"].returncode,
                          workdir / "logs/aggregator.log")
                break
    finally:
        if sampler:
            sampler.stop_event.set()
            sampler.join()
        if observer:
            observer.close()
        cluster.stop_all()
        if mosquitto:
            mosquitto.stop()
    rounds = []
    ctx = oracle.secret_context(workdir / "state/keyauthority") if s.verify else None
    for r in sorted(observer.rounds if observer else {}):
        view = observer.rounds[r]
        c = view.closed
        if r < 1 or c is None:
            continue
        if view.started_ts is not None and view.closed_ts is not None:  # the aggregator's own clock
            close_s = round(view.closed_ts - view.started_ts, 2)
        else:
            close_s = round(closed_at[r] - started[r], 2) if r in started and r in closed_at else None
        row = FleetRound(round=r, selected=len(view.selected), participants=len(c.participants), status=c.status,
                         close_s=close_s,
                         bytes_received=c.bytes_received, agg_s=round(c.agg_s, 3))
        if s.verify:
            verdict = oracle.check_round(ctx, oracle_dir, r, observer.results.get(r), c, 1e-6)
            row.exact, row.max_error = verdict.ok, verdict.max_error
        rounds.append(row)
    first_start = min(started.values()) if started else None
    return FleetReport(agents=s.agents, processes=processes, workers=s.workers, broker=kind, protection=asdict(s.protection),
                       online_s=round(first_start - hosts_started, 1) if first_start and hosts_started else None,
                       rounds=rounds, usage=sampler.usage() if sampler else [], wall_s=round(time.monotonic() - t0, 1))


def write_json(report: FleetReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2))
