"""Protecting an update and rebuilding the model from a result: the agent's side
of every scheme, in one place, so the agent daemon and the benchmarks run the
same code.

* ``ckks``: the masked values as CKKS ciphertexts of ``n * w``, the rest as floats.
* ``quantize`` / ``quantize+he``: codes of ``(n / n_ref) * delta`` under the
  task's secret plan; the masked codes BFV-packed (quantize+he), the rest as
  per-layer integer segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmq.privacy import he, masking, secure_aggregation
from fedmq.protocol import wire
from fedmq.privacy.quantization import QuantPlan, dequantize_sum, quantize, segments, sum_dtype


@dataclass(frozen=True)
class RoundMasking:
    """What an agent needs to mask its readable lanes in one round."""

    me: str
    key: object  # X25519PrivateKey
    roster: dict[str, bytes]
    selected: list[str]
    task: str
    round: int
    max_weight: int  # the largest sample weight an update may carry (1 under DP)

    def apply(self, values: list[np.ndarray], lanes: list[secure_aggregation.Lane]) -> list[np.ndarray]:
        out = [v.astype(lane.dtype, copy=True) for v, lane in zip(values, lanes)]
        return secure_aggregation.agent_mask(self.me, self.key, self.roster, self.selected, self.task, self.round,
                                             lanes, onto=out)


def masked_code_width(plan: QuantPlan, code_width: int) -> int:
    """Bytes per masked code: the ring their sum over the plan's ``max_agents`` fits."""
    return sum_dtype(plan.max_agents, 8 * code_width).itemsize


def masked_lanes(update: wire.Update) -> list[secure_aggregation.Lane]:
    """The shapes of an update's masked lanes (the aggregator asks for their correction)."""
    if update.plain_dtype == "ring32":
        return [secure_aggregation.Lane((update.n_params - update.n_encrypted), secure_aggregation.PLAIN_WIDTH)]
    return [secure_aggregation.Lane(len(seg) // w, w) for seg, w in zip(update.codes, update.code_widths)]


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
                 digest: bytes | None, secure: RoundMasking | None = None,
                 rng: np.random.Generator | None = None) -> wire.Update:
    """``secure``: the plain part goes as masked fixed-point ``n * w`` (ring32) instead of floats."""
    secret, plain = masking.split(weights, mask)
    if secure is None or plain.size == 0:
        plain_bytes = plain.astype(np.dtype(plain_dtype).newbyteorder("<")).tobytes()
    else:
        bits = secure_aggregation.frac_bits(len(secure.selected), secure.max_weight)
        ring, _ = secure_aggregation.encode_fixed(plain, n, bits, rng or np.random.default_rng())
        lane = secure_aggregation.Lane(ring.size, secure_aggregation.PLAIN_WIDTH)
        plain_bytes, plain_dtype = secure.apply([ring], [lane])[0].tobytes(), "ring32"  # lane dtype is <u4
    return wire.Update(num_samples=n, n_params=weights.size, n_encrypted=int(mask.sum()),
                       ciphertexts=encrypt_weighted(ctx, secret, n, n_agents), plain=plain_bytes,
                       plain_dtype=plain_dtype, mask_digest=digest)


def lanes_per_slot(bfv, plan: QuantPlan) -> int:
    return plan.check_packing(he.bfv_usable_bits(bfv))


def protect_quantized(bfv, plan: QuantPlan, delta: np.ndarray, n: int, mask: np.ndarray, sizes: list[int],
                      rng: np.random.Generator, n_agents: int, digest: bytes | None,
                      secure: RoundMasking | None = None) -> tuple[wire.Update, int]:
    """Returns the update and how many values were clipped to the plan's ranges.
    ``secure``: the unencrypted codes go masked, in the ring of their sum."""
    plan.check_round(n_agents)
    q = quantize(delta * (n / plan.n_ref), plan, sizes, rng)
    selected = np.concatenate([c.astype(np.int64) for c in q.codes])[mask] if mask.any() \
        else np.zeros(0, dtype=np.int64)
    ciphertexts = he.bfv_encrypt_codes(bfv, selected, plan.sum_bits, lanes_per_slot(bfv, plan)) \
        if selected.size else []
    codes = [c[~mask[a:b]] for (a, b), c in zip(segments(sizes), q.codes)]
    widths = q.widths
    if secure is not None:
        widths = [masked_code_width(plan, w) for w in q.widths]
        lanes = [secure_aggregation.Lane(c.size, w) for c, w in zip(codes, widths)]
        codes = secure.apply(codes, lanes)
    update = wire.Update(num_samples=n, n_params=delta.size, n_encrypted=int(selected.size),
                         ciphertexts=ciphertexts, codes=[c.tobytes() for c in codes], code_widths=widths,
                         mask_digest=digest)
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
