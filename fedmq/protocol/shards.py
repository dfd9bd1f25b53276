"""Shard assignment of a sharded round, pure and deterministic.

The round start names the shards as contiguous ranges of the round's *sorted*
selection (``ShardRange(worker, count)``), so every agent and every worker derives
the same assignment from the start alone, and a start for a thousand agents grows
by a few bytes per worker, not by a list per agent.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmq.protocol.messages import ShardRange


class ShardError(ValueError):
    """A round start whose shards do not describe its selection."""


def assign(selected: Sequence[str], workers: Sequence[str]) -> list[ShardRange]:
    """Split the sorted selection into ``len(workers)`` ranges of near-equal size
    (the first ones one larger); a worker with nothing to fold gets no range."""
    n, k = len(selected), len(workers)
    if k == 0:
        return []
    base, extra = divmod(n, k)
    counts = [base + (1 if i < extra else 0) for i in range(k)]
    return [ShardRange(worker=w, count=c) for w, c in zip(workers, counts) if c > 0]


def members(selected: Sequence[str], shards: Sequence[ShardRange]) -> dict[str, list[str]]:
    """worker -> its agents ({} for an unsharded round); raises ShardError unless the ranges cover the selection
    exactly once (a start that leaves an agent without a worker, or names a worker
    twice, is refused rather than guessed around)."""
    if not shards:
        return {}  # not sharded
    ordered = sorted(selected)
    if sum(s.count for s in shards) != len(ordered):
        raise ShardError(f"shards cover {sum(s.count for s in shards)} agents; the round selects {len(ordered)}")
    out: dict[str, list[str]] = {}
    at = 0
    for s in shards:
        if s.worker in out:
            raise ShardError(f"worker {s.worker!r} is named for two shards")
        out[s.worker] = ordered[at:at + s.count]
        at += s.count
    return out


def worker_of(agent: str, selected: Sequence[str], shards: Sequence[ShardRange]) -> str | None:
    """The worker folding ``agent``'s update (None: the round is not sharded)."""
    for worker, agents in members(selected, shards).items():
        if agent in agents:
            return worker
    return None
