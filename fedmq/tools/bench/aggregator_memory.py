"""``fedmq bench aggregator-memory``: the aggregator's peak RSS with many concurrent uploads.

A real broker, the real key authority and the real aggregator process; ``clients``
simulated agents in this process announce themselves online and, once selected,
upload the same encrypted update (the paper's CNN by default: 1,663,370
parameters) chunk by chunk, *interleaved* — every client's upload is in flight at
once, the worst case for an aggregator that would buffer partial uploads.

The simulated agents encrypt with the key authority's secret context file (a
benchmark shortcut instead of fifty enrollments; the aggregator never sees it).
The aggregator's peak resident set is read from ``/proc/<pid>/status`` (VmHWM) and
compared with the serialized size of one encrypted update: the target is a peak
of at most ``base + 3 x model``, against ``clients x model`` for an aggregator that
holds every upload in memory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import time
from pathlib import Path

import numpy as np
import psutil

from fedmq.runtime import config as cfgmod
from fedmq.privacy import he, protection
from fedmq.protocol import topics, wire
from fedmq.tools.fieldtest import oracle
from fedmq.tools.local_broker import MosquittoProcess, mosquitto_binary
from fedmq.tools.local_cluster import TASK, Cluster, free_port
from fedmq.runtime.mqtt_session import MqttSession

log = logging.getLogger("fedmq.tools.bench.aggregator_memory")


def _peak_rss(pid: int) -> int:
    """VmHWM: the kernel's own high-water mark of the process's resident set."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _wait_for(what: str, predicate, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        time.sleep(0.1)


def run(*, clients: int = 50, params: int = 1_663_370, chunk_kib: int = 256, workdir: Path,
        progress: bool = True) -> dict:
    from tqdm import tqdm

    cluster = Cluster(workdir=workdir, port=free_port(), n_agents=0, rounds=1, chunk_size=chunk_kib * 1024,
                      round_timeout_s=1800, selection_grace_s=600, target_agents=clients)
    cluster.write_configs(min_agents=clients)
    broker = MosquittoProcess(workdir / "mosquitto", cluster.port, persistence=False) if mosquitto_binary() else None
    sims: list[MqttSession] = []
    watcher = None
    t0 = time.monotonic()
    try:
        broker.start() if broker else cluster.start_broker()
        cluster.start_role("keyauthority")
        agg = cluster.start_role("aggregator")
        secret_file = workdir / "state/keyauthority/ckks_secret_context.bin"
        _wait_for("key authority keys", secret_file.exists, 120)
        time.sleep(0.5)
        secret = oracle.secret_context(workdir / "state/keyauthority")
        weights = np.random.default_rng(0).normal(0, 0.05, params)
        update = protection.protect_ckks(secret, weights, 10, np.ones(params, dtype=bool), "float32", clients, None)
        kind, body = wire.encode_body(update)
        # The same update as SEAL holds it in memory: 2 polynomials x primes x N words per ciphertext.
        prm = he.params_of(secret)
        in_memory = len(update.ciphertexts) * 2 * len(prm.coeff_mod_bit_sizes) * prm.poly_modulus_degree * 8
        del update, secret
        model_bytes = len(body)
        total = -(-len(body) // (chunk_kib * 1024))
        digest = wire.digest(body)

        _wait_for("aggregator start-up", lambda: "waiting for the public context" in cluster.log_text("aggregator")
                  or "loaded the public" in cluster.log_text("aggregator"), 120)
        _wait_for("public context at the aggregator", lambda: "loaded the public" in cluster.log_text("aggregator"),
                  120)
        time.sleep(1.0)
        base_rss = psutil.Process(agg.pid).memory_info().rss

        watcher = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port, persistent_session=False), "bench-watch")
        watcher.subscribe(topics.all_round_starts(TASK))
        watcher.subscribe(topics.all_round_closed(TASK))
        watcher.connect()
        for i in range(clients):
            agent = f"sim-{i + 1:03d}"
            offline = wire.encode_envelope(_single(wire.AgentStatus(state="offline"), agent))
            s = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port, persistent_session=False), agent,
                            will=(topics.agent_status(agent), offline))
            s.connect()
            s.send(topics.agent_status(agent), wire.AgentStatus(state="online"), task=TASK, rnd=0, retain=True)
            sims.append(s)
        start = _next(watcher, "round_start", 300)
        log.info("round %d started with %d selected", start.round, len(start.body.selected))
        if len(start.body.selected) != clients:
            raise RuntimeError(f"aggregator selected {len(start.body.selected)} of {clients} clients")

        peak = 0
        up0 = time.monotonic()
        chunk = chunk_kib * 1024
        bar = tqdm(total=total * clients, unit="chunk", desc=f"{clients} interleaved uploads",
                   disable=None if progress else True)
        for seq in range(total):
            infos = []
            for s in sims:
                env = wire.Envelope(kind=kind, task=TASK, round=start.round, sender=s.client_id, seq=seq, total=total,
                                    digest=digest, body=body[seq * chunk:(seq + 1) * chunk], ts=time.time())
                infos.append(s.publish(topics.update_chunk(TASK, start.round, s.client_id, seq),
                                       wire.encode_envelope(env)))
            for info in infos:  # the broker acknowledged this chunk of every client
                info.wait_for_publish(120)
            bar.update(len(infos))
            peak = max(peak, _peak_rss(agg.pid))
        bar.close()
        upload_s = time.monotonic() - up0
        closed = _next(watcher, "round_closed", 1800)
        peak = max(peak, _peak_rss(agg.pid))
        close_s = time.monotonic() - up0
        row = {
            "clients": clients, "params": params, "chunk_kib": chunk_kib, "chunks_per_update": total,
            "encrypted_update_bytes": model_bytes, "aggregator_base_rss_bytes": base_rss,
            "aggregator_peak_rss_bytes": peak, "peak_minus_base_bytes": peak - base_rss,
            "peak_minus_base_in_models": (peak - base_rss) / model_bytes,
            "target_models": 3.0, "meets_target": peak - base_rss <= 3 * model_bytes,
            "update_bytes_in_memory": in_memory, "peak_minus_base_in_memory_models": (peak - base_rss) / in_memory,
            "all_in_memory_would_need_bytes": clients * model_bytes,
            "participants": len(closed.body.participants), "status": closed.body.status,
            "upload_s": upload_s, "until_closed_s": close_s, "wall_s": time.monotonic() - t0,
            "broker": "mosquitto" if broker else "embedded", "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        }
        return row
    finally:
        for s in sims:
            s.close(flush_s=0.5)
        if watcher:
            watcher.close(flush_s=0.5)
        cluster.stop_all()
        if broker:
            broker.stop()


def _single(msg: object, agent: str) -> wire.Envelope:
    from fedmq.protocol.chunking import single

    return single(msg, task=TASK, rnd=0, sender=agent)


class _Seen:
    def __init__(self, round: int, body) -> None:
        self.round, self.body = round, body


def _next(session: MqttSession, family: str, timeout: float) -> _Seen:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = session.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if not msg.payload or topics.parse(msg.topic).family != family:
            continue
        env = wire.decode_envelope(msg.payload, max_bytes=1 << 26)
        return _Seen(env.round, wire.decode_body(env.kind, env.body))
    raise TimeoutError(f"no {family} within {timeout:.0f}s")


def write(row: dict, json_out: Path) -> None:
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(row, indent=2))

