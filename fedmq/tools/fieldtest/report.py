"""The field test's printed report: one row per round, then the faults and the verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fedmq.tools.fieldtest.runner import FieldReport, RoundReport


def round_line(rep: RoundReport) -> str:
    return (f"round {rep.round} {rep.status}: {len(rep.participants)}/{rep.selected} agents"
            + (f" in {rep.close_s:.1f}s" if rep.close_s is not None else "")
            + (f"; faults: {'; '.join(rep.faults)}" if rep.faults else ""))


def render(report: FieldReport, console: Console) -> None:
    table = Table(title=f"fedmq field test '{report.scenario}' — {report.agents} agents, broker {report.broker}")
    for col in ("round", "status", "agents", "close s", "MB in", "faults applied", "verdict"):
        table.add_column(col, justify="right" if col in ("round", "close s", "MB in") else "left")
    for r in report.rounds:
        table.add_row(str(r.round), r.status, f"{len(r.participants)}/{r.selected}",
                      "-" if r.close_s is None else f"{r.close_s:.1f}", f"{r.bytes_received / 1e6:.2f}",
                      "\n".join(r.faults) or "-", ("[green]" if r.ok else "[red]") + r.verdict)
    console.print(table)
    closed = sum(1 for r in report.rounds if r.status == "aggregated")
    exact = sum(1 for r in report.rounds if r.ok)
    console.print(f"{closed}/{len(report.rounds)} rounds aggregated, {exact} exact; {report.faults_applied} faults "
                  f"applied, {len(report.faults_skipped)} skipped; aggregator and shard workers resumed {report.aggregator_resumes}x "
                  f"after kill -9; {report.wall_s:.0f}s")
    for s in report.faults_skipped:
        console.print(f"  skipped: {s}")
    console.print("[bold green]PASS[/]" if report.ok else "[bold red]FAIL[/]: a round is missing or not exact")
