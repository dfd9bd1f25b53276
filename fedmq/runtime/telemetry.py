"""Per-phase cost measurement with psutil: wall and CPU time, peak RSS, CPU %, bytes.

Phases are the ones of seed 000's Fig. 8 (train, sensitivity, encrypt, serialize,
upload, download, decrypt, evaluate); the agent publishes them per round so the
operator sees where time, memory and bytes go on every device. Peak RSS is
sampled by a small thread while a phase runs (psutil only reports the current
RSS), bytes come from the MQTT session's counters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from fedmq.protocol.wire import PhaseCost

SAMPLE_S = 0.02
# Every phase an agent times; the aggregator records no other name.
PHASES = ("train", "sensitivity", "encrypt", "serialize", "upload", "download", "decrypt", "evaluate")


def _no_bytes() -> tuple[int, int]:
    return 0, 0


@dataclass
class _Open:
    t0: float
    cpu0: float
    bytes0: tuple[int, int]
    peak: int
    stop: threading.Event
    sampler: threading.Thread | None = None


@dataclass
class PhaseClock:
    phases: dict[str, PhaseCost] = field(default_factory=dict)
    counters: Callable[[], tuple[int, int]] = _no_bytes  # (bytes sent, bytes received) so far
    _proc: psutil.Process = field(default_factory=psutil.Process, repr=False)
    peak_rss: int = 0
    _open: dict[str, _Open] = field(default_factory=dict, repr=False)

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def begin(self, name: str) -> None:
        """Start a phase that does not fit a ``with`` block (a download spread over messages)."""
        if name in self._open:
            return
        op = _Open(time.perf_counter(), self._cpu(), self.counters(), self._proc.memory_info().rss,
                   threading.Event())

        def sample() -> None:
            while not op.stop.wait(SAMPLE_S):
                try:
                    op.peak = max(op.peak, self._proc.memory_info().rss)
                except psutil.Error:
                    return
        op.sampler = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        op.sampler.start()
        self._open[name] = op

    def end(self, name: str) -> None:
        op = self._open.pop(name, None)
        if op is None:
            return
        op.stop.set()
        wall = time.perf_counter() - op.t0
        cpu = max(self._cpu() - op.cpu0, 0.0)
        peak = max(op.peak, self._proc.memory_info().rss)
        sent, received = self.counters()
        sent, received = max(sent - op.bytes0[0], 0), max(received - op.bytes0[1], 0)
        prev = self.phases.get(name)
        if prev is not None:  # a phase run twice in a round (a resent upload) adds up
            wall, cpu, peak = wall + prev.wall_s, cpu + prev.cpu_s, max(peak, prev.peak_rss)
            sent, received = sent + prev.bytes_sent, received + prev.bytes_received
        cost = PhaseCost(wall_s=wall, cpu_s=cpu, peak_rss=peak, cpu_pct=100.0 * cpu / wall if wall > 0 else 0.0,
                         bytes_sent=sent, bytes_received=received)
        self.phases[name] = cost
        self.peak_rss = max(self.peak_rss, peak)

    @contextmanager
    def phase(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def close(self) -> None:
        """Stop the samplers of phases that never ended (a download that never completed)."""
        for op in self._open.values():
            op.stop.set()
        self._open.clear()
