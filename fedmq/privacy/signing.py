"""Ed25519 signatures on what the key authority and the aggregator publish.

Why: the broker's ACLs are the only other guard, and the embedded broker and
RabbitMQ have none — anyone who can publish on an agent's key topic could hand
it a key they hold, or a round start that downgrades its protection. The key
authority signs what it issues (grants, refusals, the public context and the
task's policy); the aggregator signs what it sends (round starts, results,
closes, resend requests, roll calls). Agents learn the key authority's public
key at provisioning, like a CA, and the aggregator's from the sealed policy.

A signature covers one whole message stream: protocol version, kind, task,
round, sender and the SHA-256 digest of the body — every chunk carries the same
signature, checked before the chunk is stored. Keys come from ``cryptography``;
nothing here is a home-made primitive.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq.runtime.private_files import write_private

SIG_BYTES = 64
PUBLIC_BYTES = 32
_LABEL = b"fedmq-sig-v1"
_HEX = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """A signature that is missing, malformed or does not verify; the text says which."""


def signed_data(v: int, kind: str, task: str, rnd: int, sender: str, digest: bytes) -> bytes:
    return b"|".join([_LABEL, str(v).encode(), kind.encode(), task.encode(), str(rnd).encode(), sender.encode(),
                      digest])


def sign(key: Ed25519PrivateKey, v: int, kind: str, task: str, rnd: int, sender: str, digest: bytes) -> bytes:
    return key.sign(signed_data(v, kind, task, rnd, sender, digest))


def verify(public: bytes, sig: bytes, v: int, kind: str, task: str, rnd: int, sender: str, digest: bytes,
           who: str) -> None:
    """Raise SignatureError unless ``sig`` is ``who``'s signature of this stream."""
    if not sig:
        raise SignatureError(f"unsigned {kind} message; only {who}'s signed messages are accepted")
    if len(sig) != SIG_BYTES:
        raise SignatureError(f"{kind} signature of {len(sig)} bytes, expected {SIG_BYTES}")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, signed_data(v, kind, task, rnd, sender, digest))
    except InvalidSignature:
        raise SignatureError(f"{kind} message not signed by {who} (forged or altered)") from None


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The role's signing key from ``path`` (raw 32 bytes, 0600), created on first
    use; its public half is written beside it as ``<name>.pub`` (hex, readable)
    for the operator to hand to the other roles."""
    path = Path(path)
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ValueError(f"{path}: not an Ed25519 signing key (expected 32 bytes, found {len(raw)})")
        key = Ed25519PrivateKey.from_private_bytes(raw)
    else:
        key = Ed25519PrivateKey.generate()
        write_private(path, key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption()))
    pub = public_path(path)
    text = public_bytes(key).hex() + "\n"
    if not pub.exists() or pub.read_text() != text:
        tmp = pub.with_name(f".{pub.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pub)
    return key


def public_path(key_path: Path) -> Path:
    return Path(key_path).with_suffix(".pub")


def resolve_public(value: str, *, relative_to: Path | None = None) -> bytes:
    """A public key given in a config: 64 hex characters, or the path of a ``.pub``
    file holding them (the one ``load_or_create`` writes). ValueError says what is wrong."""
    value = value.strip()
    if _HEX.match(value.lower()):
        return bytes.fromhex(value)
    path = Path(value)
    if not path.is_absolute() and relative_to is not None and not path.exists():
        path = relative_to / path
    try:
        text = path.read_text().strip().lower()
    except OSError as exc:
        raise ValueError(f"neither 64 hex characters nor a readable public key file ({value}: {exc.strerror}); "
                         "`fedmq signing-key ROLE --config ROLE.yaml` creates a role's key and prints it") from None
    if not _HEX.match(text):
        raise ValueError(f"{path} does not hold an Ed25519 public key (64 hex characters)")
    return bytes.fromhex(text)


def configured_public(value: str | None, key: str, config_path: Path | None, why: str, whose: str) -> bytes:
    """The public key a role's config names under ``key``, or ValueError with one line
    that names the file, the key and what to do (every role starts with this check)."""
    where = f" in {config_path}" if config_path else ""
    if value is None:
        raise ValueError(f"{key} is not set{where}: {why} (`fedmq signing-key {whose} --config "
                         f"{whose.upper()}.yaml` prints it)")
    try:
        return resolve_public(value, relative_to=config_path.parent if config_path else None)
    except ValueError as exc:
        raise ValueError(f"{key}{where}: {exc}") from None
