"""Secure aggregation of the parts of an update that are not encrypted.

Why: the aggregator must know which coordinates are encrypted (it adds the plain
part itself), so it can leave the encrypted ones out of an inversion attack and
read a single agent's plain part. Pairwise additive masks (Bonawitz et al. 2017,
as in Flower's SecAgg+) make each upload look uniformly random while the masks
cancel in the sum, so the aggregator learns only the sum of what it can read.

The arithmetic is over integer rings ``Z / 2^(8 * width)``, one ring per *lane*:
the fixed-point float part of ``ckks`` p < 1 (32 bits), and the unencrypted code
segments of ``quantize`` / ``quantize+he`` (the width their sum needs).

Each agent ``i`` of the round's selected set ``U`` adds, per lane,

    PRG(b_i) + sum_{j in U, j > i} PRG(s_ij) - sum_{j in U, j < i} PRG(s_ij)

with ``s_ij`` from X25519 key agreement between ``i`` and ``j`` (HKDF-SHA256 bound
to task and round) and ``b_i`` a self-mask seed; PRG is ChaCha20's keystream
(``cryptography``). The pairwise terms cancel over any set containing both ends.

Recovery (double masking, Bonawitz et al. section 4): for the survivors ``S`` the
key authority — which derived every agent's mask key and so can compute any seed
— returns one correction, ``sum_{i in S} PRG(b_i) + sum_{i in S, d in U \\ S}
+-PRG(s_id)``, once per round. A live agent claimed as dropped has its pairwise
masks revealed, but its self mask stays on: its upload still reads as noise.
The rule that makes that hold (one claim per round) is ``mask_ledger.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_KEY_LABEL = b"fedmq-mask-key-v1"
_PAIR_LABEL = b"fedmq-mask-pair-v1"
_SELF_LABEL = b"fedmq-mask-self-v1"

PLAIN_WIDTH = 4  # bytes per masked float value (a 32-bit fixed-point ring)
PLAIN_BOUND = 32.0  # |weight| beyond this is clipped before the fixed-point encoding
MAX_LANE_WIDTH = 4  # the aggregator sums lanes in int64: K * 2^32 never overflows


class MaskingError(ValueError):
    pass


@dataclass(frozen=True)
class Lane:
    """One masked vector: ``length`` values in the ring of ``width`` bytes."""

    length: int
    width: int

    def __post_init__(self) -> None:
        if self.length < 0 or self.width not in (1, 2, 4):
            raise MaskingError(f"lane of {self.length} values x {self.width} bytes is not a valid ring")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<u{self.width}")


# --------------------------------------------------------------------------- keys
def agent_private_key(master: bytes, task: str, agent: str) -> X25519PrivateKey:
    """The agent's mask key, derived by the key authority from its master secret, so
    the authority can recompute any seed for recovery without storing per-agent keys."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"|".join([_KEY_LABEL, task.encode(), agent.encode()])).derive(master)
    return X25519PrivateKey.from_private_bytes(raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_seed(own: X25519PrivateKey, peer_public: bytes, task: str, rnd: int, a: str, b: str) -> bytes:
    """The seed agents ``a`` and ``b`` share for one round (either end computes it)."""
    lo, hi = sorted((a, b))
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"|".join([_PAIR_LABEL, task.encode(), str(rnd).encode(), lo.encode(), hi.encode()])
                ).derive(shared)


def self_seed(own: X25519PrivateKey, task: str, rnd: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"|".join([_SELF_LABEL, task.encode(), str(rnd).encode()])).derive(private_bytes(own))


# --------------------------------------------------------------------------- expansion
def expand(seed: bytes, lanes: list[Lane], into: list[bytearray] | None = None) -> list[np.ndarray]:
    """ChaCha20 keystream of ``seed``, one independent stream per lane (nonce = lane index).
    ``into``: buffers from an earlier call to write over (a mask sums many streams; fresh
    pages for each would cost more than the cipher)."""
    out = []
    for index, lane in enumerate(lanes):
        nonce = bytes(8) + index.to_bytes(8, "little")  # 64-bit block counter from 0, then the lane
        stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
        size = lane.length * lane.width
        buf = into[index] if into is not None else bytearray(size + 15)  # update_into wants block slack
        stream.update_into(bytes(size), buf)  # calloc'd: zero pages, no copy
        out.append(np.frombuffer(buf, dtype=lane.dtype, count=lane.length))
    return out


def _add_into(acc: list[np.ndarray], terms: list[np.ndarray], sign: int) -> None:
    """acc += sign * terms, wrapping in each lane's unsigned ring (numpy wraps unsigned)."""
    with np.errstate(over="ignore"):
        for a, t in zip(acc, terms):
            if sign > 0:
                a += t
            else:
                a -= t


def _zeros(lanes: list[Lane]) -> list[np.ndarray]:
    return [np.zeros(lane.length, dtype=lane.dtype) for lane in lanes]


