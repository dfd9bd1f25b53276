"""The exactness oracle: what an encrypted aggregate must decrypt to.

Test-only by construction — it reads the key authority's secret context file and
the plaintext dumps agents write when ``faults.oracle_dir`` is set — and never
used by a role. The aggregate of a round must equal the weighted mean of the
updates of exactly the agents the round says took part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.privacy import he, masking
from fedmq.protocol import wire


def secret_context(keyauthority_state: Path):
    return he.load_context((keyauthority_state / "ckks_secret_context.bin").read_bytes())


def dump(oracle_dir: Path, agent: str, name: str):
    return np.load(oracle_dir / f"{agent}-{name}.npz")


def plaintext_fedavg(oracle_dir: Path, agents: list[str], name: str, key: str = "weights") -> tuple[np.ndarray, int]:
    dumps = [dump(oracle_dir, a, name) for a in agents]
    total = sum(int(d["num_samples"]) for d in dumps)
    return sum(d[key] * int(d["num_samples"]) for d in dumps) / total, total


def decrypted_average(ctx, result: wire.Result, mask: np.ndarray | None = None) -> np.ndarray:
    """The global model from an encrypted result, as an agent rebuilds it."""
    enc = np.zeros(0)
    if result.n_encrypted:
        enc = he.decrypt(ctx, result.ciphertexts, result.n_encrypted) / result.total_weight
    if result.n_encrypted == result.n_params:
        return enc
    plain = np.frombuffer(result.plain_avg, dtype="<f4").astype(np.float64)
    if mask is None:
        mask = np.zeros(result.n_params, dtype=bool)
    return masking.merge(enc, plain, mask)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    max_error: float | None
    detail: str


def check_round(ctx, oracle_dir: Path, rnd: int, result: wire.Result | None, closed: wire.RoundClosed | None,
                tolerance: float) -> Verdict:
    """Is round ``rnd``'s aggregate the exact weighted mean of its participants' updates,
    each counted once?"""
    if closed is None:
        return Verdict(False, None, "never closed")
    if closed.status != "aggregated":
        return Verdict(False, None, f"{closed.status}: {closed.reason}")
    if result is None:
        return Verdict(False, None, "closed as aggregated but no result was published")
    people = list(result.participants)
    if len(set(people)) != len(people) or sorted(people) != sorted(closed.participants):
        return Verdict(False, None, f"participants disagree or repeat: {people} vs {closed.participants}")
    missing = [a for a in people if not (oracle_dir / f"{a}-round{rnd}.npz").exists()]
    if missing:
        return Verdict(False, None, f"no oracle dump from {missing}")
    expected, total = plaintext_fedavg(oracle_dir, people, f"round{rnd}")
    if result.total_weight != total:
        return Verdict(False, None, f"total weight {result.total_weight} != {total} (an update counted twice or lost)")
    mask = dump(oracle_dir, people[0], f"round{rnd}")["mask"]
    err = float(np.abs(decrypted_average(ctx, result, mask) - expected).max())
    if err > tolerance:
        return Verdict(False, err, f"aggregate off by {err:.2e} (> {tolerance:g})")
    return Verdict(True, err, f"exact within {err:.1e}")
