import dataclasses

import msgpack
import pytest

from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import single, split


def _env(**over):
    env = single(wire.RoundStart(model_version=0, deadline=1.0, selected=["a"], quorum=1),
                 task="t", rnd=3, sender="agg")
    return dataclasses.replace(env, **over)


def _raw(env):
    return dataclasses.asdict(env)


def test_envelope_round_trip():
    env = _env()
    back = wire.decode_envelope(wire.encode_envelope(env), max_bytes=10_000)
    assert back == env
    assert wire.decode_body(back.kind, back.body).selected == ["a"]


@pytest.mark.parametrize("payload, reason", [
    (b"\xc1garbage", "malformed msgpack"),
    (msgpack.packb([1, 2, 3]), "expected a map"),
    (b"\x85\xa1v", "malformed msgpack"),  # truncated
])
def test_malformed_payloads_rejected(payload, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_envelope(payload, max_bytes=10_000)


@pytest.mark.parametrize("field, value, reason", [
    ("v", 2, "unsupported protocol version"),
    ("kind", "bogus", "unknown message kind"),
    ("round", -1, "round"),
    ("round", True, "round"),  # a bool is not an int on our wire
    ("sender", "a/b", "sender"),
    ("sender", "+", "sender"),
    ("digest", b"short", "digest"),
    ("seq", 5, "outside total"),
    ("total", 0, "total"),
    ("ts", float("nan"), "ts"),
    ("body", "text", "body"),
])
def test_bad_fields_rejected(field, value, reason):
    raw = _raw(_env())
    raw[field] = value
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_envelope(msgpack.packb(raw, use_bin_type=True), max_bytes=10_000)


def test_missing_and_extra_fields_rejected():
    raw = _raw(_env())
    del raw["digest"]
    with pytest.raises(wire.WireError, match="lacks field"):
        wire.decode_envelope(msgpack.packb(raw, use_bin_type=True), max_bytes=10_000)
    raw = _raw(_env())
    raw["extra"] = 1
    with pytest.raises(wire.WireError, match="extra"):
        wire.decode_envelope(msgpack.packb(raw, use_bin_type=True), max_bytes=10_000)


def test_oversize_rejected_before_parsing():
    payload = wire.encode_envelope(_env(body=b"x" * 5000))
    with pytest.raises(wire.WireError, match="oversize"):
        wire.decode_envelope(payload, max_bytes=4096)


def test_body_validation():
    kind, body = wire.encode_body(wire.Update(num_samples=3, n_params=2, n_encrypted=2, ciphertexts=[b"c"]))
    assert wire.decode_body(kind, body).num_samples == 3
    good = {"num_samples": 3, "n_params": 2, "n_encrypted": 2, "ciphertexts": [b"c"]}
    bad = msgpack.packb({**good, "num_samples": "3"}, use_bin_type=True)
    with pytest.raises(wire.WireError, match="num_samples"):
        wire.decode_body("update", bad)
    with pytest.raises(wire.WireError, match="mask_digest"):
        wire.decode_body("update", msgpack.packb({**good, "mask_digest": b"short"}, use_bin_type=True))
    with pytest.raises(wire.WireError, match="plain_dtype"):
        wire.decode_body("update", msgpack.packb({**good, "plain_dtype": "int8"}, use_bin_type=True))
    bad = msgpack.packb({**good, "num_samples": 0}, use_bin_type=True)
    with pytest.raises(wire.WireError, match="num_samples"):
        wire.decode_body("update", bad)
    with pytest.raises(wire.WireError, match="malformed"):
        wire.decode_body("update", b"\x92")


def test_envelope_must_agree_with_topic():
    env = split("update", "t", 2, "agent-1", b"abc", 10)[0]
    ok = topics.parse(topics.update_chunk("t", 2, "agent-1", 0))
    wire.check_against_topic(env, ok, task="t")
    with pytest.raises(wire.WireError, match="foreign task"):
        wire.check_against_topic(env, ok, task="other")
    with pytest.raises(wire.WireError, match="publishes on"):
        wire.check_against_topic(env, topics.parse(topics.update_chunk("t", 2, "agent-2", 0)), task="t")
    with pytest.raises(wire.WireError, match="round"):
        wire.check_against_topic(env, topics.parse(topics.update_chunk("t", 9, "agent-1", 0)), task="t")
    with pytest.raises(wire.WireError, match="seq"):
        wire.check_against_topic(env, topics.parse(topics.update_chunk("t", 2, "agent-1", 1)), task="t")
    with pytest.raises(wire.WireError, match="not allowed"):
        wire.check_against_topic(env, topics.parse(topics.telemetry("agent-1")), task="t")


def test_topics_parse_and_reject():
    assert topics.parse("rounds/t/4/result/2") == topics.TopicInfo("result", "t", 4, seq=2)
    for bad in ("rounds/t/x/start", "nope/t", "updates/t/1/a"):
        with pytest.raises(ValueError):
            topics.parse(bad)
