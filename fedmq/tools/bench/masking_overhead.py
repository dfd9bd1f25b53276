"""Masking's cost to an agent, for ``fedmq bench he``: protect time with and without
secure masking on one model, timed interleaved."""

from __future__ import annotations

import statistics
import time

import numpy as np

from fedmq.privacy import he, masking, protection
from fedmq.protocol import wire
from fedmq.tools.bench.he_overhead import BENCH_PLAN, CLIENTS, SAMPLES, client_weights, round_masks


def masking_overhead(model: str = "cnn", reps: int = 9) -> list[dict]:
    """An agent's protect time (protect + serialize) with and without secure masking,
    measured interleaved — plain, masked, plain, masked… — so that the machine's drift
    between rows does not pass for masking's cost. The issue's two masked modes."""
    weights, _, base, sizes = client_weights(model)
    ctx = he.create_secret_context(he.CkksParams())
    bfv = he.create_bfv_secret_context(he.BfvParams())
    _, secure = round_masks()
    rng = np.random.default_rng(0)
    out = []
    for mode, p in (("quantize", 0.0), ("ckks", 0.1)):
        mask = masking.random_mask(base.size, p, seed=0) if p else np.zeros(base.size, dtype=bool)

        def protect(sec, mode=mode, mask=mask):
            if mode == "quantize":
                update, _ = protection.protect_quantized(bfv, BENCH_PLAN, weights[0] - base, SAMPLES[0], mask,
                                                         sizes, rng, CLIENTS, None, sec)
            else:
                update = protection.protect_ckks(ctx, weights[0], SAMPLES[0], mask, "float32", CLIENTS, None, sec,
                                                 rng)
            return wire.encode_body(update)[1]

        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(reps):
            for masked in (False, True):
                t0 = time.perf_counter()
                protect(secure[0] if masked else None)
                times[masked].append(time.perf_counter() - t0)
        plain, masked_s = statistics.median(times[False]), statistics.median(times[True])
        out.append({"model": model, "mode": f"{mode}+mask", "p": p, "reps": reps, "plain_s": plain,
                    "masked_s": masked_s, "ratio": masked_s / plain})
    return out
