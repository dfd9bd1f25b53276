"""The aggregator's checks on a selective update: mask digest and packing length."""

import numpy as np
import pytest

from aggregator.round_state import Rejected, RoundState
from aggregator.service import Aggregator
from fedmq.runtime import config as cfgmod
from fedmq.protocol import wire


def _agg(tmp_path, **prot):
    cfg = cfgmod.AggregatorConfig(state_dir=tmp_path, protection=wire.Protection(**prot))
    return Aggregator(cfg)


def _round(purpose="train"):
    return RoundState(1, 0, frozenset({"a", "b"}), 1, deadline=1e12, purpose=purpose)


def _update(n_params=10, n_enc=3, plain_n=None, dtype="float32", digest=b"d" * 32):
    plain = np.zeros(n_params - n_enc if plain_n is None else plain_n, dtype=dtype).tobytes()
    return wire.Update(num_samples=5, n_params=n_params, n_encrypted=n_enc, ciphertexts=[b"c"],
                       plain=plain, plain_dtype=dtype, mask_digest=digest)


def test_good_layout_passes_and_returns_plaintext(tmp_path):
    agg = _agg(tmp_path, p=0.3)
    assert agg._check_layout(_round(), _update()).shape == (7,)


def test_mismatched_mask_digest_rejected(tmp_path):
    agg = _agg(tmp_path, p=0.3)
    agg.mask_digest = b"x" * 32
    with pytest.raises(Rejected, match="mask digest .* differs from the task's mask"):
        agg._check_layout(_round(), _update())


@pytest.mark.parametrize("kw, reason", [
    ({"plain_n": 6}, "wrong packing length"),
    ({"dtype": "float16"}, "the task sends float32"),
    ({"n_enc": 11, "plain_n": 0}, "exceed"),
])
def test_wrong_packing_rejected(tmp_path, kw, reason):
    with pytest.raises(Rejected, match=reason):
        _agg(tmp_path, p=0.3)._check_layout(_round(), _update(**kw))


def test_layout_must_match_round_and_p(tmp_path):
    agg = _agg(tmp_path, p=0.3)
    agg._agreed_key = (10, 4, None, "float32", (), None)  # the round agreed on 4 encrypted values
    with pytest.raises(Rejected, match="this round's updates have 4"):
        agg._check_layout(_round(), _update())
    with pytest.raises(Rejected, match="p=1.0"):
        _agg(tmp_path, p=1.0)._check_layout(_round(), _update())
    with pytest.raises(Rejected, match="fully encrypted"):
        _agg(tmp_path, p=0.3)._check_layout(_round("sensitivity"), _update())


def test_non_finite_plaintext_rejected(tmp_path):
    upd = _update()
    bad = wire.Update(**{**upd.__dict__, "plain": np.full(7, np.nan, dtype="float32").tobytes()})
    with pytest.raises(Rejected, match="NaN"):
        _agg(tmp_path, p=0.3)._check_layout(_round(), bad)
