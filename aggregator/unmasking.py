"""Unmasking a closed round (secure masking): the aggregator asks the key
authority for the survivors' mask correction and takes it off the sum.

Crash-safe: the survivor set is written down before the request goes out, and a
restarted aggregator closes the round with exactly that set — the key authority
answers one set per round (keyauthority/mask_ledger.py), so asking with another
would only get the round refused.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from fedmq.privacy import secure_aggregation
from fedmq.protocol import topics, wire
from fedmq.runtime.private_files import write_private

log = logging.getLogger("fedmq.aggregator")


class UnmaskFailed(RuntimeError):
    """The round's sum stays masked; the text says why (the round is aborted)."""


class Unmasking:
    """The aggregator's side of mask recovery."""

    @property
    def _unmasking_file(self) -> Path:
        return Path(self.cfg.state_dir) / "unmasking.json"

    def _mask_lanes(self) -> list[secure_aggregation.Lane]:
        """The masked lanes of the open round's updates, from their agreed layout."""
        if not self.sum.quantized:
            n_plain = self._agreed_key[0] - self._agreed_key[1]
            return [secure_aggregation.Lane(n_plain, secure_aggregation.PLAIN_WIDTH)] if n_plain else []
        return [secure_aggregation.Lane(n, w) for n, w in self.code_layout or []]

    def _round_is_masked(self) -> bool:
        return (self.protection.secure_masking and self.state.purpose == "train" and self._agreed_key is not None
                and bool(self._mask_lanes()))

    def _frac_bits(self) -> int:
        weight = 1 if self.protection.dp is not None else self.max_samples
        return secure_aggregation.frac_bits(len(self.state.selected), weight)

    def _recorded_survivors(self, rnd: int) -> list[str] | None:
        if not self._unmasking_file.exists():
            return None
        saved = json.loads(self._unmasking_file.read_text())
        return saved["survivors"] if saved.get("round") == rnd else None

    def _unmask(self, stop: threading.Event) -> None:
        """Unmask the open round's sum in place; raises UnmaskFailed."""
        st = self.state
        survivors = sorted(st.weights)
        recorded = self._recorded_survivors(st.round)
        if recorded is not None and recorded != survivors:
            raise UnmaskFailed(f"the sum holds {survivors}, but unmasking was asked for {recorded} before a restart")
        lanes = self._mask_lanes()
        write_private(self._unmasking_file, json.dumps({"round": st.round, "survivors": survivors}).encode())
        self._correction = None
        request = wire.MaskRequest(selected=sorted(st.selected), survivors=survivors,
                                   lanes=[[lane.length, lane.width] for lane in lanes])
        t0 = time.perf_counter()
        self.session.send(topics.mask_request(self.task, st.round), request, task=self.task, rnd=st.round)
        log.info("round %d: asked the key authority to unmask the sum of %d survivor(s) (%d dropped)", st.round,
                 len(survivors), len(st.selected) - len(survivors))
        got = self._pump(stop, until=lambda: self._correction is not None, timeout=self.cfg.unmask_timeout_s)
        answer, self._correction = self._correction, None
        if not got:
            raise UnmaskFailed(f"no mask correction from the key authority within {self.cfg.unmask_timeout_s:.0f}s")
        if isinstance(answer, wire.MaskRefused):
            raise UnmaskFailed(f"the key authority refused to unmask: {answer.reason}")
        if list(answer.survivors) != survivors or len(answer.lanes) != len(lanes):
            raise UnmaskFailed("the correction answers another survivor set or layout")
        corr = []
        for lane, blob in zip(lanes, answer.lanes):
            if len(blob) != lane.length * lane.width:
                raise UnmaskFailed(f"a correction lane has {len(blob)} bytes, expected {lane.length * lane.width}")
            corr.append(np.frombuffer(blob, dtype=lane.dtype))
        self.sum.unmask(lanes, corr, self._frac_bits() if not self.sum.quantized else 0)
        self.agg_s += time.perf_counter() - t0
        log.info("round %d: sum unmasked (%.2fs)", st.round, time.perf_counter() - t0)

    def _on_mask_correction(self, env: wire.Envelope) -> None:
        """The key authority's answer (signed by it), for the round being unmasked only."""
        wire.check_signature(env, self.authority_key, "the key authority")
        if self.state is None or env.round != self.state.round:
            raise wire.WireError(f"mask correction for round {env.round}, which is not being unmasked")
        if env.kind == "mask_refused":
            self._correction = wire.decode_body(env.kind, env.body)
            return
        done = self._correction_chunks.add(env)
        if done is not None:
            self._correction = wire.decode_body(done.kind, done.body)
