"""What the aggregator sees of one single-sample update, under each protection mode.

The attacker is the aggregator: it knows the model it sent and the task's training
settings, so from a plaintext update it has the gradient exactly. Encrypted
coordinates are unknown to it, and the audit runs two attackers: ``drop`` leaves
them out of its matching loss (the strongest use of what it knows: the layout
tells it which coordinates are encrypted), ``zero`` guesses 0 for them and matches
every coordinate (an attacker that treats the ciphertext's place as data, the
setting of FedML-HE's Fig. 9). Under ``quantize`` it sees int8 codes of a plan it does
not know (the key authority's secret): codes are an affine image of the update
per layer, so it matches per-layer cosine similarity of the centered codes, which
needs neither scale nor offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedmq.privacy import masking
from fedmq.privacy.quantization import LayerQuant, QuantPlan, quantize, segments


@dataclass
class View:
    mode: str  # the protection
    target: torch.Tensor  # flat, over every parameter; only ``visible`` entries mean anything
    visible: torch.Tensor  # bool, over every parameter
    loss: Literal["l2", "cosine"]
    encrypted_fraction: float


def _plan_for(update: np.ndarray, sizes: list[int]) -> QuantPlan:
    """An int8 plan calibrated like a key authority would: ranges covering the update."""
    layers = []
    for a, b in segments(sizes):
        r = float(np.abs(update[a:b]).max()) or 1e-8
        layers.append(LayerQuant(8, "symmetric", "stochastic", -r, r))
    return QuantPlan(tuple(layers), n_ref=1, max_agents=2)


def make_view(mode: str, grad: np.ndarray, sizes: list[int], scores: np.ndarray, seed: int,
              treatment: Literal["drop", "zero"] = "drop") -> View:
    """``mode``: none | quantize | ckks-sens-P | ckks-rand-P | quantize+he-sens-P (P a fraction)."""
    n = grad.size
    kind, _, frac = mode.rpartition("-p")
    p = float(frac) if kind else 0.0
    base = kind or mode
    if base.endswith("-sens"):
        encrypted = masking.top_p_mask(scores, p)
    elif base.endswith("-rand"):
        encrypted = masking.random_mask(n, p, seed)
    else:
        encrypted = np.zeros(n, dtype=bool)
    seen = grad
    loss: Literal["l2", "cosine"] = "l2"
    if base.startswith("quantize"):
        codes = quantize(grad, _plan_for(grad, sizes), sizes, np.random.default_rng(seed)).codes
        seen = np.concatenate([c.astype(np.float64) - 127.0 for c in codes])  # symmetric int8: code 127 = 0
        loss = "cosine"
    if treatment == "zero":
        seen = np.where(encrypted, 0.0, seen)
        encrypted_seen = np.zeros(n, dtype=bool)
    else:
        encrypted_seen = encrypted
    return View(mode, torch.as_tensor(seen, dtype=torch.float32), torch.as_tensor(~encrypted_seen), loss,
                float(encrypted.mean()))


def modes(quick: bool) -> list[str]:
    ps = (0.1, 0.3) if quick else (0.1, 0.3, 0.5)
    return ["none", "quantize", *[f"ckks-sens-p{p:g}" for p in ps], *[f"ckks-rand-p{p:g}" for p in ps],
            "quantize+he-sens-p0.1"]
