"""``fedmq bench he``: HE overhead of a 3-client round vs p, against a FLARE-style baseline.

For each model and selection ratio p, three clients protect their update exactly
as a fedmq agent does (``n_i * w`` of the masked part as CKKS ciphertexts, the
rest as float32, in one msgpack ``Update``); the server folds them as the
aggregator does; one client decrypts and rebuilds the model. In the same run, a
FLARE-style baseline: TenSEAL CKKS with N=8192, coeff [60, 40, 40, 60], scale
2^40, public-key encryption of every layer, weights multiplied on the server.

Which parameters a mask selects does not change the cost, only how many: rows
use a random mask of fraction p (the sensitivity mask of the same p costs the same).
Timings are medians over repetitions; the machine's core count matters (TenSEAL
uses all cores), so the JSON records it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmq import he, masking, wire

PS = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)
CLIENTS = 3
SAMPLES = (500, 300, 200)
FLARE = dict(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], scale_bits=40)


@dataclass
class Row:
    model: str
    params: int
    p: float
    clients: int
    enc_s: float
    agg_s: float
    dec_s: float
    bytes_per_client: int
    bytes_per_param: float
    he_round_s: float
    rel_err: float
    plain_agg_s: float
    plain_bytes_per_client: int
    time_ratio_to_plain: float
    bytes_ratio_to_plain: float
    baseline_enc_s: float
    baseline_agg_s: float
    baseline_dec_s: float
    baseline_bytes_per_client: int
    baseline_round_s: float
    ratio_to_baseline: float


def _timed(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def client_weights(model_name: str) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Three clients' weights (a shared init plus local drift) and the layer layout."""
    import torch

    from fedmq.models import BENCH_MODELS

    torch.manual_seed(0)
    model = BENCH_MODELS[model_name]()
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    rng = np.random.default_rng(0)
    layers, start = [], 0
    for p in model.parameters():
        layers.append((start, start + p.numel()))
        start += p.numel()
    return [base + rng.normal(0, 0.01, base.size) for _ in range(CLIENTS)], layers


def fedavg(weights: list[np.ndarray]) -> np.ndarray:
    return sum(w * n for w, n in zip(weights, SAMPLES)) / sum(SAMPLES)


def _fedmq_round(ctx, public, weights, mask, reps):
    n_params = weights[0].size
    n_enc = int(mask.sum())

    def protect(w, n):
        secret, plain = masking.split(w, mask)
        cts = he.encrypt(ctx, secret * n) if n_enc else []
        upd = wire.Update(num_samples=n, n_params=n_params, n_encrypted=n_enc, ciphertexts=cts,
                          plain=plain.astype("<f4").tobytes(), mask_digest=masking.mask_digest(mask))
        return wire.encode_body(upd)[1]

    enc_times, bodies = [], []
    for w, n in zip(weights, SAMPLES):
        t, body = _timed(lambda: protect(w, n), reps)
        enc_times.append(t)
        bodies.append(body)

    def aggregate():
        acc, plain_acc = None, None
        for body in bodies:
            upd = wire.decode_body("update", body)
            acc = he.add_into(acc, he.load_ciphertexts(public, upd.ciphertexts, upd.n_encrypted))
            plain = np.frombuffer(upd.plain, dtype="<f4").astype(np.float64) * upd.num_samples
            plain_acc = plain if plain_acc is None else plain_acc + plain
        res = wire.Result(participants=["a", "b", "c"], total_weight=sum(SAMPLES), n_params=n_params,
                          n_encrypted=n_enc, ciphertexts=he.serialize_all(acc),
                          plain_avg=(plain_acc / sum(SAMPLES)).astype("<f4").tobytes())
        return wire.encode_body(res)[1]

    agg_s, result_body = _timed(aggregate, reps)

    def decrypt():
        res = wire.decode_body("result", result_body)
        enc = he.decrypt(ctx, res.ciphertexts, res.n_encrypted) / res.total_weight if n_enc else np.zeros(0)
        return masking.merge(enc, np.frombuffer(res.plain_avg, dtype="<f4").astype(np.float64), mask)

    dec_s, model = _timed(decrypt, reps)
    return statistics.mean(enc_times), agg_s, dec_s, statistics.mean(map(len, bodies)), model


@contextlib.contextmanager
def _native_stdout_silenced():
    """TenSEAL's C++ prints a warning to stdout for every vector larger than one
    ciphertext (which FLARE-style per-layer encryption always is)."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _flare_round(weights, layers, reps):
    """NVIDIA FLARE's HE path: every layer a CKKS vector, public-key encryption,
    the server multiplies each client's ciphertexts by its weight and sums."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, FLARE["poly_modulus_degree"],
                     coeff_mod_bit_sizes=FLARE["coeff_mod_bit_sizes"])
    ctx.global_scale = 2.0 ** FLARE["scale_bits"]
    ctx.generate_galois_keys()
    server = ts.context_from(ctx.serialize(save_secret_key=False))

    def encrypt(w):
        with _native_stdout_silenced():
            return [ts.ckks_vector(ctx, w[a:b].tolist()).serialize() for a, b in layers]

    enc_times, uploads = [], []
    for w in weights:
        t, blobs = _timed(lambda: encrypt(w), reps)
        enc_times.append(t)
        uploads.append(blobs)
    alphas = [n / sum(SAMPLES) for n in SAMPLES]

    def aggregate():
        out = []
        for i in range(len(layers)):
            acc = None
            for blobs, a in zip(uploads, alphas):
                v = ts.ckks_vector_from(server, blobs[i]) * a
                acc = v if acc is None else acc + v
            out.append(acc.serialize())
        return out

    agg_s, result = _timed(aggregate, reps)
    dec_s, model = _timed(lambda: np.concatenate([ts.ckks_vector_from(ctx, b).decrypt() for b in result]), reps)
    return statistics.mean(enc_times), agg_s, dec_s, statistics.mean(sum(map(len, u)) for u in uploads), model


