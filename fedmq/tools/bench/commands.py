"""``fedmq bench …``: the benchmark commands. Each prints its figures and writes
them (JSON, and a PNG where a plot says more) under ``benchmarks/results/``; the
measuring code lives in the modules beside this one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from fedmq.runtime.logging_setup import configure

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures and write them to files.")


@bench_app.command("he")
def bench_he(json_out: Path = typer.Option(Path("runs/benchmarks/he.json"), "--json", help="Where rows go."),
             png: Optional[Path] = typer.Option(None, help="Plot (default: next to the JSON)."),
             quick: bool = typer.Option(False, help="Linear, LeNet-5 and the CNN, one repetition (<2 min)."),
             models: Optional[str] = typer.Option(None, help="Comma-separated subset of linear,lenet5,cnn,resnet18."),
             reps: Optional[int] = typer.Option(None, help="Repetitions per measurement (median).")) -> None:
    """HE overhead vs p for several models, against a FLARE-style baseline."""
    configure("bench", "WARNING")
    from rich.console import Console
    from rich.table import Table

    from fedmq.tools.bench import he_overhead as bench
    from fedmq.tools.bench.masking_overhead import masking_overhead
    from fedmq.tools.bench.sensitivity_timing import sensitivity_timing

    names = models.split(",") if models else (["linear", "lenet5", "cnn"] if quick
                                              else ["linear", "lenet5", "cnn", "resnet18"])
    rows = bench.run(names, reps=reps or (1 if quick else 3))
    overhead = masking_overhead("cnn" if "cnn" in names else names[-1], reps=3 if quick else 9)
    doc = bench.write(rows, json_out, quick, sensitivity_timing(names), overhead)
    png = png or json_out.with_suffix(".png")
    bench.plot(rows, png)
    table = Table(title=f"3-client round, fedmq vs FLARE-style CKKS (cpus: {os.cpu_count()})")
    for col in ("model", "mode", "params", "p", "enc s", "agg s", "dec s", "B/param", "MB/client", "round s",
                "FLARE round s", "FLARE MB", "vs FLARE", "rel err"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.model, r.mode, f"{r.params:,}", f"{r.p:.1f}", f"{r.enc_s:.3f}", f"{r.agg_s:.3f}", f"{r.dec_s:.3f}",
                      f"{r.bytes_per_param:.2f}", f"{r.bytes_per_client / 1e6:.2f}", f"{r.he_round_s:.3f}",
                      f"{r.baseline_round_s:.3f}", f"{r.baseline_bytes_per_client / 1e6:.2f}",
                      f"{r.ratio_to_baseline:.3f}", f"{r.rel_err:.1e}")
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for t in doc["sensitivity"]:
        console.print(f"sensitivity map of {t['model']} ({t['params']:,} params, K={t['samples']}): "
                      f"{t['seconds']:.2f} s")
    for t in doc["targets"]:
        console.print(f"{'PASS' if t['met'] else 'MISS'}  {t['target']}: {t['measured']}")
    console.print(f"wrote {json_out} and {png}")


@bench_app.command("aggregator-memory")
def bench_aggregator_memory(
        json_out: Path = typer.Option(Path("runs/benchmarks/aggregator_memory.json"), "--json"),
        clients: int = typer.Option(50, min=2, help="Simulated agents uploading at once."),
        params: int = typer.Option(1_663_370, min=1, help="Model size (default: the paper's CNN)."),
        chunk_kib: int = typer.Option(256, min=1)) -> None:
    """Aggregator peak RSS while N encrypted uploads are in flight at once."""
    import tempfile

    from fedmq.tools.bench import aggregator_memory

    configure("bench", "WARNING")
    with tempfile.TemporaryDirectory(prefix="fedmq-aggmem-") as tmp:
        row = aggregator_memory.run(clients=clients, params=params, chunk_kib=chunk_kib, workdir=Path(tmp))
    aggregator_memory.write(row, json_out)
    mb = 1024 * 1024
    typer.echo(f"{clients} clients x {row['encrypted_update_bytes'] / mb:.1f} MiB encrypted update "
               f"({params:,} params): aggregator base {row['aggregator_base_rss_bytes'] / mb:.0f} MiB, peak "
               f"{row['aggregator_peak_rss_bytes'] / mb:.0f} MiB = base + "
               f"{row['peak_minus_base_in_models']:.2f} x the serialized update = "
               f"{row['peak_minus_base_in_memory_models']:.2f} x the update as SEAL holds it (target <= 3; "
               f"all-in-memory would need "
               f"{row['all_in_memory_would_need_bytes'] / mb:.0f} MiB); {row['participants']} folded, "
               f"{row['until_closed_s']:.0f}s -> {json_out}")
    raise typer.Exit(0 if row["meets_target"] and row["participants"] == clients else 1)


@bench_app.command("agent-idle")
def bench_agent_idle(json_out: Path = typer.Option(Path("runs/benchmarks/agent_idle.json"), "--json"),
                     workload: Optional[str] = typer.Option(None, help="Configure the agent with this workload.")
                     ) -> None:
    """Resident memory of an enrolled agent waiting for its first round (target <= 80 MB)."""
    import json
    import tempfile

    from fedmq.tools.bench import agent_idle

    configure("bench", "WARNING")
    with tempfile.TemporaryDirectory(prefix="fedmq-idle-") as tmp:
        row = agent_idle.run(Path(tmp), workload=workload)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(row, indent=2))
    typer.echo(f"idle agent: RSS {row['idle_rss_mb']:.1f} MB, USS {row['idle_uss_mb']:.1f} MB (target <= "
               f"{row['target_mb']} MB); heavy libraries mapped: {row['heavy_libraries_mapped'] or 'none'} "
               f"-> {json_out}")
    raise typer.Exit(0 if row["meets_target"] else 1)


@bench_app.command("cycle")
def bench_cycle(json_out: Path = typer.Option(Path("runs/benchmarks/cycle-cpu.json"), "--json"),
                png: Optional[Path] = typer.Option(None, help="Plot (default: next to the JSON)."),
                device: str = typer.Option("cpu", help="cpu | cuda"),
                samples: int = typer.Option(512, min=8, help="Local training samples (one epoch)."),
                ps: str = typer.Option("0,0.1,0.3,1", help="Encrypted fractions.")) -> None:
    """Time breakdown of one agent cycle (train, sensitivity, protect, serialize), ResNet-18, 32x32."""
    from rich.console import Console
    from rich.table import Table

    from fedmq.tools.bench import cycle

    configure("bench", "WARNING")
    rows = cycle.run(device=device, ps=tuple(float(v) for v in ps.split(",")), samples=samples)
    cycle.write(rows, json_out, png or json_out.with_suffix(".png"))
    table = Table(title=f"ResNet-18 cycle on {rows[0].device_name} ({samples} samples, one epoch)")
    for col in ("p", "train s", "sensitivity s", "protect s", "serialize s", "total s", "privacy share", "MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r.p:g}", f"{r.train_s:.2f}", f"{r.sensitivity_s:.2f}", f"{r.protect_s:.2f}",
                      f"{r.serialize_s:.2f}", f"{r.total_s:.2f}", f"{100 * r.protection_share:.0f}%",
                      f"{r.update_bytes / 1e6:.1f}")
    Console().print(table)


@bench_app.command("broker")
def bench_broker(json_out: Path = typer.Option(Path("runs/benchmarks/broker.json"), "--json"),
                 brokers: str = typer.Option("embedded,mosquitto,rabbitmq", help="Which brokers (where installed)."),
                 total_mb: int = typer.Option(32, min=1, help="Megabytes sent per broker and chunk size.")) -> None:
    """Chunk throughput (MB/s, chunks/s) through the embedded broker, mosquitto and RabbitMQ."""
    import json

    from rich.console import Console
    from rich.table import Table

    from fedmq.tools.bench import broker_throughput

    configure("bench", "WARNING")
    rows = broker_throughput.run(brokers.split(","), total_mb=total_mb)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(rows, indent=2))
    table = Table(title=f"Chunk throughput on loopback ({total_mb} MB per row, QoS 1, manual ack)")
    for col in ("broker", "chunk KiB", "MB/s", "chunks/s", "received"):
        table.add_column(col, justify="right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["broker"], "-", "-", "-", r["skipped"])
        else:
            table.add_row(r["broker"], str(r["chunk_kib"]), f"{r['mb_per_s']:.1f}", f"{r['chunks_per_s']:.0f}",
                          f"{r['received']}/{r['chunks']}")
    Console().print(table)


@bench_app.command("accuracy")
def bench_accuracy(json_out: Path = typer.Option(Path("runs/benchmarks/accuracy.json"), "--json"),
                   png: Optional[Path] = typer.Option(None, help="Plot (default: next to the JSON)."),
                   agents: int = typer.Option(8, min=2), rounds: int = typer.Option(10, min=1),
                   modes: str = typer.Option("none,ckks,quantize,quantize+he,ckks-p0.3,ckks-p0.3-f16",
                                             help="Comma-separated.")) -> None:
    """Final accuracy per protection mode, with the real system on digits."""
    configure("bench", "WARNING")
    from rich.console import Console
    from rich.table import Table

    from fedmq.tools.bench import accuracy as bench

    rows = bench.run(modes.split(","), agents, rounds)
    png = png or json_out.with_suffix(".png")
    bench.write(rows, json_out, png)
    table = Table(title=f"digits, {agents} agents, {rounds} rounds")
    for col in ("mode", "final accuracy", "vs none", "bytes/round", "clipped", "wall s"):
        table.add_column(col, justify="right")
    for r in rows:
        last = r["per_round"][-1]
        delta = "-" if r["delta_vs_none"] is None else f"{100 * r['delta_vs_none']:+.2f} pt"
        table.add_row(r["mode"], f"{r['final_accuracy']:.4f}", delta, f"{last['bytes_received']:,}",
                      str(sum(x["clipped"] for x in r["per_round"])), f"{r['wall_s']:.0f}")
    Console(width=max(Console().width, 100)).print(table)
    print(f"wrote {json_out} and {png}")


@bench_app.command("scale")
def bench_scale(json_out: Path = typer.Option(Path("runs/benchmarks/scale.json"), "--json"),
                png: Optional[Path] = typer.Option(None, help="Plot (default: next to the JSON)."),
                agents: str = typer.Option("10,100,300,1000", help="Comma-separated fleet sizes."),
                workers: int = typer.Option(2, min=0, help="Each size also runs with this many shard workers "
                                                           "(0: one aggregator only)."),
                rounds: int = typer.Option(3, min=2),
                scheme: str = typer.Option("ckks", help="ckks | quantize | quantize+he (default: full CKKS)."),
                broker: str = typer.Option("auto", help="auto | mosquitto | embedded")) -> None:
    """Round close time, fold time, bytes and peak RSS of broker and aggregator(s) from
    10 to 1,000 real agents, with one aggregator and with K shard workers."""
    configure("bench", "WARNING")
    from rich.console import Console
    from rich.table import Table

    from fedmq.protocol import wire
    from fedmq.tools.bench import scale

    protection = wire.Protection(scheme=scheme, p=1.0 if scheme == "ckks" else 0.0, mode="random")
    rows = scale.run([int(n) for n in agents.split(",")], workers, rounds, protection, json_out, broker=broker)
    png = png or json_out.with_suffix(".png")
    scale.plot(rows, png)
    table = Table(title=f"fedmq fleet, {scheme}, {rounds} rounds per run")
    for col in ("agents", "workers", "exact", "round 1 s", "close s", "fold s", "MB/round", "agg MB", "workers MB",
                "broker MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.agents), str(r.workers), "yes" if r.ok else "NO", str(r.first_close_s), str(r.close_s),
                      str(r.fold_s), str(r.mb_per_round), f"{r.aggregator_peak_rss_mb:.0f}",
                      "-" if r.worker_peak_rss_mb is None else f"{r.worker_peak_rss_mb:.0f}",
                      f"{r.broker_peak_rss_mb:.0f}")
    Console(width=max(Console().width, 120)).print(table)
    print(f"wrote {json_out} and {png}")
    raise typer.Exit(0 if all(r.ok for r in rows) else 1)


@bench_app.command("shard-fold")
def bench_shard_fold(json_out: Path = typer.Option(Path("runs/benchmarks/shard-fold.json"), "--json"),
                     updates: int = typer.Option(12, min=2, help="Encrypted CNN updates in the round."),
                     workers: int = typer.Option(2, min=2, help="Shard workers (processes)."),
                     params: int = typer.Option(1_663_370, min=1, help="Model size (default: the paper's CNN).")
                     ) -> None:
    """The fold phase of one full-CKKS CNN round: one aggregator vs K shard workers + the root's combining."""
    configure("bench", "WARNING")
    from fedmq.tools.bench import shard_fold

    row = shard_fold.run(updates=updates, workers=workers, params=params)
    shard_fold.write(row, json_out)
    print(f"{updates} updates of {row.update_mb} MB ({params:,} params, full CKKS) on {row.cpus} cores: one "
          f"aggregator folds in {row.single_s} s; {workers} workers {row.worker_s} s + root combining "
          f"{row.combine_s} s = {row.sharded_s} s -> {row.speedup}x (target >= 1.6); sums agree within "
          f"{row.max_abs_diff:.1e} -> {json_out}")
    raise typer.Exit(0 if row.speedup >= 1.6 and row.max_abs_diff < 1e-6 else 1)
