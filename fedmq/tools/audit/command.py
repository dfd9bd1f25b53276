"""``fedmq audit``: the privacy audit's command (the attacks live beside it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from fedmq.runtime.logging_setup import configure


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
