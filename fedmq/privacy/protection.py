"""Protecting an update and rebuilding the model from a result: the agent's side
of every scheme, in one place, so the agent daemon and the benchmarks run the
same code.

* ``ckks``: the masked values as CKKS ciphertexts of ``n * w``, the rest as floats.
* ``quantize`` / ``quantize+he``: codes of ``(n / n_ref) * delta`` under the
  task's secret plan; the masked codes BFV-packed (quantize+he), the rest as
  per-layer integer segments.
"""

from __future__ import annotations

import numpy as np

from fedmq.privacy import he, masking
from fedmq.protocol import wire
from fedmq.privacy.quantization import QuantPlan, dequantize_sum, quantize, segments


def encrypt_weighted(ctx, values: np.ndarray, n: int, n_agents: int) -> list[bytes]:
    """CKKS ciphertexts of ``n * values``, refusing what a sum of ``n_agents`` could overflow."""
    if values.size == 0:
        return []
    scaled = values * n
    headroom = he.params_of(ctx).headroom
    if np.abs(scaled).max() * n_agents >= headroom:
        raise he.HEError(f"n*w reaches {np.abs(scaled).max():.3g}; with {n_agents} agents the sum could "
                         f"exceed the CKKS head-room {headroom:.3g}: lower scale_bits")
    return he.encrypt(ctx, scaled)


def protect_ckks(ctx, weights: np.ndarray, n: int, mask: np.ndarray, plain_dtype: str, n_agents: int,
                 digest: bytes | None) -> wire.Update:
    secret, plain = masking.split(weights, mask)
    return wire.Update(num_samples=n, n_params=weights.size, n_encrypted=int(mask.sum()),
                       ciphertexts=encrypt_weighted(ctx, secret, n, n_agents),
                       plain=plain.astype(np.dtype(plain_dtype).newbyteorder("<")).tobytes(),
                       plain_dtype=plain_dtype, mask_digest=digest)


def lanes_per_slot(bfv, plan: QuantPlan) -> int:
    return plan.check_packing(he.bfv_usable_bits(bfv))


def protect_quantized(bfv, plan: QuantPlan, delta: np.ndarray, n: int, mask: np.ndarray, sizes: list[int],
                      rng: np.random.Generator, n_agents: int, digest: bytes | None) -> tuple[wire.Update, int]:
    """Returns the update and how many values were clipped to the plan's ranges."""
    plan.check_round(n_agents)
    q = quantize(delta * (n / plan.n_ref), plan, sizes, rng)
    selected = np.concatenate([c.astype(np.int64) for c in q.codes])[mask]
    ciphertexts = he.bfv_encrypt_codes(bfv, selected, plan.sum_bits, lanes_per_slot(bfv, plan)) \
        if selected.size else []
    codes = [c[~mask[a:b]].tobytes() for (a, b), c in zip(segments(sizes), q.codes)]
    update = wire.Update(num_samples=n, n_params=delta.size, n_encrypted=int(selected.size),
                         ciphertexts=ciphertexts, codes=codes, code_widths=q.widths, mask_digest=digest)
    return update, q.clipped


def rebuild_ckks(ctx, result: wire.Result, mask: np.ndarray) -> np.ndarray:
    """Averaged weights (or averaged sensitivity, for a sensitivity round)."""
    encrypted = he.decrypt(ctx, result.ciphertexts, result.n_encrypted) / result.total_weight \
        if result.n_encrypted else np.zeros(0)
    if result.n_encrypted == result.n_params:
        return encrypted
    return masking.merge(encrypted, np.frombuffer(result.plain_avg, dtype="<f4").astype(np.float64), mask)


def rebuild_quantized(bfv, plan: QuantPlan, result: wire.Result, mask: np.ndarray, sizes: list[int],
                      base: np.ndarray) -> np.ndarray:
    """Global weights from the integer sums: dequantize, re-weight, add to the base model."""
    sums = np.zeros(result.n_params, dtype=np.int64)
    for (a, b), seg, width in zip(segments(sizes), result.code_sums, result.code_sum_widths):
        sums[a:b][~mask[a:b]] = np.frombuffer(seg, dtype=f"<u{width}").astype(np.int64)
    if result.n_encrypted:
        sums[mask] = he.bfv_decrypt_codes(bfv, result.ciphertexts, result.n_encrypted, plan.sum_bits,
                                          lanes_per_slot(bfv, plan))
    total = dequantize_sum([sums[a:b] for a, b in segments(sizes)], len(result.participants), plan, sizes)
    return base + total * plan.n_ref / result.total_weight