def agent_mask(me: str, own: X25519PrivateKey, roster: dict[str, bytes], selected: list[str], task: str,
               rnd: int, lanes: list[Lane], onto: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """What agent ``me`` adds to its lanes in round ``rnd``. ``onto``: lanes to add it
    to in place (the values themselves: one buffer less the size of the update)."""
    missing = [a for a in selected if a not in roster]
    if missing:
        raise MaskingError(f"no mask key for selected agent(s) {missing[:5]}: not in the key authority's roster")
    if me not in selected:
        raise MaskingError(f"{me!r} is not selected for round {rnd}")
    scratch = [bytearray(lane.length * lane.width + 15) for lane in lanes]
    if onto is None:
        acc = expand(self_seed(own, task, rnd), lanes)
    else:
        acc = onto
        _add_into(acc, expand(self_seed(own, task, rnd), lanes, scratch), 1)
    for peer in selected:
        if peer == me:
            continue
        _add_into(acc, expand(pair_seed(own, roster[peer], task, rnd, me, peer), lanes, scratch),
                  1 if me < peer else -1)
    return acc


def correction(keys: dict[str, X25519PrivateKey], selected: list[str], survivors: list[str], task: str, rnd: int,
               lanes: list[Lane]) -> list[np.ndarray]:
    """The survivors' masks summed: their self masks plus the pairwise terms with
    agents that dropped (the terms among survivors cancel). Key authority side."""
    survivors_set = set(survivors)
    if not survivors_set <= set(selected):
        raise MaskingError("survivors must be selected agents")
    dropped = [a for a in selected if a not in survivors_set]
    acc = _zeros(lanes)
    scratch = [bytearray(lane.length * lane.width + 15) for lane in lanes]
    for i in sorted(survivors_set):
        _add_into(acc, expand(self_seed(keys[i], task, rnd), lanes, scratch), 1)
        for d in dropped:
            term = expand(pair_seed(keys[i], public_bytes(keys[d]), task, rnd, i, d), lanes, scratch)
            _add_into(acc, term, 1 if i < d else -1)
    return acc


def mask(values: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    """The lanes as uploaded: values + mask in each ring."""
    out = [v.astype(m.dtype, copy=True) for v, m in zip(values, masks)]
    _add_into(out, masks, 1)
    return out


def unmask(sums: list[np.ndarray], lanes: list[Lane], corr: list[np.ndarray]) -> list[np.ndarray]:
    """Reduce the aggregator's int64 running sums into their rings and take the
    correction off: what is left is the sum of the survivors' values."""
    out = []
    for s, lane, c in zip(sums, lanes, corr):
        ring = (s.astype(np.int64) & ((1 << (8 * lane.width)) - 1)).astype(lane.dtype)
        with np.errstate(over="ignore"):
            out.append(ring - c.astype(lane.dtype))
    return out


# --------------------------------------------------------------------------- fixed point
def frac_bits(n_agents: int, max_weight: int) -> int:
    """Fractional bits of the 32-bit fixed-point encoding of ``weight * value``: a sum
    of ``n_agents`` values, each at most ``max_weight * PLAIN_BOUND``, must stay below
    2^31 in magnitude. Both ends compute it from the round start and the policy."""
    need = math.ceil(math.log2(max(n_agents, 1) * max(max_weight, 1) * PLAIN_BOUND))
    bits = 8 * PLAIN_WIDTH - 1 - need
    if bits < 0:
        raise MaskingError(f"{n_agents} agents x up to {max_weight} samples do not fit a {8 * PLAIN_WIDTH}-bit "
                           "fixed-point sum: lower max_samples in the key authority's policy")
    return bits


def encode_fixed(values: np.ndarray, weight: int, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``weight * values`` in fixed point (stochastic rounding: unbiased), as ring
    elements; returns them and how many values were clipped to PLAIN_BOUND."""
    # In place, one temporary: an agent encodes millions of values per round.
    scale = float(weight) * float(1 << bits)
    limit = PLAIN_BOUND * scale
    scaled = np.asarray(values, dtype=np.float64) * scale
    clipped = int(np.count_nonzero(scaled > limit)) + int(np.count_nonzero(scaled < -limit))
    np.clip(scaled, -limit, limit, out=scaled)
    scaled += rng.random(scaled.size, dtype=np.float32)  # 24 random bits: ample for a rounding draw
    np.floor(scaled, out=scaled)
    return scaled.astype(np.int64).astype("<u4"), clipped  # int64 -> uint32 wraps: the ring element


def decode_fixed(ring_sum: np.ndarray, bits: int) -> np.ndarray:
    """The signed float sum from a 32-bit ring sum."""
    signed = ring_sum.astype(np.uint32).view(np.int32).astype(np.float64)
    return signed / float(1 << bits)
