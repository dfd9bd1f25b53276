import numpy as np
import pytest

from fedmq.privacy import masking


def test_top_p_takes_largest_with_ties_by_index():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.0, 0.5])
    mask = masking.top_p_mask(scores, p=0.5)  # 3 of 6
    assert mask.tolist() == [False, True, True, True, False, False]


def test_canonicalization_absorbs_last_bit_noise():
    rng = np.random.default_rng(0)
    scores = rng.random(10_000)
    noisy = scores * (1 + rng.normal(0, 1e-12, scores.size))  # another device's decryption
    assert (masking.top_p_mask(scores, 0.1) == masking.top_p_mask(noisy, 0.1)).all()


def test_fraction_forced_layers_and_extremes():
    scores = np.arange(100, dtype=float)
    assert masking.top_p_mask(scores, 0.1).sum() == 10
    forced = masking.first_last_layers([20, 50, 30])
    mask = masking.top_p_mask(scores, 0.1, forced)
    assert mask[:20].all() and mask[70:].all() and mask.sum() == 50
    assert masking.full_mask(5, 1.0).all() and not masking.full_mask(5, 0.0).any()
    assert masking.full_mask(5, 0.3) is None


def test_random_mask_deterministic_by_seed():
    a = masking.random_mask(1000, 0.3, seed=7)
    assert a.sum() == 300
    assert (a == masking.random_mask(1000, 0.3, seed=7)).all()
    assert (a != masking.random_mask(1000, 0.3, seed=8)).any()


def test_digest_split_merge():
    mask = masking.random_mask(50, 0.4, seed=1)
    other = mask.copy()
    other[np.argmax(mask)] = False
    assert masking.mask_digest(mask) != masking.mask_digest(other)
    values = np.arange(50, dtype=float)
    secret, plain = masking.split(values, mask)
    assert (masking.merge(secret, plain, mask) == values).all()
    with pytest.raises(ValueError, match="do not fit"):
        masking.merge(secret[:-1], plain, mask)


def test_needs_agreement():
    assert masking.needs_agreement("ckks", 0.3, "sensitivity")
    assert masking.needs_agreement("quantize+he", 0.3, "sensitivity")
    assert not masking.needs_agreement("ckks", 1.0, "sensitivity")
    assert not masking.needs_agreement("ckks", 0.3, "random")
    assert not masking.needs_agreement("quantize", 0.3, "sensitivity")
