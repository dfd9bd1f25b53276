"""``fedmq demo``, ``fieldtest`` and ``fleet``: a whole deployment started as processes
on one machine — to show it, to break it under a fault schedule, or to load it with
a fleet — and ``fleet-host``, the process that holds a fleet's agents."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from fedmq.runtime.logging_setup import configure
from fedmq.tools.command_support import load_config_or_exit, sigterm_as_interrupt


def demo(agents: int = typer.Option(4, min=2, help="Number of agents."),
         rounds: int = typer.Option(5, min=1, help="Number of rounds."),
         kill_round: int = typer.Option(3, help="Round in which one agent is killed (0: none)."),
         workdir: Optional[Path] = typer.Option(None, help="Where configs, keys and logs go (default: a temp dir)."),
         chunk_kib: int = typer.Option(64, help="Upload chunk size in KiB."),
         scheme: str = typer.Option("quantize", help="quantize | ckks | quantize+he (default: the cheapest mode "
                                                     "that hides every single update from the aggregator: "
                                                     "masked quantize)"),
         p: float = typer.Option(1.0, min=0.0, max=1.0, help="Encrypted fraction (ckks, quantize+he)."),
         selection: str = typer.Option("sensitivity", help="sensitivity | random (when 0 < p < 1)."),
         masking: bool = typer.Option(True, help="Secure masking of every part the aggregator can read; without "
                                                 "it, quantize and p < 1 expose single updates."),
         workload: Optional[str] = typer.Option(None, help="Any workload: built-in name, module:attribute or an "
                                                           "installed entry point (default: digits-mlp)."),
         workload_options: Optional[str] = typer.Option(None, help="The workload's options, as JSON."),
         data_root: Optional[Path] = typer.Option(None, help="DATA_ROOT/agent-N is agent N's data_dir."),
         timeout: float = typer.Option(600, help="Give up after this many seconds.")) -> None:
    """Broker, key authority, aggregator and N agents as processes; a few encrypted rounds."""
    configure("demo", "WARNING")
    from pydantic import ValidationError

    from fedmq.privacy import exposure
    from fedmq.protocol import wire
    from fedmq.tools.demo import run_demo

    if scheme == "quantize" and p not in (0.0, 1.0):
        typer.echo(f"--scheme quantize encrypts nothing, so --p {p:g} would be ignored; use --scheme quantize+he "
                   "to encrypt a fraction of the codes", err=True)
        raise typer.Exit(2)
    try:
        protection = wire.Protection(scheme=scheme, p=p, mode=selection)
        if masking and exposure.exposed_part(protection) is not None:
            protection = dataclasses.replace(protection, secure_masking=True)
    except ValidationError as exc:
        typer.echo(f"invalid protection: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None
    options = None
    if workload_options:
        import json

        try:
            options = json.loads(workload_options)
        except ValueError as exc:
            typer.echo(f"--workload-options is not JSON: {exc}", err=True)
            raise typer.Exit(2) from None
    try:
        with sigterm_as_interrupt():
            code = run_demo(agents=agents, rounds=rounds, kill_round=kill_round, workdir=workdir,
                            chunk_kib=chunk_kib, timeout=timeout, protection=protection, workload=workload,
                            workload_options=options, data_root=data_root)
    except KeyboardInterrupt:
        typer.echo("demo interrupted: every process it started has been stopped", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def fieldtest(scenario: Path = typer.Argument(..., help="Scenario YAML (see configs/fieldtests/)."),
              workdir: Optional[Path] = typer.Option(None, help="Where configs, keys, logs go (default: temp dir)."),
              json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
              log_level: str = "WARNING") -> None:
    """Run a scenario under its fault schedule; exit 1 if any round is missing or not exact."""
    import tempfile

    from rich.console import Console

    from fedmq.tools.fieldtest.report import render, round_line
    from fedmq.tools.fieldtest.runner import FieldTest, write_json
    from fedmq.tools.fieldtest.scenario import Scenario

    configure("fieldtest", log_level)
    sc = load_config_or_exit(Scenario, scenario)
    console = Console(width=max(Console().width, 180))
    with tempfile.TemporaryDirectory(prefix="fedmq-field-") as tmp:
        where = workdir or Path(tmp)
        console.print(f"[bold]fedmq fieldtest[/] {sc.name}: {sc.agents} agents, {sc.rounds} rounds, work dir {where}")
        with sigterm_as_interrupt():
            report = FieldTest(sc, where).run(on_round=lambda rep: console.print(round_line(rep)))
        render(report, console)
        if json_out:
            write_json(report, json_out)
    if report.interrupted:
        console.print("[yellow]interrupted: the report covers the rounds that closed before[/]")
        raise typer.Exit(130)
    raise typer.Exit(0 if report.ok else 1)


def fleet(agents: int = typer.Option(100, min=2, help="Number of real agents."),
          processes: int = typer.Option(4, min=1, help="Processes hosting them (threads of real agents)."),
          rounds: int = typer.Option(3, min=1),
          scheme: str = typer.Option("ckks", help="ckks | quantize | quantize+he (default: full CKKS)."),
          p: float = typer.Option(1.0, min=0.0, max=1.0),
          masking: bool = typer.Option(False, help="Secure masking of the readable part."),
          broker: str = typer.Option("auto", help="auto | mosquitto | embedded"),
          workers: int = typer.Option(0, min=0, help="Sharded aggregation: shard workers beside the root aggregator."),
          verify: bool = typer.Option(True, help="Check every round against the exact weighted mean (test mode "
                                                 "dumps: never on real devices)."),
          workdir: Optional[Path] = typer.Option(None, help="Where configs, keys, logs go (default: temp dir)."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
          time_limit: float = typer.Option(3600, help="Give up after this many seconds.")) -> None:
    """N real agents in a few processes: enrollment, rounds, and what each costs."""
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from fedmq.protocol import wire
    from fedmq.tools.fleet.runner import FleetSettings, run_fleet, write_json

    configure("fleet", "WARNING")
    protection = wire.Protection(scheme=scheme, p=p, mode="random", secure_masking=masking)
    settings = FleetSettings(agents=agents, processes=processes, rounds=rounds, protection=protection,
                             broker=broker, verify=verify, time_limit_s=time_limit, workers=workers)
    console = Console(width=max(Console().width, 120))
    with tempfile.TemporaryDirectory(prefix="fedmq-fleet-") as tmp:
        where = workdir or Path(tmp)
        console.print(f"[bold]fedmq fleet[/]: {agents} agents in {processes} processes, {rounds} rounds, "
                      f"{f'{workers} shard workers, ' if workers else ''}work dir {where}")
        with sigterm_as_interrupt():
            rep = run_fleet(settings, where, on_round=lambda r, v: console.print(
                f"round {r} {v.closed.status}: {len(v.closed.participants)}/{len(v.selected)} agents"))
        if json_out:
            write_json(rep, json_out)
    table = Table(title=f"{agents} agents, {rep.broker} broker, {scheme} p={p:g} (fleet online in {rep.online_s} s)")
    for col in ("round", "status", "agents", "close s", "fold s", "MB in", "exact"):
        table.add_column(col, justify="right")
    for r in rep.rounds:
        table.add_row(str(r.round), r.status, f"{r.participants}/{r.selected}", str(r.close_s), f"{r.agg_s:.2f}",
                      f"{r.bytes_received / 1e6:.1f}", "-" if r.exact is None else
                      (f"yes ({r.max_error:.0e})" if r.exact else "NO"))
    console.print(table)
    for u in rep.usage:
        console.print(f"{u.name}: peak RSS {u.peak_rss_mb:.0f} MB over {u.processes} process(es), CPU {u.cpu_s:.1f} s")
    raise typer.Exit(0 if rep.ok else 1)


def fleet_host(listing: Path = typer.Option(..., "--list", help="A file with one agent config path per line."),
               log_level: str = "WARNING") -> None:
    """Run the listed agents in this process (``fedmq fleet`` starts these)."""
    from fedmq.runtime.signals import stop_event
    from fedmq.tools.fleet.host import run_host

    configure("fleet-host", log_level)
    paths = [Path(line) for line in listing.read_text().splitlines() if line.strip()]
    raise typer.Exit(1 if run_host(paths, stop_event()) else 0)
