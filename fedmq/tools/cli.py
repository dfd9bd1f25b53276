"""The ``fedmq`` command line.

This module is the composition root: each command imports its role lazily, so
``fedmq agent`` never loads the aggregator and an idle agent never loads torch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from enum import Enum
from typing import Optional

import typer

from fedmq.runtime import config as cfgmod
from fedmq.runtime.logging_setup import configure

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy-preserving federated learning over MQTT.")


def _version(value: bool) -> None:
    if value:
        from fedmq import PROTOCOL_VERSION, __version__

        typer.echo(f"fedmq {__version__} (wire protocol v{PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print fedmq's version and exit.")) -> None:
    """Privacy-preserving federated learning over MQTT."""


def _load(model, path: Path):
    try:
        return cfgmod.load(model, path)
    except cfgmod.ConfigError as exc:
        typer.echo(f"config error:\n{exc}", err=True)
        raise typer.Exit(2) from None


broker_app = typer.Typer(invoke_without_command=True, help="The embedded broker; `provision` for mosquitto.")
app.add_typer(broker_app, name="broker")


@broker_app.callback()
def broker(ctx: typer.Context, port: int = typer.Option(1883, help="TCP port to listen on."),
           host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
           config: Optional[Path] = typer.Option(None, "--config", help="YAML with host/port."),
           log_level: str = "INFO") -> None:
    """Run the embedded MQTT broker (amqtt), or a subcommand."""
    if ctx.invoked_subcommand is not None:
        return
    configure("broker", log_level)
    from broker.embedded import run

    cfg = _load(cfgmod.BrokerServerConfig, config) if config else cfgmod.BrokerServerConfig(host=host, port=port)
    raise typer.Exit(run(cfg))


@broker_app.command("provision")
def broker_provision(agents: int = typer.Option(..., min=1, help="Number of agents to create."),
                     out: Path = typer.Option(..., help="Directory for mosquitto.conf, passwd, acl, certs, configs."),
                     tls: bool = typer.Option(False, help="TLS listener with a generated CA and server certificate."),
                     port: int = typer.Option(8883, help="Listener port."),
                     host: str = typer.Option("127.0.0.1", help="Listener address and certificate name."),
                     task: str = typer.Option("digits"),
                     chunk_kib: int = typer.Option(256, min=1, help="Chunk size; max_packet_size follows it."),
                     rabbitmq: bool = typer.Option(False, help="Also write RabbitMQ definitions (users, topic "
                                                               "permissions) and a rabbitmq.conf for its MQTT plugin."),
                     max_queued_mib: int = typer.Option(1024, min=1, help="mosquitto's max_queued_bytes per client.")
                     ) -> None:
    """Write a locked-down mosquitto (passwords, ACLs, optional TLS) and every role's config."""
    from broker.provision import provision

    prov = provision(out, agents=agents, port=port, host=host, tls=tls, task=task, chunk_size=chunk_kib * 1024,
                     rabbitmq=rabbitmq, max_queued_mib=max_queued_mib)
    typer.echo(f"wrote {prov.conf} (+ passwd, acl{', ca.crt, server.crt/key' if tls else ''}) and "
               f"keyauthority.yaml, aggregator.yaml, {len(prov.agents)} agent configs (0600) in {out}\n"
               f"start: mosquitto -c {prov.conf}")


@app.command()
def keyauthority(config: Path = typer.Option(..., "--config", help="Key authority YAML."),
                 log_level: str = "INFO") -> None:
    """Run the key authority: generate HE keys, enroll agents."""
    configure("keyauthority", log_level)
    from keyauthority.service import run

    run(_load(cfgmod.KeyAuthorityConfig, config), config_path=config)


@app.command()
def aggregator(config: Path = typer.Option(..., "--config", help="Aggregator YAML."),
               log_level: str = "INFO") -> None:
    """Run the aggregator: rounds and homomorphic FedAvg."""
    configure("aggregator", log_level)
    from aggregator.service import run

    raise typer.Exit(run(_load(cfgmod.AggregatorConfig, config), config_path=config))


@app.command()
def agent(config: Path = typer.Option(..., "--config", help="Agent YAML."),
          log_level: str = "INFO") -> None:
    """Run an edge agent."""
    cfg = _load(cfgmod.AgentConfig, config)
    configure(cfg.agent_id, log_level)
    from agent.service import run

    raise typer.Exit(run(cfg, config_path=config))


