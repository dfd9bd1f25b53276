"""Client-level differential privacy with distributed noise (DP-FedAvg, McMahan et
al. 2018), accounted with Google's ``dp-accounting`` (its RDP accountant).

Why ``dp-accounting`` rather than Opacus: it is the accountant alone (no torch
coupling, no per-sample-gradient machinery we do not use), it is what DP-FedAvg's
authors maintain, and it calibrates a mechanism to a target epsilon directly.

The mechanism per round is the Gaussian mechanism on the sum of clipped updates:
sensitivity ``clip`` (add/remove one agent), noise ``noise_multiplier * clip``.
No sampling amplification is claimed: the aggregator selects agents by who is
online, not by Poisson sampling, so each round is charged in full.
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.protocol.messages import DifferentialPrivacy


def _event(noise_multiplier: float, rounds: int):
    import dp_accounting  # imported on use: agents that never account need not load scipy's stack

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)


def _accountant():
    from dp_accounting import rdp

    return rdp.RdpAccountant()


def calibrate(epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier that keeps ``rounds`` rounds within (epsilon, delta)."""
    import dp_accounting

    return float(dp_accounting.calibrate_dp_mechanism(_accountant, lambda z: _event(z, rounds), epsilon, delta))


def epsilon_after(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon spent at ``delta`` after ``rounds`` aggregated rounds (0 before any)."""
    if rounds <= 0:
        return 0.0
    acc = _accountant()
    acc.compose(_event(noise_multiplier, rounds))
    return float(acc.get_epsilon(delta))


def budget_allows(dp: DifferentialPrivacy, rounds_done: int) -> bool:
    """Whether one more round stays within the task's budget."""
    return epsilon_after(dp.noise_multiplier, rounds_done + 1, dp.delta) <= dp.epsilon * (1 + 1e-9)


def noise_std(dp: DifferentialPrivacy) -> float:
    """One agent's share: ``noise_agents`` shares sum to ``noise_multiplier * clip``."""
    return dp.noise_multiplier * dp.clip / math.sqrt(dp.noise_agents)


def privatize(change: np.ndarray, dp: DifferentialPrivacy, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """The update's change clipped to L2 norm ``clip``, plus this agent's noise share;
    also whether clipping was needed."""
    norm = float(np.linalg.norm(change))
    clipped = norm > dp.clip
    if clipped:
        change = change * (dp.clip / norm)
    return change + rng.normal(0.0, noise_std(dp), change.size), clipped
