"""Shared fixtures for integration tests: a real deployment of processes on loopback."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from fedmq.runtime import config as cfgmod
from fedmq.protocol import wire
from fedmq.tools.fieldtest import oracle as oracle_mod
from fedmq.tools.local_cluster import Cluster, Observer, free_port


@contextlib.contextmanager
def running_cluster(tmp_path: Path, *, n_agents: int, rounds: int, port: int | None = None,
                    embedded_broker: bool = True, overrides: dict | None = None, chunk_size: int = 16 * 1024,
                    min_agents: int = 2, watch: str | None = None, round_timeout_s: float = 60.0,
                    slow_agents: dict[str, float] | None = None, target_agents: int | None = None,
                    protection: wire.Protection | None = None, quantization=None,
                    aggregator_overrides: dict | None = None, dp: cfgmod.DpSettings | None = None,
                    shard_workers: int = 0):
    cluster = Cluster(workdir=tmp_path, port=port or free_port(), n_agents=n_agents, rounds=rounds,
                      chunk_size=chunk_size, round_timeout_s=round_timeout_s, target_agents=target_agents,
                      protection=protection or wire.Protection(), quantization=quantization, dp=dp,
                      shard_workers=shard_workers)
    cluster.aggregator_overrides.update(aggregator_overrides or {})
    oracle = tmp_path / "oracle"
    for a in cluster.agent_ids:
        delay = (slow_agents or {}).get(a, 0.0)
        cluster.agent_overrides[a] = {"faults": cfgmod.FaultSettings(
            oracle_dir=oracle, test_plaintext_dumps=True, chunk_delay_s=delay),
                                      **(overrides or {}).get(a, {})}
    cluster.write_configs(min_agents=min_agents)
    observer = None
    try:
        cluster.start_all(embedded_broker=embedded_broker)
        observer = Observer(cluster.port, watch_uploads_of=watch, collect_results=True)
        observer.connect()
        yield cluster, observer
    finally:
        if observer:
            observer.close()
        cluster.stop_all()


def secret_context(cluster: Cluster):
    """The test-only oracle key: the key authority's own secret context file."""
    return oracle_mod.secret_context(cluster.workdir / "state/keyauthority")


def oracle(cluster: Cluster, agent: str, name: str):
    return oracle_mod.dump(cluster.workdir / "oracle", agent, name)


def plaintext_fedavg(cluster: Cluster, rnd: int, agents: list[str], key: str = "weights",
                     name: str | None = None) -> tuple[np.ndarray, int]:
    return oracle_mod.plaintext_fedavg(cluster.workdir / "oracle", agents, name or f"round{rnd}", key)


def decrypted_average(cluster: Cluster, result, mask: np.ndarray | None = None) -> np.ndarray:
    """The global model from an encrypted result, as an agent rebuilds it."""
    return oracle_mod.decrypted_average(secret_context(cluster), result, mask)


@pytest.fixture
def cluster_factory(tmp_path):
    return lambda **kw: running_cluster(tmp_path, **kw)


def mosquitto_binary() -> str:
    from fedmq.tools.local_broker import mosquitto_binary as find

    found = find()
    if found is None:
        pytest.fail("mosquitto is not installed: .ci/run installs Debian's mosquitto package")
    return found


@pytest.fixture
def mosquitto(tmp_path):
    """A mosquitto of the test's own, with its own config, on a free loopback port."""
    from fedmq.tools.local_broker import MosquittoProcess

    mosquitto_binary()
    broker = MosquittoProcess(tmp_path / "mosquitto", free_port(), persistence=False)
    broker.start()
    try:
        yield broker.port
    finally:
        broker.stop()


def drain_topics(session, seconds: float) -> list[str]:
    """The topics a session receives within ``seconds``."""
    import queue
    import time

    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got.append(session.inbox.get(timeout=0.1).topic)
        except queue.Empty:
            pass
    return got
