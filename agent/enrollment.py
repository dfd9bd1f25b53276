"""Enrollment and the key store: the agent asks the key authority for the task's
keys, opens the sealed grant, and keeps the keys in its own state directory
(0600), so a restart need not enroll again."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

from fedmq.privacy import exposure, he
from fedmq.protocol import topics, wire
from fedmq.privacy.quantization import QuantPlan
from fedmq.privacy import signing
from fedmq.privacy.sealing import SealedBox, agent_box_info, enrollment_proof, grant_mac, open_box, proof_matches
from fedmq.runtime.private_files import write_private

log = logging.getLogger("fedmq.agent")

class EnrollmentRefused(RuntimeError):
    pass


class StartRefused(RuntimeError):
    """A configuration the agent cannot start with (exit 2); the text says what to do."""


class StateDirTaken(StartRefused):
    """The configured state directory belongs to another agent id."""


class Enrollment:
    """The part of the agent that obtains, stores and loads its keys. The HE
    contexts are built on first use: an idle agent on a Pi should not pay for them."""

    def _enroll(self, stop: threading.Event) -> None:
        credential = self.cfg.credential.get_secret_value()
        while self._keys is None and not stop.is_set():
            nonce, ts = os.urandom(16), time.time()
            self._pending_nonces.add(nonce)
            proof = enrollment_proof(credential, self.task, self.id, self._x25519_public, nonce, ts)
            self.session.send(topics.enroll(self.task, self.id),
                              wire.EnrollRequest(public_key=self._x25519_public, nonce=nonce, proof=proof, ts=ts),
                              task=self.task, rnd=0)
            log.info("%s: enrollment requested", self.id)
            end = time.monotonic() + self.cfg.enroll_retry_s
            while self._keys is None and time.monotonic() < end and not stop.is_set():
                try:
                    self.dispatch(self.session.inbox.get(timeout=0.2), raise_refusal=True)
                except queue.Empty:
                    pass

    def _resolve_authority_key(self) -> None:
        try:
            self.authority_key = signing.configured_public(
                self.cfg.authority_key, "authority_key", self.config_path,
                "the agent accepts keys only with the key authority's signature", "keyauthority")
        except ValueError as exc:
            raise StartRefused(str(exc)) from None

    def _on_key(self, env: wire.Envelope, raise_refusal: bool) -> None:
        # Signed by the key authority, or not ours to believe: anyone may publish here
        # on a broker without ACLs, and a forged grant would make us encrypt to them.
        wire.check_signature(env, self.authority_key, "the key authority")
        if env.kind == "key_refused":
            body: wire.KeyRefused = wire.decode_body(env.kind, env.body)
            if body.request_nonce in self._pending_nonces and raise_refusal:
                raise EnrollmentRefused(f"key authority refused enrollment of {self.id!r}: {body.reason}")
            return
        done = self.chunks.add(env)
        if done is None:
            return
        grant: wire.KeyGrant = wire.decode_body(done.kind, done.body)
        if grant.request_nonce not in self._pending_nonces:
            raise wire.WireError("key grant answers no request of ours (replayed?)")
        expected = grant_mac(self.cfg.credential.get_secret_value(), self.task, self.id, self._x25519_public,
                             grant.request_nonce, grant.sealed_context)
        if not proof_matches(expected, grant.mac):
            raise wire.WireError("key grant's MAC does not prove knowledge of our credential: forged")
        box = SealedBox(grant.ephemeral_key, grant.aead_nonce, grant.sealed_context)
        try:
            secret = open_box(self._x25519, box, agent_box_info(self.task, self.id))
        except Exception:
            raise wire.WireError("key grant does not open with our key: not sealed to us") from None
        self._adopt_keys(secret)
        write_private(self._keys_file, secret)  # StateDirectory, 0600: a restart need not re-enroll
        del secret
        self._pending_nonces.clear()
        log.info("%s: enrolled; secret HE context received sealed", self.id)

    def _claim_state_dir(self) -> None:
        """A state directory holds one agent's keys and model: another agent id's is
        refused (two agents sharing one would mix keys and models)."""
        owner = Path(self.cfg.state_dir) / "agent_id"
        if owner.exists():
            who = owner.read_text().strip()
            if who != self.id:
                raise StateDirTaken(f"state_dir {self.cfg.state_dir} belongs to agent {who!r}, not {self.id!r}: "
                                    f"give each agent its own state_dir (e.g. state/{self.id})"
                                    + (f" in {self.config_path}" if self.config_path else ""))
        else:
            write_private(owner, f"{self.id}\n".encode())

    @property
    def _keys_file(self) -> Path:
        return Path(self.cfg.state_dir) / "keys.bin"

    def _adopt_keys(self, sealed_keys_body: bytes) -> None:
        keys: wire.SealedKeys = wire.decode_body("sealed_keys", sealed_keys_body)
        if keys.policy is None:
            raise wire.WireError("the keys carry no task policy (granted by an older key authority)")
        self.plan = QuantPlan.from_wire(keys.plan) if keys.plan else None
        self._keys, self._ctx, self._bfv = keys, None, None
        # The agent's owner should know what its updates reveal, not only the operator.
        exposure.log_start_warning(log, keys.policy.protection, f"{self.id}: ")

    @property
    def ctx(self):
        """The secret CKKS context, built when a round first needs it: the HE library
        costs ~20 MB, which an idle agent on a Pi should not pay."""
        if self._keys is None:
            raise he.HEError("no keys yet: enrollment has not completed")
        if self._ctx is None:
            ctx = he.load_context(self._keys.ckks, n_threads=self.cfg.he_threads)
            if not ctx.is_private():
                raise he.HEError("the granted context holds no secret key; delete the state dir and re-enroll")
            self._ctx = ctx
            log.info("%s: secret CKKS context loaded (%s)", self.id, he.params_of(ctx))
        return self._ctx

    @property
    def bfv(self):
        if self._bfv is None and self._keys is not None and self._keys.bfv:
            self._bfv = he.load_context(self._keys.bfv, n_threads=self.cfg.he_threads)
        return self._bfv
