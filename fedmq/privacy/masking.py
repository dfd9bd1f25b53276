"""Selective Parameter Encryption masks (seed 000, section 2.4).

A mask says which parameters travel encrypted. Every agent of a task must derive
the *same* mask, so derivation is deterministic: scores are first canonicalized
to integers (24 bits of resolution relative to the largest score) so that last-bit
floating-point differences between devices cannot reorder them, then the top
``ceil(p * n)`` are taken with ties broken by the lower index. The first and last
layers may be forced in (the paper's empirical recipe). The SHA-256 of the packed
mask travels with every update, so a divergent agent is caught, not averaged in.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

SCORE_BITS = 24


def needs_agreement(scheme: str, p: float, mode: str) -> bool:
    """Whether a task must first agree on its mask in an encrypted sensitivity round."""
    return scheme != "quantize" and mode == "sensitivity" and 0.0 < p < 1.0


def n_selected(n: int, p: float) -> int:
    return min(n, math.ceil(p * n - 1e-9))


def canonical_scores(scores: np.ndarray) -> np.ndarray:
    top = float(np.max(np.abs(scores))) if scores.size else 0.0
    if top == 0.0 or not math.isfinite(top):
        return np.zeros(scores.shape, dtype=np.int64)
    return np.rint(np.abs(scores) / top * (1 << SCORE_BITS)).astype(np.int64)


def top_p_mask(scores: np.ndarray, p: float, forced: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the top-p scores (ties by index), plus ``forced`` positions."""
    n = scores.size
    k = n_selected(n, p)
    mask = np.zeros(n, dtype=bool)
    if k:
        keys = canonical_scores(scores)
        order = np.lexsort((np.arange(n), -keys))  # primary: score desc; secondary: index asc
        mask[order[:k]] = True
    if forced is not None:
        mask |= forced
    return mask


def random_mask(n: int, p: float, seed: int, forced: np.ndarray | None = None) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: n_selected(n, p)]] = True
    if forced is not None:
        mask |= forced
    return mask


def full_mask(n: int, p: float) -> np.ndarray | None:
    """The trivial masks (p = 0 or 1) need no agreement."""
    if p >= 1.0:
        return np.ones(n, dtype=bool)
    if p <= 0.0:
        return np.zeros(n, dtype=bool)
    return None


def first_last_layers(layer_sizes: list[int]) -> np.ndarray:
    """Positions of the first and last layers, given parameter counts per layer
    (a layer being a weight tensor and its bias)."""
    n = sum(layer_sizes)
    forced = np.zeros(n, dtype=bool)
    if layer_sizes:
        forced[: layer_sizes[0]] = True
        forced[n - layer_sizes[-1]:] = True
    return forced


def mask_digest(mask: np.ndarray) -> bytes:
    return hashlib.sha256(len(mask).to_bytes(8, "little") + np.packbits(mask).tobytes()).digest()


def split(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(masked values, in index order) and (the rest, in index order)."""
    return values[mask], values[~mask]


def merge(masked: np.ndarray, rest: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if masked.size != int(mask.sum()) or rest.size != mask.size - int(mask.sum()):
        raise ValueError(f"parts of {masked.size}+{rest.size} values do not fit a mask of "
                         f"{int(mask.sum())}/{mask.size}")
    out = np.empty(mask.size, dtype=np.float64)
    out[mask] = masked
    out[~mask] = rest
    return out
