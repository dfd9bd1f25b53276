import numpy as np
import pytest

from fedmq.privacy import he
from fedmq.privacy.quantization import LayerQuant, PlanError, QuantPlan, dequantize_sum, quantize, sum_dtype

SIZES = [300, 200, 100]
PLAN = QuantPlan((LayerQuant(8, "symmetric", "stochastic", -0.5, 0.5),
                  LayerQuant(16, "asymmetric", "nearest", -0.3, 0.2),
                  LayerQuant(8, "asymmetric", "nearest", -0.1, 0.4)), n_ref=100, max_agents=8)


@pytest.mark.parametrize("agents", [1, 3, 8])
def test_sum_of_n_dequantizes_to_mean_within_bit_width_bound(agents):
    rng = np.random.default_rng(agents)
    values = [rng.uniform(-0.09, 0.19, sum(SIZES)) for _ in range(agents)]  # inside every range: no clipping
    qs = [quantize(v, PLAN, SIZES, rng) for v in values]
    assert all(q.clipped == 0 for q in qs)
    sums = [sum(q.codes[i].astype(np.int64) for q in qs) for i in range(len(SIZES))]
    mean = dequantize_sum(sums, agents, PLAN, SIZES) / agents
    truth = sum(values) / agents
    start = 0
    for size, lq in zip(SIZES, PLAN.layers):
        bound = lq.scale * (1.0 if lq.rounding == "stochastic" else 0.5)  # per value, so per mean too
        assert np.abs(mean[start:start + size] - truth[start:start + size]).max() <= bound + 1e-12
        start += size


def test_stochastic_rounding_is_unbiased():
    plan = QuantPlan((LayerQuant(8, "symmetric", "stochastic", -1, 1),), n_ref=1, max_agents=1)
    x = np.full(1, 0.3 + plan.layers[0].scale / 3)  # a third of a step above a code
    rng = np.random.default_rng(0)
    draws = np.array([dequantize_sum([quantize(x, plan, [1], rng).codes[0].astype(np.int64)], 1, plan, [1])[0]
                      for _ in range(20_000)])
    step = plan.layers[0].scale
    assert abs(draws.mean() - x[0]) < 4 * step / np.sqrt(len(draws))  # nearest would be off by step/3
    nearest = QuantPlan((LayerQuant(8, "symmetric", "nearest", -1, 1),), n_ref=1, max_agents=1)
    biased = dequantize_sum([quantize(x, nearest, [1], rng).codes[0].astype(np.int64)], 1, nearest, [1])[0]
    assert abs(biased - x[0]) > step / 4


def test_clipping_is_counted():
    rng = np.random.default_rng(0)
    q = quantize(np.array([-2.0, 0.0, 2.0, 0.1] + [0.0] * 596), PLAN, SIZES, rng)
    assert q.clipped == 2 and q.total == 600


def test_bfv_packing_sums_max_agents_of_extreme_codes_exactly():
    params = he.BfvParams()
    ctx = he.create_bfv_secret_context(params)
    public = he.load_context(he.serialize_public(ctx))
    per_slot = PLAN.check_packing(params.usable_bits)
    top = max(lq.levels for lq in PLAN.layers)
    acc = None
    for _ in range(PLAN.max_agents):
        blobs = he.bfv_encrypt_codes(ctx, np.full(5000, top, dtype=np.int64), PLAN.sum_bits, per_slot)
        acc = he.add_into(acc, he.bfv_load(public, blobs))
    out = he.bfv_decrypt_codes(ctx, he.serialize_all(acc), 5000, PLAN.sum_bits, per_slot)
    assert (out == top * PLAN.max_agents).all()
    # One agent more than the lanes were sized for would carry into the next lane: refused.
    with pytest.raises(PlanError, match="at most 8"):
        PLAN.check_round(PLAN.max_agents + 1)
    assert top * (PLAN.max_agents + 1) >= 1 << PLAN.sum_bits


def test_plans_that_cannot_sum_are_refused():
    with pytest.raises(PlanError, match="offers 35"):
        QuantPlan((LayerQuant(16),), max_agents=1 << 20).check_packing(35)
    with pytest.raises(PlanError, match="int64"):
        QuantPlan((LayerQuant(16),), max_agents=1 << 50)
    with pytest.raises(PlanError, match="empty"):
        LayerQuant(8, lo=1.0, hi=1.0)
    assert QuantPlan((LayerQuant(8),), max_agents=8).check_packing(35) == 3


def test_sum_dtype_and_wire_round_trip():
    assert sum_dtype(8, 8) == np.dtype("<u2") and sum_dtype(300, 8) == np.dtype("<u4")
    assert QuantPlan.from_wire(PLAN.to_wire()) == PLAN
    with pytest.raises(PlanError):
        QuantPlan.from_wire({"layers": [{"bits": 8, "colour": 1}]})
