"""CKKS backend (TenSEAL): contexts, slot-packed encryption, ciphertext sums.

Why these defaults (measured with ``fedmq bench he`` precursors, see README):

* The server's FedAvg is addition-only: agents encrypt ``n_i * w_i`` with their
  integer sample count ``n_i``; the server adds ciphertexts and the plain total
  ``sum n_i``; agents divide after decryption. No ciphertext multiplication, so no
  rescaling level is consumed and one data prime suffices.
* TenSEAL insists on key-switching support, so the modulus has two primes: a
  54-bit data prime and a 55-bit special prime, 109 bits in all, which is exactly
  the 128-bit-security bound for N = 4096 in the HE standard. A ciphertext is then
  2 polynomials x 1 data prime; SEAL's zstd compression packs the 54-bit
  coefficients to ~30.2 bytes per parameter ([60, 49] measured 32.1; FLARE's
  N=8192, [60, 40, 40, 60] measures ~81).
* Scale 2^30 leaves 2^23 (about 8.4e6) of head-room for ``|sum n_i w_i|`` under
  the 54-bit prime, while the relative error of the averaged weights stays near
  1e-8 (measured 7.7e-9 over 131k parameters, 3 agents).
* Symmetric (secret-key) encryption: every encrypting party is an agent that holds
  the secret key anyway; it is faster than public-key encryption and the context
  handed out is 3x smaller (no public/relinearization keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# HE standard (homomorphicencryption.org, 2018), 128-bit classical security, ternary secret.
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class HEError(ValueError):
    """A ciphertext or context that does not fit the task's parameters."""


@dataclass(frozen=True)
class CkksParams:
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = field(default=(54, 55))
    scale_bits: int = 30

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def headroom(self) -> float:
        """Largest |value| a slot may hold (sums included) before it wraps mod q."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - 1 - self.scale_bits)

    def check(self) -> None:
        limit = MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        if limit is None:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)}")
        total = sum(self.coeff_mod_bit_sizes)
        if total > limit:
            raise ValueError(f"coeff_mod_bit_sizes sum to {total} bits; 128-bit security allows "
                             f"at most {limit} for N={self.poly_modulus_degree}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError("coeff_mod_bit_sizes needs a data prime and a special prime")
        if not 20 <= self.scale_bits < self.coeff_mod_bit_sizes[0] - 1:
            raise ValueError("scale_bits must be at least 20 and below the first prime's size")


def _ts():  # imported lazily: an idle agent should not pay for the HE library
    import tenseal
    import tenseal.sealapi  # noqa: F401  registers SEAL types (Modulus) used by params_of

    return tenseal


def create_secret_context(params: CkksParams, n_threads: int | None = None):
    params.check()
    ts = _ts()
    kwargs = {"n_threads": n_threads} if n_threads else {}
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, **kwargs)
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def serialize_secret(ctx) -> bytes:
    return ctx.serialize(save_public_key=False, save_secret_key=True,
                         save_galois_keys=False, save_relin_keys=False)


def serialize_public(ctx) -> bytes:
    """Parameters only: enough to load and add ciphertexts, useless to decrypt."""
    return ctx.serialize(save_public_key=False, save_secret_key=False,
                         save_galois_keys=False, save_relin_keys=False)


def load_context(data: bytes, n_threads: int | None = None):
    ts = _ts()
    try:
        ctx = ts.context_from(data, n_threads=n_threads) if n_threads else ts.context_from(data)
    except Exception as exc:
        raise HEError(f"not a TenSEAL context: {exc}") from None
    return ctx


def params_of(ctx) -> CkksParams:
    """Parameters recovered from a loaded context (the key authority's are authoritative)."""
    seal_ctx = ctx.seal_context().data
    parms = seal_ctx.key_context_data().parms()
    bits = tuple(int(q.bit_count()) for q in parms.coeff_modulus())
    return CkksParams(parms.poly_modulus_degree(), bits, int(round(math.log2(ctx.global_scale))))


def n_ciphertexts(n_values: int, slots: int) -> int:
    return -(-n_values // slots)


def encrypt(ctx, values: np.ndarray, progress: Iterable | None = None) -> list[bytes]:
    """Encrypt a flat vector, ``slots`` values per ciphertext; returns serialized ciphertexts."""
    ts = _ts()
    slots = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2
    flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
    return [ts.ckks_vector(ctx, flat[i : i + slots].tolist()).serialize()
            for i in range(0, flat.size, slots)]


def _slots_of(ctx) -> int:
    return ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def check_count(ctx, blobs: Sequence[bytes], n_values: int) -> None:
    expected = n_ciphertexts(n_values, _slots_of(ctx))
    if len(blobs) != expected:
        raise HEError(f"{len(blobs)} ciphertexts for {n_values} values; expected {expected}")


def load_ciphertext(ctx, blob: bytes, i: int, n_values: int):
    """Deserialize ciphertext ``i`` of a vector of ``n_values`` and check what it packs."""
    slots = _slots_of(ctx)
    try:
        vec = _ts().ckks_vector_from(ctx, blob)
    except Exception as exc:
        raise HEError(f"ciphertext {i} does not load under the task's context: {exc}") from None
    want = min(slots, n_values - i * slots)
    if vec.size() != want:
        raise HEError(f"ciphertext {i} packs {vec.size()} values, expected {want}")
    return vec


def load_ciphertexts(ctx, blobs: Sequence[bytes], n_values: int) -> list:
    """Deserialize and check that the blobs pack exactly ``n_values`` for this context."""
    check_count(ctx, blobs, n_values)
    return [load_ciphertext(ctx, blob, i, n_values) for i, blob in enumerate(blobs)]


def add_into(acc: list | None, vectors: list) -> list:
    """Fold one update into the running encrypted sum (O(model) memory at the server)."""
    if acc is None:
        return vectors
    if len(acc) != len(vectors):
        raise HEError(f"update has {len(vectors)} ciphertexts, sum has {len(acc)}")
    for a, v in zip(acc, vectors):
        a += v
    return acc


def serialize_all(vectors: list) -> list[bytes]:
    return [v.serialize() for v in vectors]


def decrypt(ctx, blobs: Sequence[bytes], n_values: int) -> np.ndarray:
    if not ctx.is_private():
        raise HEError("this context holds no secret key")
    vectors = load_ciphertexts(ctx, blobs, n_values)
    return np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])[:n_values]


