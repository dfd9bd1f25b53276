"""Folding: a completed update is verified (layout, packing, finite values) and
added to the round's running homomorphic sum in one store transaction; a fold
that fails half-way restores the committed sum."""

from __future__ import annotations

import logging
import time

import numpy as np

from fedmq.privacy import he
from fedmq.protocol import update_stream, wire
from fedmq.protocol.chunking import Completed
from fedmq.privacy.aggregation import RoundSum

from aggregator.round_state import Rejected, RoundState

log = logging.getLogger("fedmq.aggregator")


class Folding:
    """Verify a whole update, then fold it into the running sum."""

    @property
    def n_encrypted(self) -> int | None:
        """Encrypted values per update in the open round, once its layout is agreed."""
        return None if self._agreed_key is None else self._agreed_key[1]

    @property
    def code_layout(self) -> list[tuple[int, int]] | None:
        """(codes, width) per segment of the open round's updates, once agreed."""
        return None if self._agreed_key is None else [tuple(c) for c in self._agreed_key[4]]

    def _fold(self, done: Completed) -> None:
        """Verify a whole update; fold it once the round's layout is agreed.

        The layout (parameter count, how many values are encrypted, the mask digest,
        the code segments) is never taken from the first update: a hostile agent's
        10-parameter update would lock every honest agent out. Until ``quorum``
        updates agree on one layout, completed updates are held (their chunks stay
        on disk, so a restart finds them again); the agreeing ones are then folded
        and the others rejected."""
        if done.kind == "partial":
            self._fold_partial(done)
            return
        st, env = self.state, done.envelope
        limit = self.cfg.max_update_bytes
        if not self.sum.quantized:  # CKKS: validated without its ciphertexts; folded straight off disk later
            update, count = update_stream.read_update(done.parts, limit)
        else:  # quantized updates are small (a few bytes per parameter): decoded whole
            update, count = wire.decode_body("update", b"".join(done.parts())), 0
        if self.protection.dp is not None and st.purpose == "train" and update.num_samples != 1:
            raise Rejected(f"{env.sender} declares {update.num_samples} samples; under differential privacy every "
                           "update counts with weight 1")
        if update.num_samples > self.max_samples:
            raise Rejected(f"{env.sender} declares {update.num_samples} samples, over the policy's "
                           f"max_samples bound of {self.max_samples}")
        plain = self._check_layout(st, update)
        key = _layout_key(update)
        if self._agreed_key is not None:  # agreed earlier this round
            if key != self._agreed_key:
                raise Rejected(f"{env.sender}'s update has layout {_describe(key)}; the round agreed on "
                               f"{_describe(self._agreed_key)}")
            self._fold_now(done, update, count, plain)
            return
        if any(h[0].sender == env.sender for group in self._held.values() for h in group):
            raise Rejected(f"{env.sender} already has a complete update waiting in round {st.round}")
        group = self._held.setdefault(key, [])
        group.append((done, update, count, plain))
        if len(group) < st.quorum:
            log.info("round %d: %s's update held until %d update(s) agree on its layout (%s): %d so far",
                     st.round, env.sender, st.quorum, _describe(key), len(group))
            return
        held, self._held = self._held, {}
        self._agreed_key = key
        log.info("round %d: layout %s agreed by %d updates", st.round, _describe(key), len(group))
        for other, entries in held.items():
            if other != key:
                for d, *_ in entries:
                    st.withdraw(d.sender)
                    self.metrics.rejected.inc()
                    log.warning("rejected %s's round-%d update: layout %s, the round agreed on %s", d.sender,
                                st.round, _describe(other), _describe(key))
        for d, u, c, pl in group:
            try:
                self._fold_now(d, u, c, pl)
            except (ValueError, Rejected, he.HEError) as exc:
                st.withdraw(d.sender)
                self.metrics.rejected.inc()
                log.warning("rejected %s's round-%d update: %s", d.sender, st.round, exc)

    def _fold_now(self, done: Completed, update: wire.Update, count: int, plain: np.ndarray) -> None:
        """Fold a verified update into the running sum (one store transaction)."""
        st, env = self.state, done.envelope
        nbytes, parts, limit = done.size, done.parts, self.cfg.max_update_bytes
        streamed = not self.sum.quantized
        t0 = time.perf_counter()
        try:
            if streamed:
                self.sum.fold_stream(update, count, update_stream.iter_ciphertexts(parts, limit), plain)
            else:
                self.sum.fold(update, plain, consume=True)
        except (he.HEError, wire.WireError):
            if self.sum.corrupt:  # half-added: back to the sum as last committed
                saved = self.store.load()
                self.sum = self._stored_sum(saved[2]) if saved and saved[2] \
                    else RoundSum(quantized=self.sum.quantized, ckks=self.ctx, bfv=self.bfv_ctx)
            raise
        st.record(env.sender, update.num_samples, time.time())
        self._adopt(_layout_key(update))
        self.store.fold(st, {"agreed": layout_to_json(self._agreed_key)}, self.sum.meta_bytes(),
                        self.sum.serialized_ciphertexts())
        self.agg_s += time.perf_counter() - t0
        self.bytes_received += nbytes
        self.metrics.updates.inc()
        log.info("round %d: folded %s's update (%d samples, %d bytes); %d/%d reported",
                 st.round, env.sender, update.num_samples, nbytes, len(st.weights), len(st.selected))

    def _adopt(self, key: tuple) -> None:
        """What a quorum of verified updates (or a shard's partial sum) fixed: the
        round's layout, and the task's model and mask once and for all."""
        n_params, _, mask_digest, _, _, fingerprint = key
        self._agreed_key, self.n_params = key, n_params
        if self.fingerprint is None and fingerprint is not None:
            self.fingerprint = fingerprint
            log.info("task model fixed by a quorum of verified updates: fingerprint %s", fingerprint.hex()[:16])
        if self.state.purpose == "train" and self.mask_digest is None and mask_digest is not None:
            self.mask_digest = mask_digest
            log.info("task mask fixed by a quorum of verified updates: digest %s", mask_digest.hex()[:16])

    def _check_layout(self, st: RoundState, update: wire.Update) -> np.ndarray:
        """Reject an update whose packing or mask does not fit the task; returns its plaintext part."""
        if self.fingerprint is not None and update.fingerprint != self.fingerprint:
            got = update.fingerprint.hex()[:16] if update.fingerprint else "none"
            raise Rejected(f"update's model fingerprint {got} differs from the task's {self.fingerprint.hex()[:16]} "
                           "(another workload, layout or initial weights)")
        if self.n_params is not None and update.n_params != self.n_params:
            raise Rejected(f"update packs {update.n_params} parameters; the model has {self.n_params}")
        if update.n_encrypted > update.n_params:
            raise Rejected(f"{update.n_encrypted} encrypted values exceed the {update.n_params} parameters")
        prot = self.protection
        if st.purpose == "sensitivity":
            if update.n_encrypted != update.n_params:
                raise Rejected("a sensitivity map must travel fully encrypted")
        elif prot.scheme != "ckks":
            self._check_quantized_layout(update)
            return np.zeros(0)
        else:
            if prot.p in (0.0, 1.0) and update.n_encrypted != round(prot.p * update.n_params):
                raise Rejected(f"{update.n_encrypted} encrypted values where p={prot.p} means "
                               f"{round(prot.p * update.n_params)}")
            if self.mask_digest is not None and update.mask_digest != self.mask_digest:
                got = update.mask_digest.hex()[:16] if update.mask_digest else "none"
                raise Rejected(f"mask digest {got} differs from the task's mask {self.mask_digest.hex()[:16]}")
            want = "ring32" if prot.secure_masking and update.n_encrypted < update.n_params else prot.plain_dtype
            if update.plain_dtype != want:
                raise Rejected(f"plaintext part is {update.plain_dtype}; the task sends {want}"
                               + (" (secure masking is on: an unmasked update would expose this agent)"
                                  if want == "ring32" else ""))
        if self.n_encrypted is not None and update.n_encrypted != self.n_encrypted:
            raise Rejected(f"{update.n_encrypted} encrypted values; this round's updates have {self.n_encrypted}")
        masked = update.plain_dtype == "ring32"
        dtype = np.dtype("<u4") if masked else np.dtype(update.plain_dtype).newbyteorder("<")
        expected = (update.n_params - update.n_encrypted) * dtype.itemsize
        if len(update.plain) != expected:
            raise Rejected(f"wrong packing length: plaintext part has {len(update.plain)} bytes, "
                           f"expected {expected}")
        plain = np.frombuffer(update.plain, dtype=dtype)
        if not masked and not np.isfinite(plain).all():
            raise Rejected("plaintext part holds NaN or infinity")
        return plain

    def _check_quantized_layout(self, update: wire.Update) -> None:
        """Integer codes: segments consistent with the round's first update, nothing in float."""
        prot = self.protection
        if update.plain:
            raise Rejected("a quantized update carries no float part")
        if prot.scheme == "quantize" and (update.n_encrypted or update.ciphertexts):
            raise Rejected("scheme 'quantize' sends no ciphertexts")
        if prot.scheme == "quantize+he" and self.bfv_ctx is None:
            raise Rejected("no BFV parameters from the key authority yet")
        if len(update.codes) != len(update.code_widths):
            raise Rejected(f"{len(update.codes)} code segments but {len(update.code_widths)} widths")
        allowed = (2, 4) if prot.secure_masking else (1, 2)
        if any(w not in allowed for w in update.code_widths):
            raise Rejected(f"code widths {sorted(set(update.code_widths))}; the task's "
                           f"{'masked' if prot.secure_masking else 'unmasked'} codes are {allowed} bytes wide")
        lengths = []
        for seg, width in zip(update.codes, update.code_widths):
            if len(seg) % width:
                raise Rejected(f"a segment of {len(seg)} bytes is not a whole number of {width}-byte codes")
            lengths.append((len(seg) // width, width))
        if sum(n for n, _ in lengths) + update.n_encrypted != update.n_params:
            raise Rejected(f"wrong packing length: {sum(n for n, _ in lengths)} plain codes + "
                           f"{update.n_encrypted} encrypted != {update.n_params} parameters")
        if self.code_layout is not None and lengths != self.code_layout:
            raise Rejected("code segments differ from this round's other updates")

    def _stored_sum(self, meta: bytes) -> RoundSum:
        return RoundSum.from_stored(meta, self.store.sum_ciphertexts(), ckks=self.ctx, bfv=self.bfv_ctx)


def _layout_key(update: wire.Update) -> tuple:
    """What every update of a round must share."""
    return (update.n_params, update.n_encrypted, update.mask_digest, update.plain_dtype,
            tuple((len(c) // w, w) for c, w in zip(update.codes, update.code_widths)), update.fingerprint)


def _describe(key: tuple) -> str:
    n_params, n_encrypted, digest, dtype, codes, fingerprint = key
    return (f"{n_params} params, {n_encrypted} encrypted, mask {digest.hex()[:12] if digest else 'none'}"
            + (f", {len(codes)} code segments" if codes else f", {dtype}")
            + f", model {fingerprint.hex()[:12] if fingerprint else 'unnamed'}")


def layout_to_json(key: tuple) -> list:
    n_params, n_encrypted, digest, dtype, codes, fingerprint = key
    return [n_params, n_encrypted, digest.hex() if digest else None, dtype, [list(c) for c in codes],
            fingerprint.hex() if fingerprint else None]


def layout_from_json(raw: list) -> tuple:
    n_params, n_encrypted, digest, dtype, codes, fingerprint = raw
    return (n_params, n_encrypted, bytes.fromhex(digest) if digest else None, dtype, tuple(tuple(c) for c in codes),
            bytes.fromhex(fingerprint) if fingerprint else None)
