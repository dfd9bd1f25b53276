"""Prometheus metrics of the aggregator, served on a loopback port when configured.

Operators already scrape Prometheus; these are the numbers they alert on: rounds
closed by outcome, how long rounds take, agents online, bytes and updates
accepted, messages rejected, and each device's last reported phase times and peak
memory. A registry of our own keeps tests (several aggregators in one process)
from colliding in the global one.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedmq.protocol import wire

log = logging.getLogger("fedmq.aggregator.metrics")


class Metrics:
    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("fedmq_rounds_total", "Rounds closed, by outcome", ["status"], registry=r)
        self.round_seconds = Histogram("fedmq_round_duration_seconds", "Round open to close",
                                       buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        self.participants = Gauge("fedmq_round_participants", "Agents in the last closed round", registry=r)
        self.agents_online = Gauge("fedmq_agents_online", "Agents currently online", registry=r)
        self.update_bytes = Counter("fedmq_update_bytes_total", "Bytes of accepted update chunks", registry=r)
        self.updates = Counter("fedmq_updates_folded_total", "Updates verified and folded into a sum", registry=r)
        self.rejected = Counter("fedmq_messages_rejected_total", "Messages rejected (malformed, late, ...)",
                                registry=r)
        self.phase_seconds = Gauge("fedmq_agent_phase_seconds", "Wall time of a phase in the agent's last round",
                                   ["agent", "phase"], registry=r)
        self.agent_peak_rss = Gauge("fedmq_agent_peak_rss_bytes", "Agent peak RSS in its last round", ["agent"],
                                    registry=r)
        self.workload = Gauge("fedmq_workload_metric", "What the agent's workload reported for its last round",
                              ["agent", "metric"], registry=r)
        self.dp_epsilon = Gauge("fedmq_dp_epsilon", "Differential privacy spent so far (epsilon at the task's "
                                "delta)", registry=r)
        self.port = port
        if port:
            start_http_server(port, addr=host, registry=r)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def telemetry(self, agent: str, tele: wire.Telemetry) -> None:
        for phase, cost in tele.phases.items():
            self.phase_seconds.labels(agent, phase).set(cost.wall_s)
        self.agent_peak_rss.labels(agent).set(tele.peak_rss)
        for name, value in tele.metrics.items():
            self.workload.labels(agent, name).set(value)
