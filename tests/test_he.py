import numpy as np
import pytest

from fedmq.privacy import he

PARAMS = he.CkksParams()


@pytest.fixture(scope="module")
def ctx():
    return he.create_secret_context(PARAMS)


@pytest.fixture(scope="module")
def public(ctx):
    return he.load_context(he.serialize_public(ctx))


def test_weighted_sum_matches_plaintext_fedavg(ctx, public):
    """Addition-only FedAvg: sum of Enc(n_i w_i), divided by sum n_i after decryption.

    Bounds asserted: 1e-6 absolute and 1e-6 relative (L2) on the averaged weights
    (measured ~1e-9 and ~1e-8)."""
    rng = np.random.default_rng(1)
    n_params = 5000  # not a multiple of the slot count: last ciphertext is partial
    weights = [rng.normal(0, 0.5, n_params) for _ in range(3)]
    counts = [360, 120, 7]
    acc = None
    for w, n in zip(weights, counts):
        acc = he.add_into(acc, he.load_ciphertexts(public, he.encrypt(ctx, w * n), n_params))
    avg = he.decrypt(ctx, he.serialize_all(acc), n_params) / sum(counts)
    expected = sum(w * n for w, n in zip(weights, counts)) / sum(counts)
    assert np.abs(avg - expected).max() < 1e-6
    assert np.linalg.norm(avg - expected) / np.linalg.norm(expected) < 1e-6


def test_public_context_cannot_decrypt(ctx, public):
    blobs = he.encrypt(ctx, np.ones(10))
    assert not public.is_private()
    with pytest.raises(he.HEError, match="no secret key"):
        he.decrypt(public, blobs, 10)
    assert len(he.serialize_public(ctx)) < 1000  # parameters only, no key material


def test_foreign_key_decrypts_to_garbage(ctx):
    other = he.create_secret_context(PARAMS)
    blobs = he.encrypt(ctx, np.ones(10))
    assert np.abs(he.decrypt(other, blobs, 10) - 1).max() > 1


def test_wrong_packing_rejected(ctx, public):
    blobs = he.encrypt(ctx, np.ones(3000))
    with pytest.raises(he.HEError, match="expected 2"):
        he.load_ciphertexts(public, blobs[:1], 3000)
    with pytest.raises(he.HEError, match="packs"):
        he.load_ciphertexts(public, blobs, 2500)
    with pytest.raises(he.HEError, match="does not load"):
        he.load_ciphertexts(public, [b"garbage", blobs[1]], 3000)


def test_ciphertext_size_per_parameter(ctx):
    blobs = he.encrypt(ctx, np.zeros(PARAMS.slots * 4))
    per_param = sum(map(len, blobs)) / (PARAMS.slots * 4)
    assert per_param <= 31  # vs ~81 for FLARE-style N=8192 [60,40,40,60]


@pytest.mark.parametrize("params, reason", [
    (he.CkksParams(4096, (60, 60), 33), "128-bit security"),
    (he.CkksParams(4096, (60,), 33), "special prime"),
    (he.CkksParams(3000, (60, 49), 33), "poly_modulus_degree"),
    (he.CkksParams(4096, (40, 49), 45), "scale_bits"),
    (he.CkksParams(4096, (54, 55), 19), "scale_bits"),
])
def test_insecure_or_broken_params_refused(params, reason):
    with pytest.raises(ValueError, match=reason):
        params.check()


def test_params_recovered_from_public_context(public):
    assert he.params_of(public) == PARAMS
