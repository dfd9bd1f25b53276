"""``fedmq bench scale``: the fleet at N agents, with one aggregator and with K shard
workers — round close time, fold time, bytes, and the peak RSS of the broker and the
aggregator(s) — written as JSON rows (one per run, as each run ends) and a PNG.

Every run is ``fedmq fleet`` (fedmq/tools/fleet/runner.py): real agents, real
encryption, a real broker, every round checked against the oracle. Round 1 is
reported apart: it includes the fleet's first connection storm and, for the
aggregator, its first fold of the task's model.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedmq.protocol import wire
from fedmq.tools.fleet.runner import FleetReport, FleetSettings, run_fleet

log = logging.getLogger("fedmq.bench")
AGENTS_PER_HOST = 125  # agents per fleet-host process (threads): 8 processes at 1,000


@dataclass
class ScaleRow:
    agents: int
    workers: int
    ok: bool
    rounds: int
    first_close_s: float | None
    close_s: float | None  # mean over rounds 2.. (round 1 apart)
    fold_s: float | None  # mean of the rounds' fold time (sharded: slowest shard + combining)
    mb_per_round: float | None
    aggregator_peak_rss_mb: float  # the root's (or the only) aggregator's
    worker_peak_rss_mb: float | None  # all shard workers together
    broker_peak_rss_mb: float
    wall_s: float


def row_of(rep: FleetReport) -> ScaleRow:
    later = [r for r in rep.rounds if r.round >= 2 and r.close_s is not None]
    first = next((r.close_s for r in rep.rounds if r.round == 1), None)
    usage = {u.name: u for u in rep.usage}
    mean = (lambda xs: round(statistics.fmean(xs), 2) if xs else None)  # noqa: E731
    return ScaleRow(
        agents=rep.agents, workers=rep.workers, ok=rep.ok, rounds=len(rep.rounds), first_close_s=first,
        close_s=mean([r.close_s for r in later]), fold_s=mean([r.agg_s for r in rep.rounds]),
        mb_per_round=mean([r.bytes_received / 1e6 for r in rep.rounds]),
        aggregator_peak_rss_mb=usage["aggregator"].peak_rss_mb if "aggregator" in usage else 0.0,
        worker_peak_rss_mb=usage["shard workers"].peak_rss_mb if "shard workers" in usage else None,
        broker_peak_rss_mb=usage["broker"].peak_rss_mb if "broker" in usage else 0.0, wall_s=rep.wall_s)


def run(agents: list[int], workers: int, rounds: int, protection: wire.Protection, out: Path,
        broker: str = "auto", time_limit_s: float = 3600.0) -> list[ScaleRow]:
    from tqdm import tqdm

    rows: list[ScaleRow] = []
    cases = [(n, k) for n in agents for k in ([0, workers] if workers else [0])]
    for n, k in tqdm(cases, desc="bench scale", unit="fleet"):
        settings = FleetSettings(agents=n, processes=max(1, min(8, -(-n // AGENTS_PER_HOST))), rounds=rounds,
                                 protection=protection, broker=broker, workers=k, time_limit_s=time_limit_s)
        with tempfile.TemporaryDirectory(prefix="fedmq-scale-") as tmp:
            rows.append(row_of(run_fleet(settings, Path(tmp))))
        write(rows, protection, out)  # after every run: a cut-off sweep keeps what it measured
    return rows


def write(rows: list[ScaleRow], protection: wire.Protection, out: Path) -> None:
    from dataclasses import asdict

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protection": asdict(protection), "rows": [asdict(r) for r in rows]}, indent=2))


def plot(rows: list[ScaleRow], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k in sorted({r.workers for r in rows}):
        mine = sorted((r for r in rows if r.workers == k), key=lambda r: r.agents)
        label = "one aggregator" if k == 0 else f"{k} shard workers"
        ns = [r.agents for r in mine]
        ax_t.plot(ns, [r.close_s or float("nan") for r in mine], "o-", label=f"round close, {label}")
        ax_t.plot(ns, [r.fold_s or float("nan") for r in mine], "s--", label=f"fold, {label}")
        ax_m.plot(ns, [r.aggregator_peak_rss_mb for r in mine], "o-", label=f"aggregator/root, {label}")
        if k:
            ax_m.plot(ns, [r.worker_peak_rss_mb or float("nan") for r in mine], "^-", label=f"{k} workers together")
        ax_m.plot(ns, [r.broker_peak_rss_mb for r in mine], "x:", label=f"broker, {label}")
    for ax, title, unit in ((ax_t, "Time per round (rounds 2..)", "seconds"), (ax_m, "Peak RSS", "MB")):
        ax.set_xscale("log")
        ax.set_xlabel("agents")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
