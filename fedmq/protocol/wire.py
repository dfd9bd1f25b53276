"""Wire protocol v1: the msgpack envelope and the message bodies it carries.

Every message on the broker is an *envelope*: protocol version, kind, task, round,
sender, chunk sequence/total, the SHA-256 digest of the whole body and one chunk
of that body. Small messages are a stream of one chunk; large ones (updates,
results, keys) are streams of many (see ``chunking``). One path for all kinds
means one validator, one de-duplication rule and one digest check.

Nothing received is trusted: ``decode_envelope`` and ``decode_body`` check every
field's type and range and raise :class:`WireError` with a reason a log line can
carry. Metadata lives in the envelope, never in MQTT 5 properties, so the protocol
works over MQTT 3.1.1 (amqtt, RabbitMQ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Annotated, Any, Literal

import msgpack
from pydantic import ConfigDict, Field, Strict, StringConstraints, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as message

from fedmq import PROTOCOL_VERSION
from fedmq.privacy import signing
from fedmq.protocol.topics import ID_PATTERN, TopicInfo

DIGEST_BYTES = 32
MAX_CHUNKS = 1 << 20

# Field-level strictness: no coercion of "1" to 1 or of True to 1 on received data.
Str = Annotated[str, Strict()]
Bytes = Annotated[bytes, Strict()]
Int = Annotated[int, Strict()]
Id = Annotated[str, Strict(), StringConstraints(pattern=rf"^{ID_PATTERN}$")]
NonNegInt = Annotated[int, Strict(), Field(ge=0, le=(1 << 62))]
PosInt = Annotated[int, Strict(), Field(ge=1, le=(1 << 62))]
Digest = Annotated[bytes, Strict(), Field(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]
FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]


def _fixed_bytes(n: int) -> Any:
    return Annotated[bytes, Strict(), Field(min_length=n, max_length=n)]


def _list(item: Any, **limits: int) -> Any:
    return Annotated[list[item], Strict(), Field(**limits)]


_STRICT = ConfigDict(extra="forbid", frozen=True)


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


@message(config=_STRICT)
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
    if info.agent is not None and info.family in {"update", "enroll", "status", "telemetry"}:
        if info.agent != env.sender:
            raise WireError(f"sender {env.sender!r} publishes on {info.agent!r}'s topic")
    if info.seq is not None and info.seq != env.seq:
        raise WireError(f"chunk seq {env.seq} does not match topic seq {info.seq}")
    expected_kind = FAMILY_KINDS.get(info.family)
    if expected_kind is not None and env.kind not in expected_kind:
        raise WireError(f"kind {env.kind!r} not allowed on a {info.family} topic")


# --------------------------------------------------------------------------- bodies


PlainDtype = Literal["float32", "float16"]
Purpose = Literal["train", "sensitivity"]


@message(config=_STRICT)
class Protection:
    """How updates of a task are protected.

    ``scheme``: ``ckks`` encrypts the selected weights with CKKS and sends the rest
    as floats; ``quantize`` sends every update as integer codes of a secret plan;
    ``quantize+he`` encrypts the selected codes with BFV and sends the rest as codes.
    ``p`` is the encrypted fraction (0: none, 1: all; unused by ``quantize``);
    ``mode`` picks parameters by aggregated sensitivity or at random.
    """

    scheme: Literal["ckks", "quantize", "quantize+he"] = "ckks"
    p: Annotated[float, Strict(), Field(ge=0, le=1)] = 1.0
    mode: Literal["sensitivity", "random"] = "sensitivity"
    include_first_last: Annotated[bool, Strict()] = False
    seed: Int = 0
    plain_dtype: PlainDtype = "float32"


@message(config=_STRICT)
class RoundStart:
    """Announces a round; retained so that an agent that (re)connects late sees it.

    A ``sensitivity`` round collects encrypted sensitivity maps for the mask
    agreement; ``mask_round`` names the round whose encrypted sum defines the mask
    of a ``train`` round (0: the mask needs no agreement).
    """

    model_version: NonNegInt
    deadline: FiniteFloat
    selected: _list(Id, min_length=1, max_length=100_000)
    quorum: PosInt
    purpose: Purpose = "train"
    protection: Protection = Protection()
    mask_round: NonNegInt = 0
    mask_digest: Digest | None = None
    # The task's model: digest of its layout (names, shapes, dtypes) then of its initial
    # weights, 16 bytes each; None until a quorum of updates agreed on it.
    fingerprint: Digest | None = None


@message(config=_STRICT)
class RoundClosed:
    status: Literal["aggregated", "aborted"]
    participants: _list(Id)
    dropped: _list(Id)
    reason: Str
    total_weight: NonNegInt
    bytes_received: NonNegInt
    agg_s: FiniteFloat


@message(config=_STRICT)
class Update:
    """An agent's protected update.

    The ``n_encrypted`` masked values travel as CKKS ciphertexts of
    ``num_samples * value`` — pre-multiplying by the integer sample count keeps the
    server's weighted FedAvg addition-only, which lets the CKKS parameters stay
    small. The other values travel in ``plain`` (little-endian ``plain_dtype``),
    weighted by the server. ``mask_digest`` identifies the mask they were split by.
    """

    num_samples: PosInt
    n_params: PosInt
    n_encrypted: NonNegInt
    ciphertexts: _list(Bytes)
    plain: Bytes = b""
    plain_dtype: PlainDtype = "float32"
    mask_digest: Digest | None = None
    # Quantized schemes: the unselected codes, one segment per layer, 1 or 2 bytes per code.
    codes: _list(Bytes, max_length=100_000) = dataclasses.field(default_factory=list)
    code_widths: _list(Annotated[int, Strict(), Field(ge=1, le=2)], max_length=100_000) = \
        dataclasses.field(default_factory=list)
    fingerprint: Digest | None = None  # of the workload's model (RoundStart.fingerprint)


@message(config=_STRICT)
class Result:
    """``ciphertexts``: sum of ``n_i * masked values``; ``plain_avg``: the weighted
    average of the plaintext part (float32), already divided by ``total_weight``."""

    participants: _list(Id, min_length=1)
    total_weight: PosInt
    n_params: PosInt
    n_encrypted: NonNegInt
    ciphertexts: _list(Bytes)
    plain_avg: Bytes = b""
    purpose: Purpose = "train"
    mask_digest: Digest | None = None
    base_version: NonNegInt = 0  # the model the round's updates started from
    scheme: Literal["ckks", "quantize", "quantize+he"] = "ckks"
    # Quantized schemes: per-segment sums of the unselected codes, little-endian
    # unsigned integers of code_sum_widths bytes.
    code_sums: _list(Bytes, max_length=100_000) = dataclasses.field(default_factory=list)
    code_sum_widths: _list(Annotated[int, Strict(), Field(ge=2, le=8)], max_length=100_000) = \
        dataclasses.field(default_factory=list)


ChunkIndex = Annotated[int, Strict(), Field(ge=0, le=MAX_CHUNKS)]
MAX_RESEND_RANGES = 256


@message(config=_STRICT)
class ResendRequest:
    """The aggregator lacks (part of) an agent's upload for an open round: after its
    own restart, or after the agent reconnected. ``ranges`` are half-open chunk
    ranges ``[start, end)``; empty means all chunks. Ranges, never a list: a
    request for a million chunks must still fit one small packet (a broker drops a
    client whose packet exceeds its max_packet_size)."""

    ranges: _list(Annotated[list[ChunkIndex], Strict(), Field(min_length=2, max_length=2)],
                  max_length=MAX_RESEND_RANGES)

    @classmethod
    def of(cls, missing: list[int]) -> "ResendRequest":
        """The request for these chunk numbers: the first MAX_RESEND_RANGES runs (the
        rest is asked for again once those arrive)."""
        ranges: list[list[int]] = []
        for i in sorted(set(missing)):
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            elif len(ranges) < MAX_RESEND_RANGES:
                ranges.append([i, i + 1])
            else:
                break
        return cls(ranges=ranges)

    def chunks(self) -> set[int]:
        """The chunk numbers asked for (overlapping ranges merged first, so a hostile
        request costs at most MAX_CHUNKS numbers)."""
        wanted: set[int] = set()
        done = 0
        for a, b in sorted(self.ranges):
            wanted.update(range(max(a, done), b))
            done = max(done, b)
        return wanted


@message(config=_STRICT)
class EnrollRequest:
    public_key: _fixed_bytes(32)
    nonce: _fixed_bytes(16)
    proof: Digest  # sealing.enrollment_proof over task, agent, public_key, nonce and ts
    ts: FiniteFloat


@message(config=_STRICT)
class Policy:
    """The task's rules, set by the key authority and sealed with the keys: agents
    refuse a round start that departs from them, so the aggregator — the party HE
    hides updates from — cannot downgrade protection, pick the random mask's seed,
    shrink the quorum to isolate one update, or be impersonated."""

    protection: Protection
    min_agents: PosInt  # no round with fewer selected agents or a smaller quorum
    max_samples: PosInt  # an update declaring more samples is rejected by the aggregator
    aggregator_key: _fixed_bytes(32)  # Ed25519: the aggregator's signature on starts, results, resends


@message(config=_STRICT)
class SealedKeys:
    """What a key grant seals: the secret HE contexts, the quantization plan and the policy."""

    ckks: Bytes
    bfv: Bytes = b""
    plan: dict | None = None
    policy: Policy | None = None


@message(config=_STRICT)
class KeyGrant:
    """Signed by the key authority; ``mac`` also proves it knows the agent's
    credential (``sealing.grant_mac``), bound to task, agent, request key and nonce."""

    request_nonce: _fixed_bytes(16)
    ephemeral_key: _fixed_bytes(32)
    aead_nonce: _fixed_bytes(12)
    sealed_context: Bytes
    mac: Digest


@message(config=_STRICT)
class KeyRefused:
    request_nonce: _fixed_bytes(16)
    reason: Str


@message(config=_STRICT)
class PublicContext:
    context: Bytes
    bfv_context: Bytes = b""
    # Not secret: how many agents the quantization plan's integer lanes can sum (0: no plan).
    max_summands: NonNegInt = 0
    policy: Policy | None = None  # the task's rules, for the aggregator to follow


@message(config=_STRICT)
class AgentStatus:
    state: Literal["online", "offline"]


@message(config=_STRICT)
class RollCall:
    """The aggregator asks every agent to announce itself again. Retained statuses
    would do, but RabbitMQ's MQTT plugin delivers retained messages to exact-topic
    subscriptions only, and the aggregator subscribes ``agents/+/status``."""

    aggregator: Annotated[str, Strict(), StringConstraints(max_length=64)]


@message(config=_STRICT)
class PhaseCost:
    wall_s: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
    cpu_s: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
    peak_rss: NonNegInt = 0  # highest resident set seen during the phase (sampled)
    cpu_pct: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 0.0  # cpu_s / wall_s, in % of one core
    bytes_sent: NonNegInt = 0  # MQTT payload bytes published during the phase
    bytes_received: NonNegInt = 0


@message(config=_STRICT)
class Telemetry:
    phases: Annotated[dict[Annotated[str, Strict(), StringConstraints(max_length=32)], PhaseCost], Strict(),
                      Field(max_length=16)]
    bytes_sent: NonNegInt
    bytes_received: NonNegInt
    peak_rss: NonNegInt
    num_samples: NonNegInt
    accuracy: Annotated[float, Strict(), Field(ge=0, le=1)] | None = None
    clipped: NonNegInt = 0  # values clipped to the quantization plan's ranges
    # What the workload reported (train and evaluate), finite numbers under short names.
    metrics: Annotated[dict[Annotated[str, Strict(), StringConstraints(max_length=32)], FiniteFloat], Strict(),
                       Field(max_length=32)] = dataclasses.field(default_factory=dict)
    failed: Annotated[str, Strict(), StringConstraints(max_length=300)] | None = None  # sat the round out: why


BODY_TYPES: dict[str, type] = {
    "round_start": RoundStart,
    "round_closed": RoundClosed,
    "update": Update,
    "result": Result,
    "enroll": EnrollRequest,
    "key_grant": KeyGrant,
    "key_refused": KeyRefused,
    "public_context": PublicContext,
    "status": AgentStatus,
    "roll_call": RollCall,
    "telemetry": Telemetry,
    "resend": ResendRequest,
    "sealed_keys": SealedKeys,  # only ever inside a sealed box, never an envelope kind on the wire
}
KIND_OF = {cls: kind for kind, cls in BODY_TYPES.items()}
FAMILY_KINDS: dict[str, set[str]] = {
    "round_start": {"round_start"},
    "round_closed": {"round_closed"},
    "result": {"result"},
    "update": {"update"},
    "enroll": {"enroll"},
    "key": {"key_grant", "key_refused"},
    "public_context": {"public_context"},
    "status": {"status"},
    "telemetry": {"telemetry"},
    "resend": {"resend"},
    "roll_call": {"roll_call"},
}
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
