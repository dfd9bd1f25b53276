"""The message bodies of wire protocol v1, and which kinds each topic family carries.

Each body is a strict pydantic dataclass: ``wire.decode_body`` validates what
arrives against it; ``wire.encode_body`` serializes what we send.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import Field, Strict, StringConstraints

from fedmq.protocol.fields import (MAX_CHUNKS, STRICT, Bytes, Digest, FiniteFloat, Id, Int, NonNegInt, PosInt, Str,
                                   fixed_bytes, list_of, message)


PlainDtype = Literal["float32", "float16"]
# On the wire, a masked float part is a 32-bit fixed-point ring ("ring32", secure_aggregation.py).
UpdatePlainDtype = Literal["float32", "float16", "ring32"]
Purpose = Literal["train", "sensitivity"]


@message(config=STRICT)
class DifferentialPrivacy:
    """Client-level DP (DP-FedAvg with distributed noise): each agent clips the change
    of its update to L2 norm ``clip`` and adds Gaussian noise of standard deviation
    ``noise_multiplier * clip / sqrt(noise_agents)``, so a sum of at least
    ``noise_agents`` updates carries ``noise_multiplier * clip``. Updates count with
    weight 1. ``epsilon`` at ``delta`` is the task's budget: no round opens past it.
    Only private together with secure masking or HE: one agent's share of the noise
    alone is far too small to protect its update."""

    clip: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
    noise_multiplier: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
    noise_agents: PosInt
    epsilon: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
    delta: Annotated[float, Strict(), Field(gt=0, lt=1)]


@message(config=STRICT)
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
    # Pairwise masks on every part the aggregator can read (secure_aggregation.py):
    # it learns only the sum of those parts over the round's survivors.
    secure_masking: Annotated[bool, Strict()] = False
    dp: DifferentialPrivacy | None = None


@message(config=STRICT)
class ShardRange:
    """One shard of a sharded round: the next ``count`` agents of the round's sorted
    selection, folded by ``worker`` (fedmq/protocol/shards.py)."""

    worker: Id
    count: PosInt


@message(config=STRICT)
class RoundStart:
    """Announces a round; retained so that an agent that (re)connects late sees it.

    A ``sensitivity`` round collects encrypted sensitivity maps for the mask
    agreement; ``mask_round`` names the round whose encrypted sum defines the mask
    of a ``train`` round (0: the mask needs no agreement).
    """

    model_version: NonNegInt
    deadline: FiniteFloat
    selected: list_of(Id, min_length=1, max_length=100_000)
    quorum: PosInt
    purpose: Purpose = "train"
    protection: Protection = Protection()
    mask_round: NonNegInt = 0
    mask_digest: Digest | None = None
    # The task's model: digest of its layout (names, shapes, dtypes) then of its initial
    # weights, 16 bytes each; None until a quorum of updates agreed on it.
    fingerprint: Digest | None = None
    # Sharded aggregation: which worker folds which agents' updates (empty: the aggregator itself).
    shards: list_of(ShardRange, max_length=1024) = dataclasses.field(default_factory=list)


@message(config=STRICT)
class RoundClosed:
    status: Literal["aggregated", "aborted"]
    participants: list_of(Id)
    dropped: list_of(Id)
    reason: Str
    total_weight: NonNegInt
    bytes_received: NonNegInt
    agg_s: FiniteFloat


@message(config=STRICT)
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
    ciphertexts: list_of(Bytes)
    plain: Bytes = b""
    plain_dtype: UpdatePlainDtype = "float32"
    mask_digest: Digest | None = None
    # Quantized schemes: the unselected codes, one segment per layer, 1 or 2 bytes per code
    # (masked: the ring of their sum, up to 4 bytes).
    codes: list_of(Bytes, max_length=100_000) = dataclasses.field(default_factory=list)
    code_widths: list_of(Annotated[int, Strict(), Field(ge=1, le=4)], max_length=100_000) = \
        dataclasses.field(default_factory=list)
    fingerprint: Digest | None = None  # of the workload's model (RoundStart.fingerprint)


@message(config=STRICT)
class Result:
    """``ciphertexts``: sum of ``n_i * masked values``; ``plain_avg``: the weighted
    average of the plaintext part (float32), already divided by ``total_weight``."""

    participants: list_of(Id, min_length=1)
    total_weight: PosInt
    n_params: PosInt
    n_encrypted: NonNegInt
    ciphertexts: list_of(Bytes)
    plain_avg: Bytes = b""
    purpose: Purpose = "train"
    mask_digest: Digest | None = None
    base_version: NonNegInt = 0  # the model the round's updates started from
    scheme: Literal["ckks", "quantize", "quantize+he"] = "ckks"
    # Quantized schemes: per-segment sums of the unselected codes, little-endian
    # unsigned integers of code_sum_widths bytes.
    code_sums: list_of(Bytes, max_length=100_000) = dataclasses.field(default_factory=list)
    code_sum_widths: list_of(Annotated[int, Strict(), Field(ge=2, le=8)], max_length=100_000) = \
        dataclasses.field(default_factory=list)


@message(config=STRICT)
class PartialSum:
    """A shard worker's sum of its shard's verified updates, for the root aggregator
    to combine. Still encrypted (and, under secure masking, still masked): the worker
    reads no more of an update than the aggregator would. ``sum_meta`` is the running
    sum's own encoding (aggregation.RoundSum.meta_bytes); ``layout`` the layout its
    updates agreed on (folding.layout_to_json), so the root can check shards agree."""

    participants: list_of(Id, max_length=100_000)
    weights: list_of(PosInt, max_length=100_000)
    dropped: list_of(Id, max_length=100_000)
    layout: Str
    sum_meta: Bytes
    ciphertexts: list_of(Bytes)
    bytes_received: NonNegInt
    agg_s: FiniteFloat


ChunkIndex = Annotated[int, Strict(), Field(ge=0, le=MAX_CHUNKS)]
MAX_RESEND_RANGES = 256


@message(config=STRICT)
class ResendRequest:
    """The aggregator lacks (part of) an agent's upload for an open round: after its
    own restart, or after the agent reconnected. ``ranges`` are half-open chunk
    ranges ``[start, end)``; empty means all chunks. Ranges, never a list: a
    request for a million chunks must still fit one small packet (a broker drops a
    client whose packet exceeds its max_packet_size)."""

    ranges: list_of(Annotated[list[ChunkIndex], Strict(), Field(min_length=2, max_length=2)],
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


@message(config=STRICT)
class EnrollRequest:
    public_key: fixed_bytes(32)
    nonce: fixed_bytes(16)
    proof: Digest  # sealing.enrollment_proof over task, agent, public_key, nonce and ts
    ts: FiniteFloat


MaskLane = Annotated[list[Annotated[int, Strict(), Field(ge=0, le=1 << 34)]], Strict(),
                    Field(min_length=2, max_length=2)]


@message(config=STRICT)
class MaskRequest:
    """The aggregator asks the key authority to unmask a closed round's sum: the
    round's selected agents, those whose updates it summed, and the masked lanes'
    shapes ``[length, width]`` (not secret)."""

    selected: list_of(Id, min_length=1, max_length=100_000)
    survivors: list_of(Id, min_length=1, max_length=100_000)
    lanes: list_of(MaskLane, min_length=1, max_length=100_000)


@message(config=STRICT)
class MaskCorrection:
    """The survivors' masks summed, one little-endian lane each: subtracted from the
    masked sum it leaves the survivors' plain sum (secure_aggregation.py)."""

    survivors: list_of(Id, min_length=1, max_length=100_000)
    lanes: list_of(Bytes, max_length=100_000)


