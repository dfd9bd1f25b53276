"""Strict field types shared by the envelope and the message schemas: no coercion
of "1" to 1 or of True to 1 on received data, and the bounds every field carries."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, StringConstraints
from pydantic.dataclasses import dataclass as message  # noqa: F401 - the decorator every schema uses

from fedmq.protocol.topics import ID_PATTERN

DIGEST_BYTES = 32
MAX_CHUNKS = 1 << 20

Str = Annotated[str, Strict()]
Bytes = Annotated[bytes, Strict()]
Int = Annotated[int, Strict()]
Id = Annotated[str, Strict(), StringConstraints(pattern=rf"^{ID_PATTERN}$")]
NonNegInt = Annotated[int, Strict(), Field(ge=0, le=(1 << 62))]
PosInt = Annotated[int, Strict(), Field(ge=1, le=(1 << 62))]
Digest = Annotated[bytes, Strict(), Field(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]
FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]


def fixed_bytes(n: int) -> Any:
    return Annotated[bytes, Strict(), Field(min_length=n, max_length=n)]


def list_of(item: Any, **limits: int) -> Any:
    return Annotated[list[item], Strict(), Field(**limits)]


STRICT = ConfigDict(extra="forbid", frozen=True)  # every schema: unknown fields refused, values immutable