class SigningRole(str, Enum):
    keyauthority = "keyauthority"
    aggregator = "aggregator"


@app.command("signing-key")
def signing_key(role: SigningRole = typer.Argument(..., help="Whose key: keyauthority or aggregator."),
                config: Path = typer.Option(..., "--config", help="That role's YAML.")) -> None:
    """Create the role's Ed25519 signing key (if it has none) and print its public key.

    Give the key authority's to the agents and the aggregator (authority_key:) and the
    aggregator's to the key authority (aggregator_key:), as hex or as the path of the
    .pub file written beside the key."""
    from fedmq.privacy import signing

    model = cfgmod.KeyAuthorityConfig if role is SigningRole.keyauthority else cfgmod.AggregatorConfig
    cfg = _load(model, config)
    path = cfg.signing_key or Path(cfg.state_dir) / "signing.key"
    key = signing.load_or_create(path)
    typer.echo(signing.public_bytes(key).hex())
    typer.echo(f"# {role.value} signing key {path} (0600); public key also in {signing.public_path(path)}",
               err=True)


model_app = typer.Typer(no_args_is_help=True, help="The trained model: export it from an agent's state dir.")
app.add_typer(model_app, name="model")


@model_app.command("export")
def model_export(state_dir: Path = typer.Option(..., "--state-dir", help="An agent's state_dir (it holds the keys, "
                                                                          "so the decrypted model)."),
                 out: Path = typer.Option(Path("model.safetensors"), "--out", help="safetensors file to write."),
                 round_: Optional[int] = typer.Option(None, "--round", help="A kept checkpoint's round "
                                                                             "(default: the latest model).")) -> None:
    """Write a round's global model as safetensors (+ a JSON of round, metrics, fingerprint).
    It loads with ``model.load_state_dict(safetensors.torch.load_file(PATH))`` — no fedmq needed."""
    from agent.model_files import export

    try:
        meta = export(state_dir, out, round_)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out} and {out.with_suffix('.json')}: round {meta['round']}, workload {meta['workload']}, "
               f"metrics {meta['metrics']}")


@app.command()
def doctor(config: Optional[Path] = typer.Option(None, "--config", help="An agent YAML to check as well.")) -> None:
    """Check this machine for an agent: Python, the libraries, torch (a CUDA-only build on a GPU-less
    board is explained, not dumped as a traceback) and, with --config, the agent's own settings."""
    import importlib

    from fedmq.learning import torch_check

    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += not ok
        typer.echo(f"{'ok ' if ok else 'BAD'}  {what}: {detail}")

    report(sys.version_info >= (3, 10), "python", sys.version.split()[0])
    for mod in ("paho.mqtt.client", "tenseal", "msgpack", "psutil", "yaml", "cryptography", "pydantic", "numpy"):
        try:
            importlib.import_module(mod)
            report(True, mod, "imports")
        except Exception as exc:  # any failure is the finding
            report(False, mod, f"{type(exc).__name__}: {exc}")
    ok, detail = torch_check.check()
    report(ok, "torch", detail)
    if config is not None:
        from fedmq.learning import workload as workload_api
        from fedmq.privacy import signing

        cfg = _load(cfgmod.AgentConfig, config)
        try:
            signing.configured_public(cfg.authority_key, "authority_key", config, "grants must be signed",
                                      "keyauthority")
            report(True, "authority_key", "resolves to an Ed25519 public key")
        except ValueError as exc:
            report(False, "authority_key", str(exc))
        try:
            report(True, "workload", workload_api.check_reference(cfg.effective_workload().name))
        except workload_api.WorkloadError as exc:
            report(False, "workload", str(exc))
    typer.echo("all good" if not problems else f"{problems} problem(s)")
    raise typer.Exit(1 if problems else 0)


