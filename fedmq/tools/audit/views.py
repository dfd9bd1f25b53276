"""What the aggregator sees of one single-sample update, under each protection mode.

The attacker is the aggregator: it knows the model it sent and the task's training
settings, so from a plaintext update it has the gradient exactly. Encrypted
coordinates are unknown to it, and it knows which they are (it adds the plain part
itself), so the attacker that counts is ``drop``: it leaves them out of its matching
loss. ``zero`` guesses 0 for them and matches every coordinate (an attacker that
treats the ciphertext's place as data, the setting of FedML-HE's Fig. 9); it is a
secondary figure. Under ``quantize`` it sees int8 codes of a plan it does not know
(the key authority's secret): codes are an affine image of the update per layer,
so it matches per-layer cosine similarity of the centered codes, which needs
neither scale nor offset.

A ``+mask`` mode (secure masking) sends every readable part as ring integers plus
the agent's pairwise and self masks (secure_aggregation.py): the view is built by
the product's own encoding and masking code (secure_round.py) for one agent of a
round of ``round_size``, and attacked like codes (centered, per-layer cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedmq.privacy import masking, secure_aggregation
from fedmq.privacy.protection import masked_code_width
from fedmq.privacy.quantization import LayerQuant, QuantPlan, quantize, segments
from fedmq.protocol.messages import Protection
from fedmq.tools.audit.secure_round import SecureRound, signed

CODE_ZERO = 127  # symmetric int8: code 127 is the value 0


@dataclass
class View:
    mode: str  # the protection
    target: torch.Tensor  # flat, over every parameter; only ``visible`` entries mean anything
    visible: torch.Tensor  # bool, over every parameter
    loss: Literal["l2", "cosine"]
    encrypted_fraction: float


@dataclass(frozen=True)
class Mode:
    """An audit mode name, parsed: ``none`` | ``quantize`` | ``ckks-{sens,rand}-pP`` |
    ``quantize+he-{sens,rand}-pP``, each optionally with ``+mask``."""

    name: str
    scheme: Literal["none", "ckks", "quantize", "quantize+he"]
    p: float
    selection: Literal["sensitivity", "random"]
    masked: bool

    @property
    def codes(self) -> bool:
        return self.scheme.startswith("quantize")

    def protection(self) -> Protection:
        """The task setting this mode audits (``none`` is ckks with nothing encrypted)."""
        return Protection(scheme="ckks" if self.scheme == "none" else self.scheme, p=self.p, mode=self.selection,
                          secure_masking=self.masked)


def parse(mode: str) -> Mode:
    masked = mode.endswith("+mask")
    core = mode.removesuffix("+mask")
    kind, _, frac = core.rpartition("-p")
    p = float(frac) if kind else 0.0
    base = kind or core
    selection: Literal["sensitivity", "random"] = "random" if base.endswith("-rand") else "sensitivity"
    scheme = base.removesuffix("-sens").removesuffix("-rand")
    if scheme not in ("none", "ckks", "quantize", "quantize+he"):
        raise ValueError(f"unknown audit mode {mode!r}")
    return Mode(mode, scheme, p, selection, masked)  # type: ignore[arg-type]


def encrypted_coordinates(mode: Mode, n: int, scores: np.ndarray, seed: int) -> np.ndarray:
    if mode.p <= 0:
        return np.zeros(n, dtype=bool)
    if mode.selection == "random":
        return masking.random_mask(n, mode.p, seed)
    return masking.top_p_mask(scores, mode.p)


def plan_for(updates: list[np.ndarray], sizes: list[int], max_agents: int = 2) -> QuantPlan:
    """An int8 plan calibrated like a key authority would: ranges covering the updates."""
    layers = []
    for a, b in segments(sizes):
        r = max(float(np.abs(u[a:b]).max()) for u in updates) or 1e-8
        layers.append(LayerQuant(8, "symmetric", "stochastic", -r, r))
    return QuantPlan(tuple(layers), n_ref=1, max_agents=max(max_agents, 2))


def readable_codes(codes: list[np.ndarray], encrypted: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Per layer, the codes that travel in the clear (the rest are BFV ciphertexts)."""
    return [c[~encrypted[a:b]] for (a, b), c in zip(segments(sizes), codes)]


def code_lanes(codes: list[np.ndarray], plan: QuantPlan) -> list[secure_aggregation.Lane]:
    """Masked code lanes in the ring of their sum, as protect_quantized sizes them."""
    return [secure_aggregation.Lane(c.size, masked_code_width(plan, c.dtype.itemsize)) for c in codes]


def place(values: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Values of the visible coordinates, laid back over every parameter (0 elsewhere)."""
    out = np.zeros(visible.size)
    out[visible] = values
    return out


def _masked_upload(mode: Mode, grad: np.ndarray, sizes: list[int], encrypted: np.ndarray, seed: int,
                   round_size: int) -> np.ndarray:
    """Agent 0's readable lanes as they travel in a round of ``round_size``, read as signed integers."""
    rng = np.random.default_rng(seed)
    rnd = SecureRound(round_size)
    if mode.codes:
        plan = plan_for([grad], sizes, round_size)
        codes = readable_codes(quantize(grad, plan, sizes, rng).codes, encrypted, sizes)
        lanes = code_lanes(codes, plan)
        up = rnd.upload(0, [c.astype(lane.dtype) for c, lane in zip(codes, lanes)], lanes)
        return place(np.concatenate([signed(u) for u in up]), ~encrypted)
    bits = secure_aggregation.frac_bits(round_size, 1)
    ring, _ = secure_aggregation.encode_fixed(grad[~encrypted], 1, bits, rng)
    lane = secure_aggregation.Lane(ring.size, secure_aggregation.PLAIN_WIDTH)
    return place(signed(rnd.upload(0, [ring], [lane])[0]), ~encrypted)


def make_view(mode: str, grad: np.ndarray, sizes: list[int], scores: np.ndarray, seed: int,
              treatment: Literal["drop", "zero"] = "drop", round_size: int = 4) -> View:
    """One agent's update as the aggregator reads it (``round_size``: agents of a masked round)."""
    m = parse(mode)
    n = grad.size
    encrypted = encrypted_coordinates(m, n, scores, seed)
    seen = grad
    loss: Literal["l2", "cosine"] = "l2"
    if m.masked:
        seen, loss = _masked_upload(m, grad, sizes, encrypted, seed, round_size), "cosine"
    elif m.codes:
        codes = quantize(grad, plan_for([grad], sizes), sizes, np.random.default_rng(seed)).codes
        seen = np.concatenate([c.astype(np.float64) - CODE_ZERO for c in codes])
        loss = "cosine"
    if treatment == "zero":
        seen = np.where(encrypted, 0.0, seen)
        encrypted_seen = np.zeros(n, dtype=bool)
    else:
        encrypted_seen = encrypted
    return View(mode, torch.as_tensor(seen, dtype=torch.float32), torch.as_tensor(~encrypted_seen), loss,
                float(encrypted.mean()))


MASKED_MODES = ["quantize+mask", "ckks-rand-p0.1+mask", "ckks-sens-p0.1+mask", "quantize+he-sens-p0.1+mask"]


def modes(quick: bool) -> list[str]:
    ps = (0.1, 0.3) if quick else (0.1, 0.3, 0.5)
    return ["none", "quantize", *[f"ckks-sens-p{p:g}" for p in ps], *[f"ckks-rand-p{p:g}" for p in ps],
            "quantize+he-sens-p0.1", *MASKED_MODES]