@message(config=STRICT)
class MaskRefused:
    survivors: list_of(Id, max_length=100_000)
    reason: Str


@message(config=STRICT)
class Policy:
    """The task's rules, set by the key authority and sealed with the keys: agents
    refuse a round start that departs from them, so the aggregator — the party HE
    hides updates from — cannot downgrade protection, pick the random mask's seed,
    shrink the quorum to isolate one update, or be impersonated."""

    protection: Protection
    min_agents: PosInt  # no round with fewer selected agents or a smaller quorum
    max_samples: PosInt  # an update declaring more samples is rejected by the aggregator
    aggregator_key: fixed_bytes(32)  # Ed25519: the aggregator's signature on starts, results, resends
    # Sharded aggregation: each shard worker's Ed25519 key (its resend requests and partial sums).
    worker_keys: Annotated[dict[Id, fixed_bytes(32)], Strict(), Field(max_length=1024)] = \
        dataclasses.field(default_factory=dict)


@message(config=STRICT)
class SealedKeys:
    """What a key grant seals: the secret HE contexts, the quantization plan and the policy."""

    ckks: Bytes
    bfv: Bytes = b""
    plan: dict | None = None
    policy: Policy | None = None
    # Secure masking: this agent's X25519 mask key, and every agent's public one.
    mask_key: fixed_bytes(32) | None = None
    mask_roster: Annotated[dict[Id, fixed_bytes(32)], Strict(), Field(max_length=100_000)] = \
        dataclasses.field(default_factory=dict)


