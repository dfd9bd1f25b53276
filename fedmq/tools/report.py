"""``fedmq report``: where time, memory and bytes went, per round and device.

Reads the aggregator's telemetry database and prints one row per round and
device; with ``--png DIR`` it also draws the stacked time breakdown per device
(like seed 000's Fig. 8), bytes per round and accuracy per round.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmq.runtime.telemetry import PHASES
from fedmq.runtime.telemetry_db import ROUND_AGENT, PhaseRow, read_metrics, read_phases, read_rounds

MB = 1e6


def _phase_order(rows: list[PhaseRow]) -> list[str]:
    seen = {r.phase for r in rows}
    return [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))


def render_table(db: Path, console: Console) -> int:
    phases = read_phases(db)
    rounds = read_rounds(db)
    names = _phase_order(phases)
    by_key: dict[tuple[int, str], dict[str, PhaseRow]] = defaultdict(dict)
    for r in phases:
        by_key[(r.round, r.agent)][r.phase] = r
    table = Table(title=f"fedmq telemetry — {db}")
    for col in ("round", "device", *[f"{n} s" for n in names], "CPU s", "peak MB", "sent MB", "recv MB",
                "accuracy"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for row in rounds:
        ph = by_key.get((row["round"], row["agent"]), {})
        cpu = sum(p.cpu_s for p in ph.values())
        table.add_row(str(row["round"]), row["agent"],
                      *[f"{ph[n].wall_s:.3f}" if n in ph else "-" for n in names], f"{cpu:.2f}",
                      f"{row['peak_rss'] / MB:.0f}", f"{row['bytes_sent'] / MB:.3f}",
                      f"{row['bytes_received'] / MB:.3f}",
                      "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}")
    console.print(table)
    render_privacy(db, console)
    return len(rounds)


def render_privacy(db: Path, console: Console) -> None:
    """The differential-privacy budget spent after each aggregated round (the
    aggregator's accountant), when the task has one."""
    spent = sorted((rnd, value) for rnd, agent, name, value in read_metrics(db)
                   if agent == ROUND_AGENT and name == "dp_epsilon")
    if not spent:
        return
    console.print("Differential privacy spent (epsilon at the task's delta, after each aggregated round):")
    table = Table()
    table.add_column("round", justify="right")
    table.add_column("epsilon", justify="right")
    for rnd, eps in spent:
        table.add_row(str(rnd), f"{eps:.3f}")
    console.print(table)


def write_pngs(db: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    phases = read_phases(db)
    rounds = read_rounds(db)
    names = _phase_order(phases)
    agents = sorted({r.agent for r in phases})
    n_rounds: dict[str, set[int]] = defaultdict(set)
    total: dict[tuple[str, str], float] = defaultdict(float)
    for r in phases:
        total[(r.agent, r.phase)] += r.wall_s
        n_rounds[r.agent].add(r.round)
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(agents) + 3), 4.5))
    bottom = [0.0] * len(agents)
    for name in names:
        vals = [total[(a, name)] / max(len(n_rounds[a]), 1) for a in agents]
        ax.bar(agents, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per round (mean)")
    ax.set_title("Time per phase and device")
    ax.legend(fontsize=8, ncols=2)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    written.append(out / "time_breakdown.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    per_round_sent: dict[int, int] = defaultdict(int)
    per_round_recv: dict[int, int] = defaultdict(int)
    acc: dict[int, list[float]] = defaultdict(list)
    for row in rounds:
        per_round_sent[row["round"]] += row["bytes_sent"]
        per_round_recv[row["round"]] += row["bytes_received"]
        if row["accuracy"] is not None:
            acc[row["round"]].append(row["accuracy"])
    rs = sorted(per_round_sent)
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.4
    ax.bar([r - width / 2 for r in rs], [per_round_sent[r] / MB for r in rs], width, label="sent by devices")
    ax.bar([r + width / 2 for r in rs], [per_round_recv[r] / MB for r in rs], width, label="received by devices")
    ax.set_xlabel("round")
    ax.set_ylabel("MB (all devices)")
    ax.set_title("Bytes per round")
    ax.legend()
    fig.tight_layout()
    written.append(out / "bytes_per_round.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ar = sorted(acc)
    ax.plot(ar, [sum(acc[r]) / len(acc[r]) for r in ar], marker="o", label="mean over devices")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "accuracy_per_round.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # What the workloads reported (evaluate's and train's metrics), mean over devices.
    per: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rnd, agent, name, value in read_metrics(db):
        if agent != ROUND_AGENT:  # round-wide figures (epsilon spent) are not a device's
            per[name][rnd].append(value)
    if per:
        names = sorted(per)
        fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * len(names)), squeeze=False, sharex=True)
        for ax, name in zip(axes[:, 0], names):
            rounds = sorted(per[name])
            ax.plot(rounds, [sum(per[name][r]) / len(per[name][r]) for r in rounds], marker="o")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("round")
        axes[0, 0].set_title("Workload metrics per round (mean over devices)")
        axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        written.append(out / "workload_metrics.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
