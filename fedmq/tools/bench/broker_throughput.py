"""``fedmq bench broker``: chunk throughput through each broker, on loopback.

One publisher sends a stream of update-sized chunks (QoS 1, the envelopes the
agents send) and one subscriber with the aggregator's settings (persistent
session, manual acknowledgement after handling) receives them; the clock runs
from the first publish to the last chunk received. Brokers: the embedded amqtt,
a mosquitto of our own, and a RabbitMQ node of our own with its MQTT plugin —
each where installed. The figures pick the chunk size: large enough to amortize
per-message costs, small enough for a Pi's memory and a broker's packet limit.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmq.runtime import config as cfgmod
from fedmq.protocol import wire
from fedmq.protocol.chunking import split
from fedmq.tools.local_broker import MosquittoProcess, RabbitMQProcess, mosquitto_binary, rabbitmq_binary
from fedmq.tools.local_cluster import free_port, wait_for_port
from fedmq.runtime.mqtt_session import MqttSession

CHUNK_SIZES = (16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024)


def _measure(port: int, chunk_size: int, total_bytes: int) -> dict:
    body = os.urandom(total_bytes)
    envs = split("update", "bench", 1, "agent-1", body, chunk_size)
    payloads = [wire.encode_envelope(e) for e in envs]
    sub = MqttSession(cfgmod.BrokerEndpoint(port=port), f"bench-sub-{chunk_size}", manual_ack=True)
    sub.subscribe("updates/bench/#")
    sub.connect()
    pub = MqttSession(cfgmod.BrokerEndpoint(port=port, persistent_session=False), f"bench-pub-{chunk_size}")
    pub.connect()
    try:
        t0 = time.perf_counter()
        for i, payload in enumerate(payloads):
            pub.publish(f"updates/bench/1/agent-1/{i}", payload)
        got = 0
        end = time.monotonic() + 300
        while got < len(payloads):
            try:
                msg = sub.inbox.get(timeout=max(end - time.monotonic(), 0.01))
            except queue.Empty:
                break
            sub.ack(msg)
            got += 1
        secs = time.perf_counter() - t0
    finally:
        pub.close(flush_s=1)
        sub.close(flush_s=1)
    sent = sum(len(p) for p in payloads)
    return {"chunk_kib": chunk_size // 1024, "chunks": len(payloads), "received": got, "bytes": sent,
            "seconds": secs, "mb_per_s": sent / secs / 1e6, "chunks_per_s": got / secs}


def run(brokers: list[str], total_mb: int = 32, sizes=CHUNK_SIZES) -> list[dict]:
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(brokers) * len(sizes), desc="broker throughput", disable=None)
    for name in brokers:
        with tempfile.TemporaryDirectory(prefix=f"fedmq-bench-{name}-") as tmp:
            port = free_port()
            stop = _start(name, Path(tmp), port)
            if stop is None:
                rows.append({"broker": name, "skipped": f"{name} is not installed here"})
                bar.update(len(sizes))
                continue
            try:
                for size in sizes:
                    rows.append({"broker": name, **_measure(port, size, total_mb * 1024 * 1024)})
                    bar.update(1)
            finally:
                stop()
    bar.close()
    return rows


def _start(name: str, tmp: Path, port: int):
    if name == "mosquitto":
        if mosquitto_binary() is None:
            return None
        b = MosquittoProcess(tmp, port, persistence=False, max_packet_size=4 * 1024 * 1024)
        b.start()
        return b.stop
    if name == "rabbitmq":
        if rabbitmq_binary() is None:
            return None
        r = RabbitMQProcess(tmp, port)
        r.start()
        return r.stop
    log = open(tmp / "broker.log", "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen([sys.executable, "-m", "fedmq", "broker", "--port", str(port), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)
    return stop