@message(config=STRICT)
class KeyGrant:
    """Signed by the key authority; ``mac`` also proves it knows the agent's
    credential (``sealing.grant_mac``), bound to task, agent, request key and nonce."""

    request_nonce: fixed_bytes(16)
    ephemeral_key: fixed_bytes(32)
    aead_nonce: fixed_bytes(12)
    sealed_context: Bytes
    mac: Digest


@message(config=STRICT)
class KeyRefused:
    request_nonce: fixed_bytes(16)
    reason: Str


@message(config=STRICT)
class PublicContext:
    context: Bytes
    bfv_context: Bytes = b""
    # Not secret: how many agents the quantization plan's integer lanes can sum (0: no plan).
    max_summands: NonNegInt = 0
    policy: Policy | None = None  # the task's rules, for the aggregator to follow


@message(config=STRICT)
class AgentStatus:
    state: Literal["online", "offline"]


@message(config=STRICT)
class RollCall:
    """The aggregator asks every agent to announce itself again. Retained statuses
    would do, but RabbitMQ's MQTT plugin delivers retained messages to exact-topic
    subscriptions only, and the aggregator subscribes ``agents/+/status``."""

    aggregator: Annotated[str, Strict(), StringConstraints(max_length=64)]


@message(config=STRICT)
class PhaseCost:
    wall_s: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
    cpu_s: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
    peak_rss: NonNegInt = 0  # highest resident set seen during the phase (sampled)
    cpu_pct: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 0.0  # cpu_s / wall_s, in % of one core
    bytes_sent: NonNegInt = 0  # MQTT payload bytes published during the phase
    bytes_received: NonNegInt = 0


@message(config=STRICT)
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
    "partial": PartialSum,
    "result": Result,
    "enroll": EnrollRequest,
    "key_grant": KeyGrant,
    "key_refused": KeyRefused,
    "public_context": PublicContext,
    "status": AgentStatus,
    "roll_call": RollCall,
    "telemetry": Telemetry,
    "resend": ResendRequest,
    "mask_request": MaskRequest,
    "mask_correction": MaskCorrection,
    "mask_refused": MaskRefused,
    "sealed_keys": SealedKeys,  # only ever inside a sealed box, never an envelope kind on the wire
}
KIND_OF = {cls: kind for kind, cls in BODY_TYPES.items()}
FAMILY_KINDS: dict[str, set[str]] = {
    "round_start": {"round_start"},
    "round_closed": {"round_closed"},
    "result": {"result"},
    "update": {"update"},
    "partial": {"partial"},
    "enroll": {"enroll"},
    "key": {"key_grant", "key_refused"},
    "public_context": {"public_context"},
    "status": {"status"},
    "telemetry": {"telemetry"},
    "resend": {"resend"},
    "roll_call": {"roll_call"},
    "mask_request": {"mask_request"},
    "mask_correction": {"mask_correction", "mask_refused"},
}
