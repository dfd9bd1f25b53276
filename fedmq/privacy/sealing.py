"""Sealing a secret to one recipient: X25519 key agreement + HKDF-SHA256 + AES-256-GCM.

The key authority seals the CKKS secret context to each enrolled agent's X25519
public key, so the broker and the aggregator relay it without being able to read
it. ``info`` binds the box to its task and recipient: a box replayed to another
agent or task fails authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_LABEL = b"fedmq-seal-v1"
_ENROLL_LABEL = b"fedmq-enroll-v1"
_GRANT_LABEL = b"fedmq-grant-v1"


@dataclass(frozen=True)
class SealedBox:
    ephemeral_key: bytes
    nonce: bytes
    ciphertext: bytes


def agent_box_info(task: str, agent: str) -> bytes:
    """Associated data for the secret context sealed to one agent of one task."""
    return f"{task}|{agent}".encode()


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, raw_public(private)


def raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL + b"|" + info).derive(shared)


def seal(recipient_public: bytes, plaintext: bytes, info: bytes) -> SealedBox:
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    nonce = os.urandom(12)
    ciphertext = AESGCM(_key(shared, info)).encrypt(nonce, plaintext, info)
    return SealedBox(raw_public(ephemeral), nonce, ciphertext)


def open_box(private: X25519PrivateKey, box: SealedBox, info: bytes) -> bytes:
    """Raises cryptography's InvalidTag if the box was not sealed to us for ``info``."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(box.ephemeral_key))
    return AESGCM(_key(shared, info)).decrypt(box.nonce, box.ciphertext, info)


def enrollment_proof(credential: str, task: str, agent: str, public_key: bytes, nonce: bytes, ts: float) -> bytes:
    """HMAC proving knowledge of the agent's credential without sending it.

    It binds the request's X25519 key: a replayed request can only ever obtain a
    box sealed to the original requester, which the replayer cannot open. The
    timestamp is inside it, so the clock-skew check cannot be dodged by re-dating.
    """
    msg = b"|".join([_ENROLL_LABEL, task.encode(), agent.encode(), public_key, nonce, repr(float(ts)).encode()])
    return hmac.new(credential.encode(), msg, hashlib.sha256).digest()


def proof_matches(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


def grant_mac(credential: str, task: str, agent: str, public_key: bytes, nonce: bytes, sealed: bytes) -> bytes:
    """The key authority's proof, on a grant, that it knows the agent's credential:
    HMAC under a key derived from the credential (HKDF, its own label — never the
    enrollment proof's key), over the task, agent, request key, nonce and the
    sealed box. A forged grant needs the credential as well as the signing key."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_GRANT_LABEL).derive(credential.encode())
    msg = b"|".join([_GRANT_LABEL, task.encode(), agent.encode(), public_key, nonce, hashlib.sha256(sealed).digest()])
    return hmac.new(key, msg, hashlib.sha256).digest()
