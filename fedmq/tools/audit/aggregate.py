"""The aggregate-level attack: inverting the sum of k agents' updates.

Why: secure masking hides each upload but, by design, hands the aggregator the
round's sum of the readable part; without masking it has that sum too. So the
question a masked mode leaves open is what the *sum* leaks. Each of k agents holds
one private image; the attacker matches the sum of their k single-sample gradients
with a batch of k dummy images and soft labels, optimized jointly (DLG on a batch:
the sum of per-sample gradients is the gradient of the summed loss). Encrypted
coordinates are left out (drop-aware); codes are summed as the aggregator sums
them and matched by per-layer cosine; masked modes go through the product's own
encode, mask, sum and unmask (secure_round.py), so the attacker gets exactly what
the key authority's correction leaves.

Client-level DP (client_dp.py) is the variant where every agent clips its update
to L2 norm ``clip`` and adds its share ``noise_std(dp)`` of the Gaussian noise
before protecting it, so the sum carries noise of std ``noise_multiplier * clip``
per coordinate. Score: for each true image the best PSNR over the reconstructed
batch, averaged over the k images (the attacker need not know which dummy is whose).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmq.privacy import client_dp, secure_aggregation
from fedmq.privacy.quantization import quantize
from fedmq.protocol.messages import DifferentialPrivacy
from fedmq.tools.audit import metrics
from fedmq.tools.audit.attacks import reconstruct
from fedmq.tools.audit.secure_round import SecureRound
from fedmq.tools.audit.views import (CODE_ZERO, View, code_lanes, encrypted_coordinates, parse, place, plan_for,
                                     readable_codes)

DP_DELTA = 1e-5
DP_ROUNDS = 10


@dataclass(frozen=True)
class DPSetting:
    """The DP variant's parameters, recorded with its result."""

    epsilon: float
    clip: float
    noise_multiplier: float
    noise_std_sum: float  # per coordinate, on the sum of k updates

    @classmethod
    def for_round(cls, epsilon: float, clip: float, k: int) -> tuple["DPSetting", DifferentialPrivacy]:
        z = client_dp.calibrate(epsilon, DP_DELTA, rounds=DP_ROUNDS)
        dp = DifferentialPrivacy(clip=clip, noise_multiplier=z, noise_agents=k, epsilon=epsilon, delta=DP_DELTA)
        return cls(epsilon, clip, z, client_dp.noise_std(dp) * k ** 0.5), dp


def privatize_all(grads: list[np.ndarray], epsilon: float, seed: int) -> tuple[list[np.ndarray], DPSetting]:
    """Every agent's update clipped and noised by the product's ``client_dp.privatize``.
    The clip norm is the median of the k updates' L2 norms (half of them are clipped)."""
    clip = float(np.median([np.linalg.norm(g) for g in grads]))
    setting, dp = DPSetting.for_round(epsilon, clip, len(grads))
    rng = np.random.default_rng(seed)
    return [client_dp.privatize(g, dp, rng)[0] for g in grads], setting


def aggregate_view(mode: str, grads: list[np.ndarray], sizes: list[int], scores: np.ndarray, seed: int) -> View:
    """The sum of the k updates' readable part, as the aggregator ends up with it."""
    m = parse(mode)
    k, n = len(grads), grads[0].size
    encrypted = encrypted_coordinates(m, n, scores, seed)
    rng = np.random.default_rng(seed)
    rnd = SecureRound(k) if m.masked else None
    if m.codes:
        plan = plan_for(grads, sizes, k)
        per_agent = [readable_codes(quantize(g, plan, sizes, rng).codes, encrypted, sizes) for g in grads]
        if rnd is None:
            sums = [np.sum([a[i].astype(np.int64) for a in per_agent], axis=0) for i in range(len(sizes))]
        else:
            lanes = code_lanes(per_agent[0], plan)
            uploads = [rnd.upload(j, [c.astype(lane.dtype) for c, lane in zip(codes, lanes)], lanes)
                       for j, codes in enumerate(per_agent)]
            sums = [s.astype(np.int64) for s in rnd.unmasked_sum(uploads, lanes)]
        seen = place(np.concatenate(sums).astype(np.float64) - k * CODE_ZERO, ~encrypted)
        loss = "cosine"
    elif rnd is not None:
        bits = secure_aggregation.frac_bits(k, 1)
        lane = secure_aggregation.Lane(int((~encrypted).sum()), secure_aggregation.PLAIN_WIDTH)
        uploads = [rnd.upload(j, [secure_aggregation.encode_fixed(g[~encrypted], 1, bits, rng)[0]], [lane])
                   for j, g in enumerate(grads)]
        seen = place(secure_aggregation.decode_fixed(rnd.unmasked_sum(uploads, [lane])[0], bits), ~encrypted)
        loss = "l2"
    else:
        seen = place(np.sum(grads, axis=0)[~encrypted], ~encrypted)
        loss = "l2"
    return View(mode, torch.as_tensor(seen, dtype=torch.float32), torch.as_tensor(~encrypted), loss,
                float(encrypted.mean()))


def best_match_psnr(recs: np.ndarray, trues: np.ndarray) -> list[float]:
    """For each true image, the PSNR of the reconstruction closest to it."""
    return [max(metrics.psnr(r, t) for r in recs) for t in trues]


def attack(model: nn.Module, mode: str, xs: torch.Tensor, ys: torch.Tensor, scores: np.ndarray, seed: int, *,
           iterations: int, dp_epsilon: float | None = None) -> dict:
    """DLG on a batch of k = len(xs) dummies against the k agents' aggregate; one row of results."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    grads = []
    for x, y in zip(xs, ys):
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy())
    dp = None
    if dp_epsilon is not None:
        grads, dp = privatize_all(grads, dp_epsilon, seed)
    view = aggregate_view(mode, grads, sizes, scores, seed)
    rec, match = reconstruct(model, view, sizes, tuple(xs.shape), iterations=iterations, seed=2000 + seed)
    recs, trues = rec[:, 0].numpy(), xs[:, 0].numpy()
    per_image = best_match_psnr(recs, trues)
    mean_image = trues.mean(axis=0)  # the baseline a blurry "average digit" reaches without inverting anything
    best_for_first = max(range(len(recs)), key=lambda i: metrics.psnr(recs[i], trues[0]))
    return {"seed": seed, "mode": mode, "k": len(xs), "dp": None if dp is None else vars(dp),
            "psnr_per_image": per_image, "psnr_mean": statistics.mean(per_image), "match_loss": match,
            "mean_image_psnr": statistics.mean(metrics.psnr(mean_image, t) for t in trues),
            "encrypted_fraction": view.encrypted_fraction, "_first": recs[best_for_first]}
