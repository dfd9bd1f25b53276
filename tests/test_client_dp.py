"""Client-level DP, rule by rule: the noise the agents add sums to the accountant's
sigma for the requested epsilon, clipping bounds one agent's contribution, and the
budget admits exactly the rounds it was calibrated for."""

import math

import numpy as np
import pytest

from fedmq.privacy import client_dp
from fedmq.protocol.messages import DifferentialPrivacy


def _dp(epsilon: float, rounds: int, clip: float = 1.0, agents: int = 4, delta: float = 1e-5) -> DifferentialPrivacy:
    return DifferentialPrivacy(clip=clip, noise_multiplier=client_dp.calibrate(epsilon, delta, rounds),
                               noise_agents=agents, epsilon=epsilon, delta=delta)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_calibrated_noise_spends_exactly_the_budget(epsilon):
    z = client_dp.calibrate(epsilon, 1e-5, rounds=10)
    assert client_dp.epsilon_after(z, 10, 1e-5) == pytest.approx(epsilon, rel=1e-3)
    # The smallest such multiplier: 2% less noise overspends.
    assert client_dp.epsilon_after(0.98 * z, 10, 1e-5) > epsilon


def test_smaller_epsilon_or_more_rounds_need_more_noise():
    assert client_dp.calibrate(1.0, 1e-5, 10) > client_dp.calibrate(8.0, 1e-5, 10)
    assert client_dp.calibrate(8.0, 1e-5, 20) > client_dp.calibrate(8.0, 1e-5, 10)


def test_agents_noise_shares_sum_to_the_accountants_sigma():
    """Each of ``noise_agents`` adds N(0, (z C)^2 / k): the sum carries N(0, (z C)^2)."""
    dp = _dp(8.0, 10, clip=0.5, agents=5)
    rng = np.random.default_rng(0)
    n = 200_000
    total = sum(client_dp.privatize(np.zeros(n), dp, rng)[0] for _ in range(dp.noise_agents))
    sigma = dp.noise_multiplier * dp.clip
    assert np.std(total) == pytest.approx(sigma, rel=0.01)
    assert abs(np.mean(total)) < 5 * sigma / math.sqrt(n)
    assert client_dp.noise_std(dp) == pytest.approx(sigma / math.sqrt(5))


def test_clipping_bounds_one_agents_contribution():
    dp = DifferentialPrivacy(clip=1.0, noise_multiplier=1e-12, noise_agents=1, epsilon=1.0, delta=1e-5)
    rng = np.random.default_rng(1)
    big = rng.normal(size=1000) * 10
    out, clipped = client_dp.privatize(big, dp, rng)
    assert clipped and np.linalg.norm(out) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(out / np.linalg.norm(out), big / np.linalg.norm(big))  # direction kept
    small = big / np.linalg.norm(big) * 0.5
    out, clipped = client_dp.privatize(small, dp, rng)
    assert not clipped and np.allclose(out, small)


def test_budget_admits_the_calibrated_rounds_and_no_more():
    dp = _dp(2.0, rounds=3)
    assert [client_dp.budget_allows(dp, done) for done in range(5)] == [True, True, True, False, False]
    assert client_dp.epsilon_after(dp.noise_multiplier, 0, dp.delta) == 0.0
    spent = [client_dp.epsilon_after(dp.noise_multiplier, r, dp.delta) for r in (1, 2, 3)]
    assert spent == sorted(spent) and spent[-1] <= 2.0 * (1 + 1e-6)
