"""An update read off its chunks one ciphertext at a time is the update decoded whole."""

import numpy as np
import pytest

from fedmq.protocol import wire
from fedmq.protocol.update_stream import iter_ciphertexts, read_update


def _parts(body: bytes, size: int):
    return lambda: iter([body[i:i + size] for i in range(0, len(body), size)])


def test_streamed_fields_and_ciphertexts_equal_the_whole_decode():
    update = wire.Update(num_samples=7, n_params=10, n_encrypted=6,
                         ciphertexts=[bytes([i]) * (1000 + i) for i in range(3)],
                         plain=np.arange(4, dtype="<f4").tobytes(), plain_dtype="float32")
    kind, body = wire.encode_body(update)
    whole = wire.decode_body(kind, body)
    meta, count = read_update(_parts(body, 333), max_object_bytes=1 << 20)
    assert count == 3 and meta.ciphertexts == []
    assert (meta.num_samples, meta.n_params, meta.n_encrypted, meta.plain) == \
        (whole.num_samples, whole.n_params, whole.n_encrypted, whole.plain)
    assert list(iter_ciphertexts(_parts(body, 333), 1 << 20)) == whole.ciphertexts


def test_malformed_streams_are_wire_errors():
    with pytest.raises(wire.WireError):
        read_update(_parts(b"\xc1garbage", 4), 1 << 20)
    kind, body = wire.encode_body(wire.Update(num_samples=1, n_params=2, n_encrypted=2, ciphertexts=[b"x"]))
    with pytest.raises(wire.WireError):
        read_update(_parts(body[:-3], 5), 1 << 20)  # truncated
    bad = wire.msgpack.packb({"num_samples": 1, "n_params": 2, "n_encrypted": 2, "ciphertexts": [5]})
    with pytest.raises(wire.WireError, match="expected bytes"):
        list(iter_ciphertexts(_parts(bad, 4), 1 << 20))