def run(models: list[str], ps: tuple[float, ...] = PS, reps: int = 3, progress: bool = True) -> list[Row]:
    from tqdm import tqdm

    ctx = he.create_secret_context(he.CkksParams())
    public = he.load_context(he.serialize_public(ctx))
    rows: list[Row] = []
    bar = tqdm(total=len(models) * (len(ps) + 2), desc="bench he", unit="step", disable=not progress)
    for name in models:
        bar.set_postfix_str(f"{name}: weights")
        weights, layers = client_weights(name)
        truth = fedavg(weights)
        n = truth.size
        bar.update(1)
        bar.set_postfix_str(f"{name}: FLARE-style baseline")
        b_enc, b_agg, b_dec, b_bytes, b_model = _flare_round(weights, layers, reps)
        b_round = CLIENTS * b_enc + b_agg + b_dec
        bar.update(1)
        plain_bodies = [w.astype("<f4").tobytes() for w in weights]
        plain_agg_s, _ = _timed(lambda: sum(np.frombuffer(b, "<f4").astype(np.float64) * s
                                            for b, s in zip(plain_bodies, SAMPLES)) / sum(SAMPLES), reps)
        plain_bytes = 4 * n
        for p in ps:
            bar.set_postfix_str(f"{name}: p={p}")
            mask = masking.full_mask(n, p)
            if mask is None:
                mask = masking.random_mask(n, p, seed=0)
            enc_s, agg_s, dec_s, nbytes, model = _fedmq_round(ctx, public, weights, mask, reps)
            round_s = CLIENTS * enc_s + agg_s + dec_s
            rows.append(Row(
                model=name, params=n, p=p, clients=CLIENTS, enc_s=enc_s, agg_s=agg_s, dec_s=dec_s,
                bytes_per_client=int(nbytes), bytes_per_param=nbytes / n, he_round_s=round_s,
                rel_err=float(np.linalg.norm(model - truth) / np.linalg.norm(truth)),
                plain_agg_s=plain_agg_s, plain_bytes_per_client=plain_bytes,
                time_ratio_to_plain=round_s / plain_agg_s, bytes_ratio_to_plain=nbytes / plain_bytes,
                baseline_enc_s=b_enc, baseline_agg_s=b_agg, baseline_dec_s=b_dec,
                baseline_bytes_per_client=int(b_bytes), baseline_round_s=b_round,
                ratio_to_baseline=round_s / b_round))
            bar.update(1)
    bar.close()
    return rows


def targets(rows: list[Row]) -> list[tuple[str, bool, str]]:
    """Issue 3's targets, evaluated on the measured rows."""
    out = []
    full = [r for r in rows if r.p == 1.0]
    worst = max(r.bytes_per_param for r in full)
    out.append(("full encryption <= 32 bytes/param", worst <= 32, f"max {worst:.2f}"))
    cnn = [r for r in rows if r.model == "cnn" and r.p == 0.1]
    if cnn:
        out.append(("p=0.1 on the CNN <= 8 bytes/param", cnn[0].bytes_per_param <= 8,
                    f"{cnn[0].bytes_per_param:.2f}"))
    ratio = max(r.ratio_to_baseline for r in full)
    out.append(("3-client HE round (p=1) <= 1/3 of FLARE-style", ratio <= 1 / 3, f"max ratio {ratio:.3f}"))
    err = max(r.rel_err for r in rows)
    out.append(("decrypted aggregate within 1e-6 relative", err <= 1e-6, f"max {err:.1e}"))
    return out


def plot(rows: list[Row], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == name]
        line, = ax_t.plot([r.p for r in mine], [r.he_round_s for r in mine], "o-", label=name)
        ax_t.plot([1.0], [mine[0].baseline_round_s], "x", ms=10, color=line.get_color())
        ax_b.plot([r.p for r in mine], [r.bytes_per_client / 1e6 for r in mine], "o-", label=name)
        ax_b.plot([1.0], [mine[0].baseline_bytes_per_client / 1e6], "x", ms=10, color=line.get_color())
    ax_t.set(yscale="log", xlabel="encrypted fraction p", ylabel="3-client round compute (s)",
             title="HE compute vs p (x: FLARE-style, full encryption)")
    ax_b.set(yscale="log", xlabel="encrypted fraction p", ylabel="upload per client (MB)",
             title="Communication vs p (x: FLARE-style)")
    for ax in (ax_t, ax_b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write(rows: list[Row], json_path: Path, quick: bool) -> dict:
    doc = {
        "benchmark": "he", "quick": quick, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "fedmq_ckks": asdict(he.CkksParams()), "flare_ckks": FLARE, "samples_per_client": SAMPLES,
        "rows": [asdict(r) for r in rows],
        "targets": [{"target": t, "met": ok, "measured": m} for t, ok, m in targets(rows)],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2))
    return doc
