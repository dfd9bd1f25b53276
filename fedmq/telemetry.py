"""Per-phase cost measurement with psutil: wall time, CPU time, peak RSS.

Phases are the ones of seed 000's Fig. 8 (train, encrypt, serialize, upload,
decrypt, evaluate ...); the agent publishes them per round so the operator sees
where time goes on every device.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from fedmq.wire import PhaseCost


@dataclass
class PhaseClock:
    phases: dict[str, PhaseCost] = field(default_factory=dict)
    _proc: psutil.Process = field(default_factory=psutil.Process, repr=False)
    peak_rss: int = 0

    @contextmanager
    def phase(self, name: str):
        cpu0 = self._proc.cpu_times()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            cpu1 = self._proc.cpu_times()
            cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            prev = self.phases.get(name)
            if prev is not None:
                wall, cpu = wall + prev.wall_s, cpu + prev.cpu_s
            self.phases[name] = PhaseCost(wall_s=wall, cpu_s=max(cpu, 0.0))
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
