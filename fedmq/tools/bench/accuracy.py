"""``fedmq bench accuracy``: does protection cost accuracy? Federated training on
digits with the real system — broker, key authority, aggregator and N agent
processes — once per protection mode, reading each round's test accuracy from the
agents' telemetry. The target (issue 4): quantize and quantize+he within 1 point
of unprotected FL after 10 rounds (seed 001 reports <= 1%).

The ``dp-*`` modes add client-level differential privacy (client_dp.py) at two
budgets over the run's rounds, under full CKKS so that the arithmetic is exact and
what the table shows is the noise's cost alone. With a handful of agents the
noise, shared by the quorum, dwarfs a clipped update: DP pays off with hundreds of
agents per round (the noise on the mean falls as 1/K)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from fedmq.runtime import config as cfgmod
from fedmq.privacy import masking
from fedmq.protocol import wire
from fedmq.tools.local_cluster import Cluster, Observer, free_port

# Mixed precision: int8 symmetric stochastic and int16 asymmetric nearest, alternating
# over the MLP's layers; n_ref is the nominal shard size (1437 training samples / 8).
PLAN = cfgmod.QuantizationSettings(layers=[
    cfgmod.LayerQuantSettings(bits=8, mode="symmetric", rounding="stochastic", lo=-1.0, hi=1.0),
    cfgmod.LayerQuantSettings(bits=16, mode="asymmetric", rounding="nearest", lo=-1.0, hi=1.0),
], n_ref=180, max_agents=8)

DP_CLIP = 1.0

MODES: dict[str, tuple[wire.Protection, cfgmod.QuantizationSettings | None]] = {
    "none": (wire.Protection(scheme="ckks", p=0.0), None),
    "ckks": (wire.Protection(scheme="ckks", p=1.0), None),
    "quantize": (wire.Protection(scheme="quantize", p=0.0), PLAN),
    "quantize+he": (wire.Protection(scheme="quantize+he", p=1.0), PLAN),
    # Selective encryption, sensitivity mask agreed in an encrypted round first; the
    # plaintext rest as float32 or float16 (issue 3: does float16 hold accuracy?).
    "ckks-p0.3": (wire.Protection(scheme="ckks", p=0.3, mode="sensitivity"), None),
    "ckks-p0.3-f16": (wire.Protection(scheme="ckks", p=0.3, mode="sensitivity", plain_dtype="float16"), None),
    # Secure masking (the default protection): the aggregator sees only the sum.
    "quantize+mask": (wire.Protection(scheme="quantize", p=0.0, secure_masking=True), PLAN),
    "ckks-p0.1+mask": (wire.Protection(scheme="ckks", p=0.1, mode="random", secure_masking=True), None),
    "dp-eps8": (wire.Protection(scheme="ckks", p=1.0), None),
    "dp-eps50": (wire.Protection(scheme="ckks", p=1.0), None),
}


def dp_settings(mode: str, rounds: int) -> cfgmod.DpSettings | None:
    """``dp-epsE``: a budget of E at delta 1e-5 over the run's rounds."""
    if not mode.startswith("dp-eps"):
        return None
    return cfgmod.DpSettings(epsilon=float(mode.removeprefix("dp-eps")), delta=1e-5, clip=DP_CLIP, rounds=rounds)


def run_mode(mode: str, agents: int, rounds: int, workdir: Path, progress=None) -> dict:
    prot, plan = MODES[mode]
    dp = dp_settings(mode, rounds)
    cluster = Cluster(workdir=workdir, port=free_port(), n_agents=agents, rounds=rounds, chunk_size=256 * 1024,
                      protection=prot, quantization=plan, round_timeout_s=120, dp=dp)
    cluster.write_configs(min_agents=max(2, agents // 2))
    # A selective sensitivity-mode task agrees on its mask in an encrypted round 1 first.
    agreement = masking.needs_agreement(prot.scheme, prot.p, prot.mode)
    train_rounds = list(range(2 if agreement else 1, rounds + (2 if agreement else 1)))
    t0 = time.monotonic()
    try:
        cluster.start_all()
        obs = Observer(cluster.port)
        obs.connect()
        try:
            for rnd in range(1, train_rounds[-1] + 1):
                obs.wait_for("closed", rnd, timeout=300)
                end = time.monotonic() + 15  # the agents' telemetry follows the result
                view = obs.rounds[rnd]
                while len(view.telemetry) < len(view.closed.participants) and time.monotonic() < end:
                    obs.poll()
                if progress is not None and rnd in train_rounds:
                    progress.update(1)
        finally:
            obs.close()
    finally:
        cluster.stop_all()
    per_round = []
    for i, rnd in enumerate(train_rounds, start=1):
        v = obs.rounds[rnd]
        accs = [t.accuracy for t in v.telemetry.values() if t.accuracy is not None]
        per_round.append({"round": i, "participants": len(v.closed.participants),
                          "accuracy": sum(accs) / len(accs) if accs else None,
                          "bytes_received": v.closed.bytes_received,
                          "clipped": sum(t.clipped for t in v.telemetry.values())})
    return {"mode": mode, "agents": agents, "rounds": rounds, "scheme": prot.scheme, "p": prot.p,
            "secure_masking": prot.secure_masking, "dp": dp.model_dump() if dp else None,
            "final_accuracy": per_round[-1]["accuracy"], "per_round": per_round, "mask_agreement_round": agreement,
            "wall_s": time.monotonic() - t0}


def run(modes: list[str], agents: int, rounds: int, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    out = []
    with tqdm(total=len(modes) * rounds, desc="bench accuracy", unit="round",
                   disable=None if progress else True) as bar:
        for mode in modes:
            bar.set_postfix_str(mode)
            with tempfile.TemporaryDirectory(prefix=f"fedmq-acc-{mode.replace('+', '-')}-") as tmp:
                out.append(run_mode(mode, agents, rounds, Path(tmp), bar))
    base = next((r["final_accuracy"] for r in out if r["mode"] == "none"), None)
    for r in out:
        r["delta_vs_none"] = None if base is None or r["final_accuracy"] is None else r["final_accuracy"] - base
    return out


def write(rows: list[dict], json_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "accuracy", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "quantization_plan": PLAN.model_dump(), "rows": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot([x["round"] for x in r["per_round"]], [x["accuracy"] for x in r["per_round"]], "o-",
                label=f"{r['mode']} ({r['final_accuracy']:.3f})")
    ax.set(xlabel="round", ylabel="test accuracy (digits)", title="Federated accuracy per protection mode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
