"""``fedmq demo``: the whole system on one machine, as separate processes.

Embedded broker, key authority, aggregator and N agents each run as their own
``python -m fedmq`` process with their own YAML config, exactly as they would on
separate hosts. The demo watches the broker like an operator would (round starts,
round closes, telemetry), SIGKILLs one agent in the middle of a round to show the
round still closes, and prints a table per round.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmq.runtime import config as cfgmod
from fedmq.privacy import masking
from fedmq.protocol import wire
from fedmq.tools.local_cluster import Cluster, Observer, RoundView, free_port


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _phase(view: RoundView, name: str) -> float | None:
    return _mean([t.phases[name].wall_s for t in view.telemetry.values() if name in t.phases])


def render(rounds: dict[int, RoundView], console: Console, title: str) -> float | None:
    table = Table(title=title)
    for col in ("round", "status", "agents", "dropped", "accuracy", "uploaded",
                "train s", "encrypt s", "aggregate s", "decrypt s"):
        table.add_column(col, justify="right")
    final = None
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for rnd in sorted(r for r in rounds if r > 0):
        v = rounds[rnd]
        c = v.closed
        acc = _mean([t.accuracy for t in v.telemetry.values() if t.accuracy is not None])
        if c and c.status == "aggregated" and acc is not None:
            final = acc
        dropped = ", ".join(c.dropped) if c else "-"
        if v.killed:
            dropped = dropped.replace(v.killed, f"{v.killed} (SIGKILL)")
        status = (c.status if c else "open") if v.purpose == "train" else "mask agreed" if c else "agreeing"
        table.add_row(str(rnd), status,
                      f"{len(c.participants)}/{len(v.selected)}" if c else "-", dropped,
                      "-" if acc is None else f"{acc:.4f}", f"{c.bytes_received / 1e6:.2f} MB" if c else "-",
                      fmt(_phase(v, "train")), fmt(_phase(v, "encrypt")), fmt(c.agg_s if c else None),
                      fmt(_phase(v, "decrypt")))
    console.print(table)
    return final


def run_demo(*, agents: int, rounds: int, kill_round: int, workdir: Path | None, chunk_kib: int,
             timeout: float, protection: wire.Protection | None = None, workload: str | None = None,
             workload_options: dict | None = None, data_root: Path | None = None) -> int:
    """``rounds`` and ``kill_round`` count training rounds; a sensitivity-mode selective
    task first agrees on its mask in an extra encrypted round."""
    protection = protection or wire.Protection()
    agreement = int(masking.needs_agreement(protection.scheme, protection.p, protection.mode))
    last_round = rounds + agreement
    kill_round = kill_round + agreement if kill_round else 0
    console = Console(width=max(Console().width, 120))
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedmq-demo-")
        workdir = Path(tmp.name)
    quantized = protection.scheme != "ckks"
    cluster = Cluster(workdir=workdir, port=free_port(), n_agents=agents, rounds=rounds,
                      chunk_size=chunk_kib * 1024, protection=protection,
                      quantization=cfgmod.QuantizationSettings(n_ref=1437 // agents, max_agents=max(8, agents))
                      if quantized else None)
    if workload is not None:
        # Any workload: each agent gets its own data directory (DATA_ROOT/agent-N, or an
        # empty one in the work dir, which a scaffolded workload fills with synthetic data).
        for a in cluster.agent_ids:
            data = (data_root or workdir / "data") / a
            data.mkdir(parents=True, exist_ok=True)
            cluster.agent_overrides[a] = {"workload": cfgmod.WorkloadSettings(
                name=workload, data_dir=data, options=workload_options or {})}
    victim = cluster.agent_ids[-1] if kill_round else None
    if victim:
        # The victim uploads slowly, in several chunks even when its update is small
        # (quantized), so that the SIGKILL lands mid-upload, deterministically.
        cluster.agent_overrides[victim] = {**cluster.agent_overrides.get(victim, {}),
                                           "faults": cfgmod.FaultSettings(chunk_delay_s=0.4),
                                           "chunk_size": 4096 if quantized else chunk_kib * 1024}
    cluster.write_configs(min_agents=max(2, agents // 2))
    console.print(f"[bold]fedmq demo[/]: {agents} agents, {rounds} rounds, broker on 127.0.0.1:{cluster.port}, "
                  f"work dir {workdir}")
    observer = None
    try:
        cluster.start_all()
        observer = Observer(cluster.port, watch_uploads_of=victim)
        observer.connect()
        end = time.monotonic() + timeout
        last_closed, telemetry_wait_until = 0, None
        while time.monotonic() < end:
            event = observer.poll()
            if event and event[0] == "start":
                console.print(f"round {event[1]} started with {len(observer.rounds[event[1]].selected)} agents")
            elif event and event[0] == "upload" and event[1] == kill_round:
                if not observer.rounds.setdefault(event[1], RoundView()).killed:
                    cluster.kill(victim)
                    observer.rounds[event[1]].killed = victim
                    console.print(f"  [red]SIGKILL {victim}[/] in the middle of its upload in round {event[1]}")
            elif event and event[0] == "closed":
                c = observer.rounds[event[1]].closed
                console.print(f"round {event[1]} {c.status}: {c.reason}")
                last_closed = max(last_closed, event[1])
                if last_closed >= last_round:
                    telemetry_wait_until = time.monotonic() + 10
            if telemetry_wait_until is not None:
                view = observer.rounds[last_round]
                if set(view.closed.participants) <= set(view.telemetry) or time.monotonic() > telemetry_wait_until:
                    break
            if cluster.procs["aggregator"].poll() not in (None, 0):
                console.print(f"[red]aggregator exited with {cluster.procs['aggregator'].returncode}; "
                              f"see {workdir / 'logs/aggregator.log'}[/]")
                break
    finally:
        if observer:
            observer.close()
        cluster.stop_all()
    what = protection.scheme if protection.scheme == "quantize" else f"{protection.scheme}, p={protection.p:g}"
    what += (f", {protection.mode} selection" if 0 < protection.p < 1 and protection.scheme != "quantize" else "")
    what += ", secure masking" if protection.secure_masking else ""
    final = render(observer.rounds if observer else {}, console, f"fedmq demo: FedAvg on {workload or 'digits'} ({what})")
    closed = sum(1 for r, v in (observer.rounds.items() if observer else []) if v.closed and
                 v.closed.status == "aggregated" and r > 0 and v.purpose == "train")
    agreed = " (+ the mask agreement round)" if agreement else ""
    print(f"demo: {closed} training rounds closed{agreed}, final accuracy {final if final is not None else 0:.2f}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if closed == rounds else 1
