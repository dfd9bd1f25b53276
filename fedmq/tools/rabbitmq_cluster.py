"""A RabbitMQ cluster of our own on loopback: three nodes (own names, ports, data
dirs and Erlang cookie — never the system's node), each with the MQTT plugin, joined
with ``rabbitmqctl join_cluster``.

MQTT sessions of ``clean_session=false`` clients live in **quorum queues**
(``mqtt.durable_queue_type = quorum``) replicated on every node, so a client whose
node dies reconnects to another (``broker.failover``), finds its session
(``session_present``) and gets the QoS 1 messages queued meanwhile. What RabbitMQ
3.10 does *not* replicate is the retained-message store: it is node-local
(rabbitmq-server#8096) — see the README, "A clustered broker".
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.tools.local_broker import RabbitMQProcess

log = logging.getLogger("fedmq.cluster")
CLUSTER_CONF = "mqtt.durable_queue_type = quorum\ncluster_partition_handling = pause_minority\n"


@dataclass
class RabbitMQCluster:
    workdir: Path
    mqtt_ports: list[int]
    nodes: list[RabbitMQProcess] = field(default_factory=list)

    def start(self) -> float:
        """Boot every node, join the others to the first; returns the seconds it took."""
        t0 = time.monotonic()
        cookie = secrets.token_hex(16)
        self.nodes = [RabbitMQProcess(self.workdir / f"node-{i}", port, cookie=cookie, extra_conf=CLUSTER_CONF)
                      for i, port in enumerate(self.mqtt_ports)]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_booted()
        first = self.nodes[0]
        for node in self.nodes[1:]:  # one at a time: the Raft cluster of client ids grows by one
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
            node.wait_booted()
        log.info("RabbitMQ cluster of %d nodes up in %.0fs: %s", len(self.nodes), time.monotonic() - t0,
                 [n.node for n in self.nodes])
        return time.monotonic() - t0

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.ctl("stop", timeout=60)
            except Exception:  # noqa: BLE001 - dead or stuck: the process tree goes below
                pass
            node.stop()