@app.command("new")
def new(name: str = typer.Argument(..., help="The workload's name (and its package's)."),
        out: Path = typer.Option(Path("."), help="Where the project directory goes.")) -> None:
    """Scaffold a workload package (model, data, train, evaluate; its entry point) and every role's config."""
    from fedmq.tools.scaffold.new import scaffold

    try:
        root = scaffold(name, out)
    except (ValueError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {root}\nnext: pip install -e {root} && fedmq demo --workload {name}")


@app.command("install-unit")
def install_unit(config: Path = typer.Option(..., "--config", help="The agent YAML the service runs with."),
                 out: Path = typer.Option(Path("/etc/systemd/system/fedmq-agent.service"), help="Unit file to write."),
                 user: str = typer.Option("fedmq", help="Dedicated system user the agent runs as."),
                 watchdog_s: int = typer.Option(120, min=10, help="WatchdogSec=.")) -> None:
    """Write the agent's systemd unit (Type=notify, watchdog, hardened). Then:
    useradd --system fedmq; systemctl daemon-reload; systemctl enable --now fedmq-agent."""
    from fedmq.runtime.systemd_unit import render_unit

    cfg = _load(cfgmod.AgentConfig, config)
    try:
        text = render_unit(cfg, config, user=user, watchdog_s=watchdog_s)
    except ValueError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}")
    for what, path in (("the Python it runs", Path(sys.executable)), ("its config", config.resolve())):
        if str(path).startswith("/tmp/") or str(path).startswith("/var/tmp/"):
            typer.echo(f"warning: {what} lies under {path.parent}, but the unit sets PrivateTmp=yes: the service "
                       "sees an empty /tmp and cannot start. Install fedmq (and its config) outside /tmp.", err=True)


@app.command()
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
            protection = wire.Protection(scheme=scheme, p=p, mode=selection, secure_masking=True)
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
        with _sigterm_as_interrupt():
            code = run_demo(agents=agents, rounds=rounds, kill_round=kill_round, workdir=workdir,
                            chunk_kib=chunk_kib, timeout=timeout, protection=protection, workload=workload,
                            workload_options=options, data_root=data_root)
    except KeyboardInterrupt:
        typer.echo("demo interrupted: every process it started has been stopped", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@app.command()
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
    sc = _load(Scenario, scenario)
    console = Console(width=max(Console().width, 180))
    with tempfile.TemporaryDirectory(prefix="fedmq-field-") as tmp:
        where = workdir or Path(tmp)
        console.print(f"[bold]fedmq fieldtest[/] {sc.name}: {sc.agents} agents, {sc.rounds} rounds, work dir {where}")
        with _sigterm_as_interrupt():
            report = FieldTest(sc, where).run(on_round=lambda rep: console.print(round_line(rep)))
        render(report, console)
        if json_out:
            write_json(report, json_out)
    if report.interrupted:
        console.print("[yellow]interrupted: the report covers the rounds that closed before[/]")
        raise typer.Exit(130)
    raise typer.Exit(0 if report.ok else 1)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (systemd, kill, a CI timeout) unwinds like Ctrl-C: the processes a
    command started are stopped by its own cleanup, not orphaned."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def fleet(agents: int = typer.Option(100, min=2, help="Number of real agents."),
          processes: int = typer.Option(4, min=1, help="Processes hosting them (threads of real agents)."),
          rounds: int = typer.Option(3, min=1),
          scheme: str = typer.Option("ckks", help="ckks | quantize | quantize+he (default: full CKKS)."),
          p: float = typer.Option(1.0, min=0.0, max=1.0),
          masking: bool = typer.Option(False, help="Secure masking of the readable part."),
          broker: str = typer.Option("auto", help="auto | mosquitto | embedded"),
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
                             broker=broker, verify=verify, time_limit_s=time_limit)
    console = Console(width=max(Console().width, 120))
    with tempfile.TemporaryDirectory(prefix="fedmq-fleet-") as tmp:
        where = workdir or Path(tmp)
        console.print(f"[bold]fedmq fleet[/]: {agents} agents in {processes} processes, {rounds} rounds, "
                      f"work dir {where}")
        with _sigterm_as_interrupt():
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


@app.command("fleet-host", hidden=True)
def fleet_host(listing: Path = typer.Option(..., "--list", help="A file with one agent config path per line."),
               log_level: str = "WARNING") -> None:
    """Run the listed agents in this process (``fedmq fleet`` starts these)."""
    from fedmq.runtime.signals import stop_event
    from fedmq.tools.fleet.host import run_host

    configure("fleet-host", log_level)
    paths = [Path(line) for line in listing.read_text().splitlines() if line.strip()]
    raise typer.Exit(1 if run_host(paths, stop_event()) else 0)


