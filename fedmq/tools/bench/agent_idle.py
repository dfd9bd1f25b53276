"""``fedmq bench agent-idle``: the agent's resident memory while it waits for work.

A Raspberry Pi runs the agent all day and trains a few minutes an hour, so what
it costs idle matters. The agent imports torch and the HE library's heavy parts
only when a round needs them; this starts a real broker, key authority and one
agent, waits until the agent is enrolled and online, and samples its RSS (and
its unique set size, what it alone costs) for a few seconds. Target: <= 80 MB.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from fedmq.runtime import config as cfgmod
from fedmq.tools.local_cluster import Cluster, free_port

TARGET_MB = 80


def run(workdir: Path, sample_s: float = 3.0, workload: str | None = None) -> dict:
    """``workload``: configure the agent with that workload (its data dir empty: data
    and torch are loaded at the first round, which never comes here)."""
    cluster = Cluster(workdir=workdir, port=free_port(), n_agents=1, rounds=1)
    if workload is not None:
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cluster.agent_overrides["agent-1"] = {"workload": cfgmod.WorkloadSettings(name=workload, data_dir=data)}
    cluster.write_configs(min_agents=1)
    try:
        cluster.start_broker()
        cluster.start_role("keyauthority")
        agent = cluster.start_role("agent-1")
        end = time.monotonic() + 120
        while "online and waiting for rounds" not in cluster.log_text("agent-1"):
            if time.monotonic() > end or agent.poll() is not None:
                raise RuntimeError(f"agent never came online; see {workdir / 'logs/agent-1.log'}")
            time.sleep(0.1)
        proc = psutil.Process(agent.pid)
        rss, uss = [], []
        stop = time.monotonic() + sample_s
        while time.monotonic() < stop:
            info = proc.memory_full_info()
            rss.append(info.rss)
            uss.append(info.uss)
            time.sleep(0.1)
        heavy = sorted(m for m in ("torch", "tenseal", "sklearn", "matplotlib")
                       if any(f"/{m}/" in f.path for f in proc.memory_maps()))
        return {"workload": workload or "digits-mlp (legacy config)", "idle_rss_mb": max(rss) / 1e6, "idle_uss_mb": max(uss) / 1e6, "target_mb": TARGET_MB,
                "meets_target": max(rss) / 1e6 <= TARGET_MB, "samples": len(rss), "heavy_libraries_mapped": heavy}
    finally:
        cluster.stop_all()