# --------------------------------------------------------------------------- BFV (quantize+he)


@dataclass(frozen=True)
class BfvParams:
    """BFV for summing quantized codes: N=4096, q=[54, 55] (109 bits, 128-bit
    security), plaintext modulus a 36-bit batching prime. Codes are packed several
    per slot in lanes wide enough for the sum of the plan's max_agents; measured
    5.0 bytes per int8 code with 3 lanes per slot (see the issue-4 note)."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (54, 55)
    plain_modulus_bits: int = 36

    @property
    def usable_bits(self) -> int:
        """Bits a packed slot may use: decryption is signed mod t, so stay below t/2."""
        return self.plain_modulus_bits - 1

    def check(self) -> None:
        CkksParams(self.poly_modulus_degree, self.coeff_mod_bit_sizes, 20).check()
        if not 17 <= self.plain_modulus_bits <= 60:
            raise ValueError("plain_modulus_bits must be within [17, 60]")


def create_bfv_secret_context(params: BfvParams, n_threads: int | None = None):
    params.check()
    ts = _ts()
    t = ts.sealapi.PlainModulus.Batching(params.poly_modulus_degree, params.plain_modulus_bits).value()
    kwargs = {"n_threads": n_threads} if n_threads else {}
    return ts.context(ts.SCHEME_TYPE.BFV, params.poly_modulus_degree, plain_modulus=t,
                      coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                      encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, **kwargs)


def _slots(ctx) -> int:
    return ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()


def bfv_usable_bits(ctx) -> int:
    t = ctx.seal_context().data.key_context_data().parms().plain_modulus()
    return int(t.bit_count()) - 1


def pack_lanes(codes: np.ndarray, lane_bits: int, per_slot: int) -> np.ndarray:
    """Several codes per integer slot: slot = sum_j code_j << (lane_bits * j)."""
    padded = np.zeros(-(-codes.size // per_slot) * per_slot, dtype=np.int64)
    padded[: codes.size] = codes
    shifts = np.left_shift(np.int64(1), np.arange(per_slot, dtype=np.int64) * lane_bits)
    return (padded.reshape(-1, per_slot) * shifts).sum(axis=1)


def unpack_lanes(slots: np.ndarray, n_codes: int, lane_bits: int, per_slot: int) -> np.ndarray:
    lane_mask = (1 << lane_bits) - 1
    shifts = np.arange(per_slot, dtype=np.int64) * lane_bits
    return ((slots[:, None] >> shifts) & lane_mask).reshape(-1)[:n_codes]


def bfv_encrypt_codes(ctx, codes: np.ndarray, lane_bits: int, per_slot: int) -> list[bytes]:
    ts = _ts()
    slots = _slots(ctx)
    packed = pack_lanes(codes, lane_bits, per_slot)
    return [ts.bfv_vector(ctx, packed[i : i + slots].tolist()).serialize() for i in range(0, packed.size, slots)]


def bfv_load(ctx, blobs: Sequence[bytes], expected: int | None = None) -> list:
    """Deserialize BFV ciphertexts under the task's context; ``expected`` checks the count."""
    ts = _ts()
    if expected is not None and len(blobs) != expected:
        raise HEError(f"{len(blobs)} BFV ciphertexts; this round's updates have {expected}")
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(ts.bfv_vector_from(ctx, blob))
        except Exception as exc:
            raise HEError(f"BFV ciphertext {i} does not load under the task's context: {exc}") from None
    return out


def bfv_decrypt_codes(ctx, blobs: Sequence[bytes], n_codes: int, lane_bits: int, per_slot: int) -> np.ndarray:
    if not ctx.is_private():
        raise HEError("this context holds no secret key")
    slots = np.concatenate([np.asarray(v.decrypt(), dtype=np.int64) for v in bfv_load(ctx, blobs)]) \
        if blobs else np.zeros(0, dtype=np.int64)
    if (slots < 0).any():
        raise HEError("a packed BFV slot wrapped around the plaintext modulus: the plan overflowed")
    return unpack_lanes(slots, n_codes, lane_bits, per_slot)