@app.command()
def report(db: Path = typer.Option(Path("state/aggregator/telemetry.sqlite"), "--db",
                                   help="The aggregator's telemetry database (in its state_dir)."),
           png: Optional[Path] = typer.Option(None, help="Write PNG plots into this directory.")) -> None:
    """Per-round, per-device time, memory and bytes from the aggregator's telemetry."""
    from rich.console import Console

    from fedmq.tools.report import render_table, write_pngs

    if not db.exists():
        typer.echo(f"no telemetry database at {db} (see the aggregator's state_dir)", err=True)
        raise typer.Exit(2)
    rows = render_table(db, Console(width=max(Console().width, 160)))
    if png is not None:
        for path in write_pngs(db, png):
            typer.echo(f"wrote {path}")
    raise typer.Exit(0 if rows else 1)


@app.command()
def audit(json_out: Path = typer.Option(Path("runs/benchmarks/audit.json"), "--json"),
          png: Optional[Path] = typer.Option(None, help="Grid of reconstructions (default: next to the JSON)."),
          quick: bool = typer.Option(False, help="2 seeds, 100 iterations, p in {0.1, 0.3}, aggregates of k in "
                                                 "{1, 4} (a few minutes on 2 cores)."),
          seeds: Optional[int] = typer.Option(None, min=1, help="Images/initializations (default 3; quick 2)."),
          iterations: Optional[int] = typer.Option(None, min=1, help="L-BFGS iterations (default 300; quick 100)."),
          dp_epsilon: list[float] = typer.Option([8.0], "--dp-epsilon",
                                                 help="Client-level DP budgets for the DP aggregate (repeatable).")
          ) -> None:
    """Privacy audit: DLG and iDLG against what the aggregator sees, under every protection mode.

    Headline: the drop-aware attacker on one update (it knows which coordinates are
    encrypted), then DLG on the sum of k updates (all a masked mode reveals) with and
    without client-level DP. Writes JSON, a PNG grid and a markdown table (.md)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from fedmq.tools.audit import runner

    configure("audit", "WARNING")
    result = runner.run(seeds=seeds or (2 if quick else 3), iterations=iterations or (100 if quick else 300),
                        quick=quick, dp_epsilons=tuple(dp_epsilon))
    runner.plot(result, png or json_out.with_suffix(".png"))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2))
    command = " ".join(["fedmq", *sys.argv[1:]])
    json_out.with_suffix(".md").write_text(runner.markdown(result, command))
    rnd = result["random_image_psnr"]
    rows = result["table"]
    k = rows[0]["aggregate_k"] if rows else None
    dp_cols = [c for c in rows[0] if c.startswith("dlg_psnr_dp_")] if rows else []
    table = Table(title=f"Gradient inversion vs protection, DLG/iDLG PSNR in dB (LeNet, digits 32x32; "
                        f"random image: {rnd:.1f} dB)")
    heads = ["protection", "aggregator sees", "DLG drop-aware", f"DLG aggregate of {k}",
             *[c.removeprefix("dlg_psnr_").replace("_", " ") for c in dp_cols], "iDLG drop-aware", "DLG zero-guess"]
    for col in heads:
        table.add_column(col, justify="left" if col in ("protection", "aggregator sees") else "right",
                         overflow="fold")

    def cell(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    for r in rows:
        table.add_row(r["mode"], r["aggregator_sees"], cell(r["dlg_psnr_drop_aware"]),
                      cell(r.get(f"dlg_psnr_aggregate_k{k}")), *[cell(r[c]) for c in dp_cols],
                      cell(r["idlg_psnr_drop_aware"]), cell(r["dlg_psnr_zero_guess"]))
    Console(width=max(Console().width, 180)).print(table)
    typer.echo(f"-> {json_out}, {json_out.with_suffix('.md')}")


from fedmq.tools.bench.commands import bench_app  # noqa: E402 - after the app, like the other groups

app.add_typer(bench_app, name="bench")


def main() -> None:
    app(prog_name="fedmq")


if __name__ == "__main__":
    sys.exit(main())
