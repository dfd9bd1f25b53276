"""Issue 17: a RabbitMQ cluster of three nodes of the test's own on loopback, agents
spread over the nodes with the others as their failover list; one node is killed
mid-round — its agents reconnect to another node, find their sessions, and the
round (and the next) completes exactly."""

from __future__ import annotations

import pytest

from fedmq.tools.fieldtest import oracle as oracle_mod
from fedmq.tools.local_broker import rabbitmq_binary
from fedmq.tools.local_cluster import Cluster, Observer, free_port
from fedmq.tools.rabbitmq_cluster import RabbitMQCluster
from fedmq.runtime import config as cfgmod
from tests.conftest import secret_context

pytestmark = [pytest.mark.slow, pytest.mark.long,
              pytest.mark.skipif(rabbitmq_binary() is None, reason="RabbitMQ is not installed here (.ci/run "
                                                                   "installs it)")]


def test_a_node_killed_mid_round_its_agents_fail_over_and_the_round_is_exact(tmp_path):
    rmq = RabbitMQCluster(tmp_path / "rabbitmq", [free_port() for _ in range(3)])
    rmq.start()
    cluster = observer = None
    try:
        cluster = Cluster(workdir=tmp_path, port=rmq.mqtt_ports[0], broker_ports=rmq.mqtt_ports, n_agents=6,
                          rounds=2, chunk_size=16 * 1024, round_timeout_s=90)
        for a in cluster.agent_ids:
            cluster.agent_overrides[a] = {"faults": cfgmod.FaultSettings(
                oracle_dir=tmp_path / "oracle", test_plaintext_dumps=True, chunk_delay_s=0.3)}
        cluster.write_configs(min_agents=2)
        # agent-2 and agent-5 are on node 1, the one we kill; the services on node 0.
        assert cfgmod.load(cfgmod.AgentConfig, cluster.config_path("agent-2")).broker.port == rmq.mqtt_ports[1]
        cluster.start_all(embedded_broker=False)
        observer = Observer(rmq.mqtt_ports[0], watch_uploads_of="+", collect_results=True)
        observer.connect()
        killed = []

        def kill_node1_mid_upload(event, rnd):
            seen, total = observer.upload_progress.get((1, "agent-2"), [0, 1])
            if not killed and rnd == 1 and 0 < seen < total:
                rmq.kill(1)
                killed.append(seen)

        observer.wait_for("closed", 1, timeout=240, on_event=kill_node1_mid_upload)
        assert killed, "node 1 was never killed mid-upload"
        for rnd in (1, 2):
            observer.wait_for("result", rnd, timeout=240)
            observer.wait_for("closed", rnd, timeout=60)
            closed = observer.rounds[rnd].closed
            assert closed.status == "aggregated", closed.reason
            verdict = oracle_mod.check_round(secret_context(cluster), tmp_path / "oracle", rnd,
                                             observer.results[rnd], closed, 1e-6)
            assert verdict.ok, verdict.detail
        assert observer.rounds[1].closed.participants == cluster.agent_ids  # node 1's agents made round 1 too
        for a in ("agent-2", "agent-5"):
            assert "reconnecting via broker node" in cluster.log_text(a)
    finally:
        if observer:
            observer.close()
        if cluster:
            cluster.stop_all()
        rmq.stop()
