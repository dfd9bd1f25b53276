"""Mixed-precision quantization of updates (seed 001, section 3).

Each layer has its own bit width (8 or 16), mode (symmetric or asymmetric range)
and rounding (nearest, or stochastic — unbiased in expectation). The *plan* —
per-layer ranges, modes, rounding — is the task's secret: the key authority
seals it to the agents with the HE key, and the aggregator only ever sums
unsigned integers it cannot map back to values.

Weighting without leaking the plan: an agent quantizes ``(n_i / n_ref) * delta_i``
with the plan's public nominal sample count ``n_ref``, so the server's sum is
*unweighted*; agents rebuild the weighted FedAvg from it with the plain total
``sum n_i``. A sum of K values below ``2^bits`` needs ``bits + ceil(log2 K)``
bits: ``sum_bits`` sizes that for the plan's ``max_agents`` and a plan that
cannot be summed without overflow is refused up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class LayerQuant:
    bits: Literal[8, 16] = 8
    mode: Literal["symmetric", "asymmetric"] = "symmetric"
    rounding: Literal["nearest", "stochastic"] = "stochastic"
    lo: float = -1.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise PlanError(f"bits must be 8 or 16, got {self.bits}")
        if not self.hi > self.lo:
            raise PlanError(f"range [{self.lo}, {self.hi}] is empty")

    @property
    def levels(self) -> int:
        """Largest unsigned code; codes run 0..levels."""
        return (1 << self.bits) - 1 if self.mode == "asymmetric" else 2 * ((1 << (self.bits - 1)) - 1)

    @property
    def zero(self) -> float:
        """Value of code 0."""
        return self.lo if self.mode == "asymmetric" else -max(abs(self.lo), abs(self.hi))

    @property
    def scale(self) -> float:
        span = self.hi - self.lo if self.mode == "asymmetric" else 2 * max(abs(self.lo), abs(self.hi))
        return span / self.levels

    @property
    def width(self) -> int:
        """Bytes per code on the wire."""
        return self.bits // 8


@dataclass(frozen=True)
class QuantPlan:
    layers: tuple[LayerQuant, ...]
    n_ref: int = 100
    max_agents: int = 16

    def __post_init__(self) -> None:
        if not self.layers:
            raise PlanError("a plan needs at least one layer setting")
        if self.n_ref < 1 or self.max_agents < 1:
            raise PlanError("n_ref and max_agents must be positive")
        if self.sum_bits > 62:
            raise PlanError(f"sums of {self.max_agents} agents need {self.sum_bits} bits; int64 holds 62")

    def for_layers(self, layer_sizes: list[int]) -> list[LayerQuant]:
        """One setting per model layer; the plan's list repeats if the model has more layers."""
        return [self.layers[i % len(self.layers)] for i in range(len(layer_sizes))]

    @property
    def sum_bits(self) -> int:
        return max(q.bits for q in self.layers) + math.ceil(math.log2(max(self.max_agents, 2)))

    def check_packing(self, usable_bits: int) -> int:
        """Codes per packed BFV slot; raises PlanError if even one sum cannot fit."""
        per_slot = usable_bits // self.sum_bits
        if per_slot < 1:
            raise PlanError(f"a sum of {self.max_agents} agents needs {self.sum_bits} bits per value; "
                            f"the BFV plaintext modulus offers {usable_bits}: lower bits or max_agents")
        return per_slot

    def check_round(self, n_agents: int) -> None:
        """A round may not sum more agents than the lanes were sized for."""
        if n_agents > self.max_agents:
            raise PlanError(f"round selects {n_agents} agents; the plan's sums hold at most {self.max_agents}")

    def to_wire(self) -> dict:
        return {"layers": [vars(q) for q in self.layers], "n_ref": self.n_ref, "max_agents": self.max_agents}

    @classmethod
    def from_wire(cls, raw: dict) -> "QuantPlan":
        try:
            return cls(tuple(LayerQuant(**q) for q in raw["layers"]), int(raw["n_ref"]), int(raw["max_agents"]))
        except (KeyError, TypeError) as exc:
            raise PlanError(f"malformed quantization plan: {exc}") from None


@dataclass
class Quantized:
    codes: list[np.ndarray]  # per layer, unsigned codes (uint8 or uint16)
    clipped: int = 0
    total: int = 0
    widths: list[int] = field(default_factory=list)


def segments(layer_sizes: list[int]):
    """(start, end) of each layer in the flat parameter vector."""
    start = 0
    for size in layer_sizes:
        yield start, start + size
        start += size


def quantize(values: np.ndarray, plan: QuantPlan, layer_sizes: list[int], rng: np.random.Generator) -> Quantized:
    """Codes for ``values`` (already scaled by n_i / n_ref); counts values clipped to the ranges."""
    out = Quantized(codes=[], total=values.size)
    for (a, b), q in zip(segments(layer_sizes), plan.for_layers(layer_sizes)):
        x = (values[a:b] - q.zero) / q.scale
        over = (x < 0) | (x > q.levels)
        out.clipped += int(over.sum())
        x = np.clip(x, 0, q.levels)
        codes = np.floor(x + (rng.random(x.size) if q.rounding == "stochastic" else 0.5))
        dtype = np.uint8 if q.bits == 8 else np.dtype("<u2")
        out.codes.append(np.minimum(codes, q.levels).astype(dtype))
        out.widths.append(q.width)
    return out


def dequantize_sum(code_sums: list[np.ndarray], count: int, plan: QuantPlan, layer_sizes: list[int]) -> np.ndarray:
    """Sum over ``count`` agents of their (scaled) values, from the sums of their codes."""
    parts = [count * q.zero + s.astype(np.float64) * q.scale
             for s, q in zip(code_sums, plan.for_layers(layer_sizes))]
    return np.concatenate(parts) if parts else np.zeros(0)


def sum_dtype(count: int, bits: int) -> np.dtype:
    """Smallest unsigned little-endian integer type that holds a sum of ``count`` codes."""
    need = bits + math.ceil(math.log2(max(count, 2)))
    for dt in ("<u2", "<u4", "<u8"):
        if need <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    raise PlanError(f"a sum of {count} {bits}-bit codes does not fit 64 bits")
