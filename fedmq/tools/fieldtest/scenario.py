"""The scenario file of a field test: the fleet, the task, and the fault schedule.

Faults are either listed (``faults:``) or drawn (``random_faults:``) from a seeded
generator, so a scenario replays the same schedule every time it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from fedmq.runtime import config as cfgmod
from fedmq.protocol.wire import Protection

FaultKind = Literal["kill", "stop", "network", "broker-restart", "aggregator-kill", "worker-kill",
                    "broker-node-kill"]


class Fault(cfgmod._Section):
    """One fault, applied in training round ``round`` (1-based, as the aggregator counts)."""

    round: Annotated[int, Field(ge=1)]
    kind: FaultKind
    agent: str | None = None  # kill, stop, network; worker-kill: the shard worker (shard-K)
    # kill / aggregator-kill: 'training' = as the round starts, before any chunk of the
    # agent (of any agent, for the aggregator) is seen; 'upload' = at its first chunk;
    # 'unmask' (aggregator, secure masking) = once it has asked for the round's correction.
    phase: Literal["training", "upload", "unmask"] = "training"
    mode: Literal["drop", "blackhole", "delay"] = "drop"  # network
    after_s: Annotated[float, Field(ge=0)] = 0.0  # wait this long after the round starts (training phase)
    duration_s: Annotated[float, Field(gt=0)] = 3.0  # network outage / broker down time
    delay_s: Annotated[float, Field(ge=0)] = 0.3  # network mode 'delay'
    restart_after_s: Annotated[float, Field(ge=0)] | None = 2.0  # killed process comes back (None: never)
    node: Annotated[int, Field(ge=1, le=2)] = 1  # broker-node-kill: which node of the cluster (0 hosts the services)

    @model_validator(mode="after")
    def _agent_given(self) -> Fault:
        if self.kind in ("kill", "stop", "network", "worker-kill") and not self.agent:
            raise ValueError(f"a {self.kind} fault needs 'agent'" + (" (the worker, shard-K)"
                                                                     if self.kind == "worker-kill" else ""))
        if self.phase == "unmask" and self.kind != "aggregator-kill":
            raise ValueError("phase 'unmask' is the aggregator's (kind: aggregator-kill)")
        return self


class RandomFaults(cfgmod._Section):
    """Per round, ``fraction`` of the fleet gets one fault drawn from ``kinds``."""

    fraction: Annotated[float, Field(gt=0, le=1)] = 0.3
    kinds: list[Literal["kill-training", "kill-upload", "stop", "drop", "blackhole", "delay"]] = [
        "kill-training", "kill-upload", "stop", "drop", "blackhole", "delay"]
    aggregator_kill_rounds: list[int] = []
    aggregator_unmask_kill_rounds: list[int] = []  # secure masking: killed between asking and unmasking
    broker_restart_rounds: list[int] = []
    # Agents grouped in host processes (Scenario.agents_per_host > 1): this fraction of the
    # hosts holding selected agents is also killed (training or mid-upload) or stopped,
    # every agent of the host with it — a machine or rack lost, not one agent.
    host_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    broker_node_kill_rounds: list[int] = []  # broker rabbitmq-cluster: node 1 killed mid-round, for good
    worker_kill_rounds: list[int] = []  # sharded: a shard worker (in turn) killed -9 mid-round, restarted


class Scenario(cfgmod._Section):
    name: str
    agents: Annotated[int, Field(ge=2, le=1000)]
    # > 1: agents run as threads of host processes (fedmq fleet-host), this many each —
    # how 200 agents fit in memory here; kill/stop faults then take the whole host.
    agents_per_host: Annotated[int, Field(ge=1, le=200)] = 1
    rounds: Annotated[int, Field(ge=1)]
    # rabbitmq-cluster: three RabbitMQ nodes of our own; agent i on node i mod 3 (through its
    # proxy), the other nodes as its failover list; the services on node 0.
    broker: Literal["auto", "mosquitto", "embedded", "rabbitmq-cluster"] = "auto"
    min_agents: Annotated[int, Field(ge=1)] = 2
    round_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    selection_grace_s: Annotated[float, Field(ge=0)] = 5.0
    offline_grace_s: Annotated[float, Field(ge=0)] = 5.0  # the aggregator's patience with last wills
    chunk_size: Annotated[int, Field(ge=1024)] = 16 * 1024
    chunk_delay_s: Annotated[float, Field(ge=0)] = 0.02  # paces uploads so 'mid-upload' is a real moment
    keepalive_s: Annotated[int, Field(ge=5)] = 10
    protection: Protection = Protection()
    # The policy's bound on one update's sample count. Masked float parts are 32-bit
    # fixed point sized for it: a tight bound is finer resolution (secure_aggregation.frac_bits).
    max_samples: Annotated[int, Field(ge=1)] = 1_000_000
    seed: int = 0
    time_limit_s: Annotated[float, Field(gt=0)] = 600.0
    tolerance: Annotated[float, Field(gt=0)] = 1e-6  # max |aggregate - exact weighted mean|
    shard_workers: Annotated[int, Field(ge=0, le=16)] = 0  # sharded aggregation: workers beside the root
    faults: list[Fault] = []
    random_faults: RandomFaults | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.protection.scheme != "ckks":
            raise ValueError("field tests check CKKS aggregates exactly; protection.scheme must be 'ckks'")
        if self.min_agents > self.agents:
            raise ValueError(f"min_agents {self.min_agents} exceeds agents {self.agents}")
        masked = self.protection.secure_masking and self.protection.p < 1
        unmask_kills = [f for f in self.faults if f.phase == "unmask"] + (
            self.random_faults.aggregator_unmask_kill_rounds if self.random_faults else [])
        if unmask_kills and not masked:
            raise ValueError("an aggregator kill mid-unmasking needs protection.secure_masking with p < 1")
        ids = set(self.agent_ids)
        workers = {f"shard-{k + 1}" for k in range(self.shard_workers)}
        if self.random_faults and self.random_faults.worker_kill_rounds and not workers:
            raise ValueError("worker_kill_rounds needs shard_workers")
        clustered = self.broker == "rabbitmq-cluster"
        node_kills = [f for f in self.faults if f.kind == "broker-node-kill"] + (
            self.random_faults.broker_node_kill_rounds if self.random_faults else [])
        restarts = [f for f in self.faults if f.kind == "broker-restart"] + (
            self.random_faults.broker_restart_rounds if self.random_faults else [])
        if node_kills and not clustered:
            raise ValueError("a broker node kill needs broker: rabbitmq-cluster")
        if restarts and clustered:
            raise ValueError("broker: rabbitmq-cluster loses nodes (broker-node-kill), it is not restarted whole")
        for f in self.faults:
            if f.kind == "worker-kill":
                if f.agent not in workers:
                    raise ValueError(f"worker-kill names {f.agent!r}; the shard workers are {sorted(workers)}")
            elif f.agent is not None and f.agent not in ids:
                raise ValueError(f"fault names {f.agent!r}, which is not one of agent-1..agent-{self.agents}")
            if f.round > self.rounds:
                raise ValueError(f"fault in round {f.round}, but the scenario has {self.rounds} rounds")
        return self

    @property
    def agent_ids(self) -> list[str]:
        return [f"agent-{i + 1}" for i in range(self.agents)]

    @property
    def hosts(self) -> dict[str, list[str]]:
        """host process -> its agents (each agent its own process when agents_per_host is 1)."""
        ids, n = self.agent_ids, self.agents_per_host
        if n == 1:
            return {a: [a] for a in ids}
        return {f"host-{k // n + 1}": ids[k:k + n] for k in range(0, len(ids), n)}

    def host_of(self, agent: str) -> str:
        return agent if self.agents_per_host == 1 else f"host-{self.agent_ids.index(agent) // self.agents_per_host + 1}"

    def draw(self, rnd: int, selected: list[str], rng: np.random.Generator) -> list[Fault]:
        """The random faults of one round, drawn among the agents it selected (a fault
        on an agent that takes no part would test nothing)."""
        rf = self.random_faults
        if rf is None:
            return []
        out: list[Fault] = []
        count = min(len(selected), max(1, round(rf.fraction * len(selected))))
        for agent in sorted(rng.choice(sorted(selected), size=count, replace=False).tolist()):
            pick = rf.kinds[int(rng.integers(len(rf.kinds)))]
            after = float(rng.uniform(0.0, 1.0))
            if pick.startswith("kill"):
                out.append(Fault(round=rnd, kind="kill", agent=agent, phase=pick.split("-")[1], after_s=after))
            elif pick == "stop":
                out.append(Fault(round=rnd, kind="stop", agent=agent, after_s=after))
            else:
                out.append(Fault(round=rnd, kind="network", agent=agent, mode=pick, after_s=after,
                                 duration_s=float(rng.uniform(1.0, 4.0))))
        if rf.host_fraction and self.agents_per_host > 1:
            hosts = sorted({self.host_of(a) for a in selected})
            n_hosts = min(len(hosts), max(1, round(rf.host_fraction * len(hosts))))
            for host in sorted(rng.choice(hosts, size=n_hosts, replace=False).tolist()):
                first = next(a for a in sorted(selected, key=self.agent_ids.index) if self.host_of(a) == host)
                pick = ("kill-training", "kill-upload", "stop")[int(rng.integers(3))]
                after = float(rng.uniform(0.0, 1.0))
                out.append(Fault(round=rnd, kind="stop", agent=first, after_s=after) if pick == "stop" else
                           Fault(round=rnd, kind="kill", agent=first, phase=pick.split("-")[1], after_s=after))
        if rnd in rf.aggregator_kill_rounds:
            out.append(Fault(round=rnd, kind="aggregator-kill", phase="upload"))
        if rnd in rf.aggregator_unmask_kill_rounds:
            out.append(Fault(round=rnd, kind="aggregator-kill", phase="unmask"))
        if rnd in rf.worker_kill_rounds:
            k = rf.worker_kill_rounds.index(rnd) % self.shard_workers
            out.append(Fault(round=rnd, kind="worker-kill", agent=f"shard-{k + 1}", phase="upload"))
        if rnd in rf.broker_node_kill_rounds:
            out.append(Fault(round=rnd, kind="broker-node-kill", node=1, after_s=1.0, restart_after_s=None))
        if rnd in rf.broker_restart_rounds:
            out.append(Fault(round=rnd, kind="broker-restart", after_s=0.5))
        return out


def load_scenario(path: str | Path) -> Scenario:
    return cfgmod.load(Scenario, path)
