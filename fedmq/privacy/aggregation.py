"""The server's running sum of one round's verified updates.

Each update is folded in as soon as it is verified, so memory is O(model), not
O(agents x model). It adds CKKS or BFV ciphertexts it cannot decrypt, weights
float parts by the declared sample counts, and adds integer codes it cannot
dequantize. Used by the aggregator daemon and by the benchmarks.
"""

from __future__ import annotations

import msgpack
import numpy as np

from fedmq.privacy import he, secure_aggregation
from fedmq.protocol import wire
from fedmq.privacy.quantization import sum_dtype


class RoundSum:
    def __init__(self, *, quantized: bool, ckks=None, bfv=None) -> None:
        self.quantized = quantized
        self.ckks, self.bfv = ckks, bfv
        self.acc: list | None = None
        self.plain: np.ndarray | None = None
        self.ring: np.ndarray | None = None  # masked fixed-point plain parts, summed in int64 (ring32)
        self.codes: list[np.ndarray] | None = None
        self.code_widths: list[int] = []
        self.n_params: int | None = None
        self.n_encrypted: int | None = None
        self.n_ciphertexts: int | None = None
        self.corrupt = False  # a fold failed half-way: restore from the last persisted copy

    def fold(self, update: wire.Update, plain: np.ndarray | None = None, consume: bool = False) -> None:
        """Add one update; raises HEError if its ciphertexts do not fit the task or the sum.
        ``consume``: drop each serialized ciphertext from ``update`` once added (the
        aggregator's way to hold one copy of an update at a time)."""
        if self.quantized:
            vectors = he.bfv_load(self.bfv, update.ciphertexts, self.n_ciphertexts)
            codes = [np.frombuffer(seg, dtype=f"<u{w}").astype(np.int64)
                     for seg, w in zip(update.codes, update.code_widths)]
            self.acc = he.add_into(self.acc, vectors)
        else:
            self._fold_ckks(update, consume)
        if self.quantized:
            self.codes = codes if self.codes is None else [a + c for a, c in zip(self.codes, codes)]
            self.code_widths = list(update.code_widths)
        else:
            self._fold_plain(update, plain)
        self.n_params, self.n_encrypted = update.n_params, update.n_encrypted
        self.n_ciphertexts = len(update.ciphertexts)

    def _fold_plain(self, update: wire.Update, plain: np.ndarray | None) -> None:
        if update.plain_dtype == "ring32":  # masked: weighted by the agent, summed as integers
            ring = np.frombuffer(update.plain, dtype="<u4").astype(np.int64)
            self.ring = ring if self.ring is None else self.ring + ring
            return
        if plain is None:
            plain = np.frombuffer(update.plain, dtype=np.dtype(update.plain_dtype).newbyteorder("<"))
        weighted = plain.astype(np.float64) * update.num_samples
        self.plain = weighted if self.plain is None else self.plain + weighted

    def fold_stream(self, update: wire.Update, count: int, ciphertexts, plain: np.ndarray | None = None) -> None:
        """Fold a CKKS update whose ``count`` ciphertexts arrive one by one from an
        iterator (``update`` carries every other field). Same guarantees as ``fold``:
        a failure half-way sets ``corrupt``."""
        if self.quantized:
            raise ValueError("streamed folding is for CKKS updates")
        self._fold_ckks(update, consume=False, blobs=ciphertexts, count=count)
        self._fold_plain(update, plain)
        self.n_params, self.n_encrypted, self.n_ciphertexts = update.n_params, update.n_encrypted, count

    def _fold_ckks(self, update: wire.Update, consume: bool, blobs=None, count: int | None = None) -> None:
        """One ciphertext at a time, each serialized blob dropped once added: the peak is
        the sum plus one update's bytes, not the sum plus the whole update loaded.
        A ciphertext failing half-way leaves the sum partly added: the caller must
        then restore the sum from its last committed copy (``corrupt`` says so)."""
        if blobs is None:
            blobs, count = update.ciphertexts, len(update.ciphertexts)
        he.check_count(self.ckks, [None] * count, update.n_encrypted)
        if self.acc is not None and len(self.acc) != count:
            raise he.HEError(f"update has {count} ciphertexts, sum has {len(self.acc)}")
        fresh = self.acc is None
        acc = [] if fresh else self.acc
        i = seen = 0
        try:
            for i, blob in enumerate(blobs):
                vec = he.load_ciphertext(self.ckks, blob, i, update.n_encrypted)
                if consume:
                    update.ciphertexts[i] = b""
                if fresh:
                    acc.append(vec)
                else:
                    acc[i] += vec
                seen = i + 1
                del blob, vec
            if seen != count:
                raise wire.WireError(f"update stream ended after {seen} of {count} ciphertexts")
        except (he.HEError, wire.WireError):
            if not fresh and seen > 0:
                self.corrupt = True
            raise
        self.acc = acc

    def merge(self, other: RoundSum) -> None:
        """Add another sum of the same round (a shard worker's partial sum): ciphertexts
        added homomorphically, float parts, masked rings and integer codes added as
        they are — the combined sum is exactly the sum of every update in either.
        Raises ValueError for sums of different layouts."""
        if other.quantized != self.quantized:
            raise ValueError("a quantized and a float sum cannot be combined")
        if other.n_params is None:
            return  # an empty shard
        if self.n_params is not None and (self.n_params, self.n_encrypted, self.n_ciphertexts) != (
                other.n_params, other.n_encrypted, other.n_ciphertexts):
            raise ValueError(f"sums of {other.n_params} params ({other.n_encrypted} encrypted) and "
                             f"{self.n_params} ({self.n_encrypted}) cannot be combined")
        if other.acc:
            self.acc = list(other.acc) if self.acc is None else he.add_into(self.acc, other.acc)
        for name in ("plain", "ring"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.copy() if mine is None else mine + theirs)
        if other.codes is not None:
            if self.codes is not None and [len(c) for c in self.codes] != [len(c) for c in other.codes]:
                raise ValueError("code segments differ between the sums")
            self.codes = list(other.codes) if self.codes is None else [a + b for a, b in zip(self.codes, other.codes)]
            self.code_widths = list(other.code_widths)
        self.n_params, self.n_encrypted, self.n_ciphertexts = other.n_params, other.n_encrypted, other.n_ciphertexts

    def unmask(self, lanes: list[secure_aggregation.Lane], correction: list[np.ndarray], frac_bits: int) -> None:
        """Take the survivors' masks off the masked lanes (the ring32 plain part, or
        the code segments): what remains is their plain sum."""
        if self.ring is not None:
            (ring,) = secure_aggregation.unmask([self.ring], lanes, correction)
            self.plain, self.ring = secure_aggregation.decode_fixed(ring, frac_bits), None
        else:
            self.codes = [c.astype(np.int64) for c in secure_aggregation.unmask(self.codes or [], lanes, correction)]

    def result(self, participants: list[str], total_weight: int, **extra) -> wire.Result:
        if self.ring is not None:
            raise ValueError("the sum is still masked")
        sums, widths = [], []
        for acc, width in zip(self.codes or [], self.code_widths):
            dtype = sum_dtype(len(participants), 8 * width)
            sums.append(acc.astype(dtype).tobytes())
            widths.append(dtype.itemsize)
        plain_avg = b"" if self.plain is None else (self.plain / total_weight).astype("<f4").tobytes()
        return wire.Result(participants=participants, total_weight=total_weight, n_params=self.n_params,
                           n_encrypted=self.n_encrypted, ciphertexts=he.serialize_all(self.acc or []),
                           plain_avg=plain_avg, code_sums=sums, code_sum_widths=widths, **extra)

    def meta_bytes(self) -> bytes:
        """Everything of the sum but its ciphertexts, for crash-safe persistence; the
        ciphertexts are stored one row each (``serialized_ciphertexts``), so persisting
        never builds one buffer the size of the sum."""
        return msgpack.packb({
            "quantized": self.quantized, "acc": None,
            "plain": None if self.plain is None else self.plain.astype("<f8").tobytes(),
            "ring": None if self.ring is None else self.ring.astype("<i8").tobytes(),
            "codes": [c.astype("<i8").tobytes() for c in self.codes or []], "code_widths": self.code_widths,
            "n_params": self.n_params, "n_encrypted": self.n_encrypted, "n_ciphertexts": self.n_ciphertexts,
        }, use_bin_type=True)

    def serialized_ciphertexts(self):
        for vec in self.acc or []:
            yield vec.serialize()

    @classmethod
    def from_stored(cls, meta: bytes, ciphertexts: list[bytes], *, ckks=None, bfv=None) -> RoundSum:
        raw = msgpack.unpackb(meta, raw=False)
        out = cls(quantized=raw["quantized"], ckks=ckks, bfv=bfv)
        out.n_params, out.n_encrypted, out.n_ciphertexts = raw["n_params"], raw["n_encrypted"], raw["n_ciphertexts"]
        blobs = raw["acc"] or ciphertexts  # stores written before ciphertexts had rows kept them in the map
        if blobs:
            out.acc = he.bfv_load(bfv, blobs) if out.quantized else he.load_ciphertexts(ckks, blobs, out.n_encrypted)
        if raw["plain"] is not None:
            out.plain = np.frombuffer(raw["plain"], dtype="<f8").copy()
        if raw.get("ring") is not None:
            out.ring = np.frombuffer(raw["ring"], dtype="<i8").copy()
        if raw["codes"]:
            out.codes = [np.frombuffer(c, dtype="<i8").copy() for c in raw["codes"]]
        out.code_widths = list(raw["code_widths"])
        return out
