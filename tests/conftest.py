"""Shared fixtures for integration tests: a real deployment of processes on loopback."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from fedmq import config as cfgmod
from fedmq import he, masking, wire
from fedmq.local_cluster import Cluster, Observer, free_port


@contextlib.contextmanager
def running_cluster(tmp_path: Path, *, n_agents: int, rounds: int, port: int | None = None,
                    embedded_broker: bool = True, overrides: dict | None = None, chunk_size: int = 16 * 1024,
                    min_agents: int = 2, watch: str | None = None, round_timeout_s: float = 60.0,
                    slow_agents: dict[str, float] | None = None, target_agents: int | None = None,
                    protection: wire.Protection | None = None, quantization=None):
    cluster = Cluster(workdir=tmp_path, port=port or free_port(), n_agents=n_agents, rounds=rounds,
                      chunk_size=chunk_size, round_timeout_s=round_timeout_s, target_agents=target_agents,
                      protection=protection or wire.Protection(), quantization=quantization)
    oracle = tmp_path / "oracle"
    for a in cluster.agent_ids:
        delay = (slow_agents or {}).get(a, 0.0)
        cluster.agent_overrides[a] = {"faults": cfgmod.FaultSettings(oracle_dir=oracle, chunk_delay_s=delay),
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
    return he.load_context((cluster.workdir / "state/keyauthority/ckks_secret_context.bin").read_bytes())


def oracle(cluster: Cluster, agent: str, name: str):
    return np.load(cluster.workdir / "oracle" / f"{agent}-{name}.npz")


def plaintext_fedavg(cluster: Cluster, rnd: int, agents: list[str], key: str = "weights",
                     name: str | None = None) -> tuple[np.ndarray, int]:
    dumps = [oracle(cluster, a, name or f"round{rnd}") for a in agents]
    total = sum(int(d["num_samples"]) for d in dumps)
    return sum(d[key] * int(d["num_samples"]) for d in dumps) / total, total


def decrypted_average(cluster: Cluster, result, mask: np.ndarray | None = None) -> np.ndarray:
    """The global model from an encrypted result, as an agent rebuilds it."""
    enc = np.zeros(0)
    if result.n_encrypted:
        enc = he.decrypt(secret_context(cluster), result.ciphertexts, result.n_encrypted) / result.total_weight
    if result.n_encrypted == result.n_params:
        return enc
    plain = np.frombuffer(result.plain_avg, dtype="<f4").astype(np.float64)
    if mask is None:
        mask = np.zeros(result.n_params, dtype=bool)
    return masking.merge(enc, plain, mask)


@pytest.fixture
def cluster_factory(tmp_path):
    return lambda **kw: running_cluster(tmp_path, **kw)


def mosquitto_binary() -> str:
    import shutil

    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)
    if found is None:
        pytest.fail("mosquitto is not installed: .ci/run installs Debian's mosquitto package")
    return found


@pytest.fixture
def mosquitto(tmp_path):
    """A mosquitto of the test's own, with its own config, on a free loopback port."""
    import subprocess

    from fedmq.local_cluster import wait_for_port

    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_packet_size 2097152\nlog_dest stdout\n")
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=15)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
