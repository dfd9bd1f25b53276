"""The ``fedmq`` command line.

This module is the composition root: each command imports its role lazily, so
``fedmq agent`` never loads the aggregator and an idle agent never loads torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from enum import Enum
from typing import Optional

import typer

from fedmq.runtime import config as cfgmod
from fedmq.runtime.logging_setup import configure
from fedmq.tools.command_support import load_config_or_exit as _load

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
                     max_queued_mib: int = typer.Option(1024, min=1, help="mosquitto's max_queued_bytes per client."),
                     shard_workers: int = typer.Option(0, min=0, help="Sharded aggregation: users, ACLs and configs "
                                                                      "(shard-K.yaml) for this many shard workers.")
                     ) -> None:
    """Write a locked-down mosquitto (passwords, ACLs, optional TLS) and every role's config."""
    from broker.provision import provision

    prov = provision(out, agents=agents, port=port, host=host, tls=tls, task=task, chunk_size=chunk_kib * 1024,
                     rabbitmq=rabbitmq, max_queued_mib=max_queued_mib, shard_workers=shard_workers)
    typer.echo(f"wrote {prov.conf} (+ passwd, acl{', ca.crt, server.crt/key' if tls else ''}) and "
               f"keyauthority.yaml, aggregator.yaml, {f'{shard_workers} shard worker configs, ' if shard_workers else ''}"
               f"{len(prov.agents)} agent configs (0600) in {out}\n"
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
    """Run the aggregator: rounds and homomorphic FedAvg (or, with ``shard_worker: true``, one shard worker)."""
    cfg = _load(cfgmod.AggregatorConfig, config)
    configure(cfg.aggregator_id if cfg.shard_worker else "aggregator", log_level)
    from aggregator.service import Aggregator, run

    if cfg.shard_worker:
        from aggregator.shard_worker import ShardWorker

    raise typer.Exit(run(cfg, config_path=config, role=ShardWorker if cfg.shard_worker else Aggregator))


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


from fedmq.tools.audit.command import audit  # noqa: E402 - after the app, like the other groups
from fedmq.tools.bench.commands import bench_app  # noqa: E402
from fedmq.tools.local_run_commands import demo, fieldtest, fleet, fleet_host  # noqa: E402

for command in (demo, fieldtest, fleet, audit):
    app.command()(command)
app.command("fleet-host", hidden=True)(fleet_host)

app.add_typer(bench_app, name="bench")


def main() -> None:
    app(prog_name="fedmq")


if __name__ == "__main__":
    sys.exit(main())
