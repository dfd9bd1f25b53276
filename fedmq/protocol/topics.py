"""MQTT topic layout of protocol v1.

One place builds and parses topics so that every role, the ACL generator and the
tests agree on them. Task and agent ids are restricted to ``[A-Za-z0-9_.-]`` so a
topic level can never contain a wildcard or a separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_ID_RE = re.compile(rf"^{ID_PATTERN}$")


def check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(f"{what} {value!r} must match {ID_PATTERN}")
    return value


def round_start(task: str, rnd: int) -> str:
    return f"rounds/{task}/{rnd}/start"


def round_closed(task: str, rnd: int) -> str:
    return f"rounds/{task}/{rnd}/closed"


def round_result(task: str, rnd: int, seq: int) -> str:
    return f"rounds/{task}/{rnd}/result/{seq}"


def resend(task: str, rnd: int, agent: str) -> str:
    return f"rounds/{task}/{rnd}/resend/{agent}"


def own_resends(task: str, agent: str) -> str:
    return f"rounds/{task}/+/resend/{agent}"


def update_chunk(task: str, rnd: int, agent: str, seq: int) -> str:
    return f"updates/{task}/{rnd}/{agent}/{seq}"


def shard_update_chunk(task: str, worker: str, rnd: int, agent: str, seq: int) -> str:
    """An agent's upload in a sharded round: under its shard worker's prefix, so the
    broker's ACL lets each worker read its own shard and nothing else."""
    return f"shards/{task}/{worker}/{rnd}/{agent}/{seq}"


def partial_chunk(task: str, rnd: int, worker: str, seq: int) -> str:
    return f"partials/{task}/{rnd}/{worker}/{seq}"


def enroll(task: str, agent: str) -> str:
    return f"enroll/{task}/{agent}"


def agent_key(task: str, agent: str, seq: int) -> str:
    return f"keys/{task}/agents/{agent}/{seq}"


def public_context(task: str, seq: int) -> str:
    return f"keys/{task}/public/{seq}"


def agent_status(agent: str) -> str:
    return f"agents/{agent}/status"


def telemetry(agent: str) -> str:
    return f"telemetry/{agent}"


def mask_request(task: str, rnd: int) -> str:
    return f"masks/{task}/{rnd}/request"


def mask_correction(task: str, rnd: int, seq: int) -> str:
    return f"masks/{task}/{rnd}/correction/{seq}"


# Subscription filters.
def roll_call(task: str) -> str:
    return f"rounds/{task}/rollcall"


def all_round_starts(task: str) -> str:
    return f"rounds/{task}/+/start"


def all_round_closed(task: str) -> str:
    return f"rounds/{task}/+/closed"


def all_results(task: str) -> str:
    return f"rounds/{task}/+/result/+"


def all_updates(task: str) -> str:
    return f"updates/{task}/+/+/+"


def shard_updates(task: str, worker: str) -> str:
    return f"shards/{task}/{worker}/+/+/+"


def all_partials(task: str) -> str:
    return f"partials/{task}/+/+/+"


def all_enrollments(task: str) -> str:
    return f"enroll/{task}/+"


def own_keys(task: str, agent: str) -> str:
    return f"keys/{task}/agents/{agent}/+"


def all_public_context(task: str) -> str:
    return f"keys/{task}/public/+"


def all_mask_requests(task: str) -> str:
    return f"masks/{task}/+/request"


def all_mask_corrections(task: str) -> str:
    return f"masks/{task}/+/correction/+"


ALL_STATUS = "agents/+/status"
ALL_TELEMETRY = "telemetry/+"


@dataclass(frozen=True)
class TopicInfo:
    """What a topic says about its message; the envelope must agree with it."""

    family: str
    task: str | None = None
    round: int | None = None
    agent: str | None = None
    seq: int | None = None
    shard: str | None = None  # the shard worker an update is addressed to (sharded rounds)


def parse(topic: str) -> TopicInfo:
    """Parse a protocol topic; raises ValueError for a topic outside the layout."""
    parts = topic.split("/")
    try:
        match parts:
            case ["rounds", task, "rollcall"]:
                return TopicInfo("roll_call", task)
            case ["rounds", task, rnd, "start"]:
                return TopicInfo("round_start", task, int(rnd))
            case ["rounds", task, rnd, "closed"]:
                return TopicInfo("round_closed", task, int(rnd))
            case ["rounds", task, rnd, "resend", agent]:
                return TopicInfo("resend", task, int(rnd), agent)
            case ["rounds", task, rnd, "result", seq]:
                return TopicInfo("result", task, int(rnd), seq=int(seq))
            case ["updates", task, rnd, agent, seq]:
                return TopicInfo("update", task, int(rnd), agent, int(seq))
            case ["shards", task, worker, rnd, agent, seq]:
                return TopicInfo("update", task, int(rnd), agent, int(seq), shard=worker)
            case ["partials", task, rnd, worker, seq]:
                return TopicInfo("partial", task, int(rnd), worker, int(seq))
            case ["enroll", task, agent]:
                return TopicInfo("enroll", task, agent=agent)
            case ["keys", task, "agents", agent, seq]:
                return TopicInfo("key", task, agent=agent, seq=int(seq))
            case ["keys", task, "public", seq]:
                return TopicInfo("public_context", task, seq=int(seq))
            case ["masks", task, rnd, "request"]:
                return TopicInfo("mask_request", task, int(rnd))
            case ["masks", task, rnd, "correction", seq]:
                return TopicInfo("mask_correction", task, int(rnd), seq=int(seq))
            case ["agents", agent, "status"]:
                return TopicInfo("status", agent=agent)
            case ["telemetry", agent]:
                return TopicInfo("telemetry", agent=agent)
    except ValueError as exc:
        raise ValueError(f"topic {topic!r}: non-integer round or sequence") from exc
    raise ValueError(f"topic {topic!r} is not part of protocol v1")
