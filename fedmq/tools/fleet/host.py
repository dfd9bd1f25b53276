"""Many agents in one process: ``fedmq fleet-host``, which ``fedmq fleet`` starts.

Each agent is the real one — ``agent.service.Agent`` with its own MQTT connection,
client id, credential, last will, enrollment, state directory, training and
encryption — run in a thread of this process. What the agents of a host share is
the interpreter and the imported libraries (torch, TenSEAL: ~300 MB once instead of
per agent), so one machine can hold a thousand; nothing of the protocol is shared,
replayed or skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from fedmq.runtime import config as cfgmod

log = logging.getLogger("fedmq.fleet")


def _run_agent(agent, stop: threading.Event) -> None:
    try:
        agent.run(stop)
    except Exception:  # one agent's failure is a finding to log, not the host's end
        log.exception("%s stopped with an error", agent.id)


def run_host(configs: list[Path], stop: threading.Event, start_interval_s: float = 0.02) -> int:
    """Run one agent per config until ``stop``; returns how many stopped with an error."""
    import torch

    from agent.service import Agent

    # Hundreds of agents train at once: one torch thread each, or they fight for cores.
    torch.set_num_threads(1)
    agents = [Agent(cfgmod.apply_profile(cfgmod.load(cfgmod.AgentConfig, path)), config_path=path)
              for path in configs]
    threads = []
    for agent in agents:
        t = threading.Thread(target=_run_agent, args=(agent, stop), name=agent.id, daemon=True)
        t.start()
        threads.append(t)
        time.sleep(start_interval_s)  # a connection storm is not what we measure
    log.info("fleet host: %d agents running", len(agents))
    stop.wait()
    for t in threads:
        t.join(timeout=10)
    for agent in agents:
        agent.stop()
    return sum(t.is_alive() for t in threads)
