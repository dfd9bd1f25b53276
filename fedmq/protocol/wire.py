"""Wire protocol v1: the msgpack envelope, and encoding and checking the bodies it carries.

Every message on the broker is an *envelope*: protocol version, kind, task, round,
sender, chunk sequence/total, the SHA-256 digest of the whole body, one chunk
of that body and the sender's signature. Small messages are a stream of one chunk; large ones (updates,
results, keys) are streams of many (see ``chunking``). One path for all kinds
means one validator, one de-duplication rule and one digest check.

Nothing received is trusted: ``decode_envelope`` and ``decode_body`` check every
field's type and range and raise :class:`WireError` with a reason a log line can
carry. Metadata lives in the envelope, never in MQTT 5 properties, so the protocol
works over MQTT 3.1.1 (amqtt, RabbitMQ). The bodies themselves live in ``messages``
and are re-exported here, so a caller writes ``wire.RoundStart`` as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Annotated, Any

import msgpack
from pydantic import Field, Strict, TypeAdapter, ValidationError

from fedmq import PROTOCOL_VERSION
from fedmq.privacy import signing
from fedmq.protocol.fields import (MAX_CHUNKS, STRICT, Bytes, Digest, FiniteFloat, Id, Int, NonNegInt, Str,
                                   message)
from fedmq.protocol.messages import (BODY_TYPES, FAMILY_KINDS, KIND_OF, AgentStatus,  # noqa: F401
                                     DifferentialPrivacy, EnrollRequest, KeyGrant, KeyRefused, MaskCorrection,
                                     MaskRefused, MaskRequest, PartialSum, PhaseCost, Policy, Protection,
                                     PublicContext, ResendRequest, ShardRange, Result, RollCall, RoundClosed, RoundStart, SealedKeys, Telemetry,
                                     Update)
from fedmq.protocol.topics import TopicInfo


class WireError(ValueError):
    """A received message that must be rejected; the text says why."""


# --------------------------------------------------------------------------- envelope


@dataclasses.dataclass(frozen=True)
class Envelope:
    kind: str
    task: str
    round: int
    sender: str
    seq: int
    total: int
    digest: bytes
    body: bytes
    ts: float = dataclasses.field(default_factory=time.time)
    v: int = PROTOCOL_VERSION
    # Ed25519 signature of the stream (fedmq.privacy.signing), the same on every chunk;
    # empty for what agents send. Checked by the receiver with check_signature.
    sig: bytes = b""


_ENVELOPE_KEYS = {f.name for f in dataclasses.fields(Envelope)}


@message(config=STRICT)
class _EnvelopeSchema:
    v: Int
    kind: Str
    task: Id
    round: NonNegInt
    sender: Id
    seq: NonNegInt
    total: Annotated[int, Strict(), Field(ge=1, le=MAX_CHUNKS)]
    digest: Digest
    body: Bytes
    ts: FiniteFloat
    sig: Annotated[bytes, Strict(), Field(max_length=64)]


_ENVELOPE_ADAPTER = TypeAdapter(_EnvelopeSchema)


def encode_envelope(env: Envelope) -> bytes:
    return msgpack.packb(dataclasses.asdict(env), use_bin_type=True)


def decode_envelope(payload: bytes, *, max_bytes: int) -> Envelope:
    """Parse and validate one envelope; never raises anything but WireError."""
    if len(payload) > max_bytes:
        raise WireError(f"oversize message: {len(payload)} bytes > limit {max_bytes}")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError(f"envelope is a {type(raw).__name__}, expected a map")
    if raw.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {raw.get('v')!r}, expected {PROTOCOL_VERSION}")
    missing = _ENVELOPE_KEYS - raw.keys()
    if missing:
        raise WireError(f"envelope lacks field(s) {sorted(missing)}")
    try:
        checked = _ENVELOPE_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise WireError(f"invalid envelope: {_describe(exc)}") from None
    if checked.kind not in BODY_TYPES or checked.kind == "sealed_keys":
        raise WireError(f"unknown message kind {checked.kind!r}")
    if checked.seq >= checked.total:
        raise WireError(f"chunk seq {checked.seq} outside total {checked.total}")
    return Envelope(**dataclasses.asdict(checked))


def check_signature(env: Envelope, public: bytes, who: str) -> None:
    """Raise WireError unless ``env`` carries ``who``'s signature over its stream."""
    try:
        signing.verify(public, env.sig, env.v, env.kind, env.task, env.round, env.sender, env.digest, who)
    except signing.SignatureError as exc:
        raise WireError(str(exc)) from None


def check_against_topic(env: Envelope, info: TopicInfo, *, task: str) -> None:
    """Reject an envelope whose claims contradict its topic or belong to another task."""
    if env.task != task:
        raise WireError(f"foreign task {env.task!r}, this is task {task!r}")
    if info.task is not None and info.task != env.task:
        raise WireError(f"task {env.task!r} does not match topic task {info.task!r}")
    if info.round is not None and info.round != env.round:
        raise WireError(f"round {env.round} does not match topic round {info.round}")
    if info.agent is not None and info.family in {"update", "partial", "enroll", "status", "telemetry"}:
        if info.agent != env.sender:
            raise WireError(f"sender {env.sender!r} publishes on {info.agent!r}'s topic")
    if info.seq is not None and info.seq != env.seq:
        raise WireError(f"chunk seq {env.seq} does not match topic seq {info.seq}")
    expected_kind = FAMILY_KINDS.get(info.family)
    if expected_kind is not None and env.kind not in expected_kind:
        raise WireError(f"kind {env.kind!r} not allowed on a {info.family} topic")


_ADAPTERS = {kind: TypeAdapter(cls) for kind, cls in BODY_TYPES.items()}

def encode_body(msg: Any) -> tuple[str, bytes]:
    """Serialize a message body; returns its kind and bytes."""
    kind = KIND_OF[type(msg)]
    return kind, msgpack.packb(_ADAPTERS[kind].dump_python(msg), use_bin_type=True)


def decode_body(kind: str, body: bytes) -> Any:
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise WireError(f"malformed {kind} body: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError(f"{kind} body is a {type(raw).__name__}, expected a map")
    return validate_body(kind, raw)


def validate_body(kind: str, raw: dict) -> Any:
    """Check a decoded body against its schema; WireError says which field and why."""
    try:
        return _ADAPTERS[kind].validate_python(raw)
    except ValidationError as exc:
        raise WireError(f"invalid {kind} body: {_describe(exc)}") from None


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
