"""The key authority daemon.

Trust model (seed 000, Appendix A): the key authority and the aggregator do not
collude. The aggregator receives a context without any key; each agent that
proves knowledge of its enrollment credential receives the secret context sealed
to a fresh X25519 key of its own, so the broker relays it blind.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedmq.privacy import client_dp, exposure, he, secure_aggregation
from fedmq.protocol import topics, wire
from fedmq.runtime.config import KeyAuthorityConfig
from fedmq.runtime.mqtt_session import MqttSession
from fedmq.runtime.private_files import write_private
from fedmq.privacy.quantization import LayerQuant, PlanError, QuantPlan
from fedmq.privacy import signing
from fedmq.privacy.sealing import SealedBox, agent_box_info, enrollment_proof, grant_mac, proof_matches, seal
from fedmq.runtime.signals import stop_event

from keyauthority.mask_ledger import MaskLedger, RecoveryRefused

log = logging.getLogger("fedmq.keyauthority")


class StartError(RuntimeError):
    """A configuration the key authority cannot start with; the text says what to do."""


class KeyAuthority:
    def __init__(self, cfg: KeyAuthorityConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        state = Path(cfg.state_dir)
        try:
            aggregator_key = signing.configured_public(
                cfg.aggregator_key, "aggregator_key", config_path,
                "the policy names the aggregator whose signature agents accept", "aggregator")
            worker_keys = {worker: signing.configured_public(
                ref, f"worker_keys.{worker}", config_path,
                "the policy names each shard worker whose signature agents and the root accept", "aggregator")
                for worker, ref in cfg.worker_keys.items()}
        except ValueError as exc:
            raise StartError(str(exc)) from None
        self.signing_key = signing.load_or_create(cfg.signing_key or state / "signing.key")
        self.ctx = self._load_or_create_context(state)
        self.bfv = self._load_or_create_bfv(state)
        self.plan = self._plan()
        self.policy = wire.Policy(protection=self._protection(), min_agents=cfg.policy.min_agents,
                                  max_samples=cfg.policy.max_samples, aggregator_key=aggregator_key,
                                  worker_keys=worker_keys)
        self._ckks_secret, self._bfv_secret = he.serialize_secret(self.ctx), he.serialize_secret(self.bfv)
        # Secure masking: every agent's X25519 mask key derives from one master secret,
        # so recovery can recompute any seed; the roster is every enrollable agent's.
        self._mask_master = self._load_or_create_master(state / "mask_master.bin")
        self.mask_keys = {agent: secure_aggregation.agent_private_key(self._mask_master, cfg.task, agent)
                          for agent in cfg.credentials}
        self.mask_roster = {a: secure_aggregation.public_bytes(k) for a, k in self.mask_keys.items()}
        self._ledger_file = state / "mask_ledger.json"
        self.ledger = MaskLedger.from_json(json.loads(self._ledger_file.read_text()), self.policy.min_agents) \
            if self._ledger_file.exists() else MaskLedger(self.policy.min_agents)
        self.public_blob = he.serialize_public(self.ctx)
        self.bfv_public_blob = he.serialize_public(self.bfv)
        self.session = MqttSession(cfg.broker, cfg.authority_id, signing_key=self.signing_key)
        self._seen_nonces: OrderedDict[bytes, float] = OrderedDict()
        self.enrolled: set[str] = set()

    def _protection(self) -> wire.Protection:
        """The policy's protection, with the DP noise calibrated to the configured budget."""
        pol = self.cfg.policy
        if pol.dp is None:
            return pol.protection
        z = client_dp.calibrate(pol.dp.epsilon, pol.dp.delta, pol.dp.rounds)
        log.info("differential privacy: epsilon %.3g at delta %.1g over %d round(s) needs noise multiplier %.3f "
                 "(clip %.3g; noise shared by %d agents)", pol.dp.epsilon, pol.dp.delta, pol.dp.rounds, z,
                 pol.dp.clip, pol.min_agents)
        dp = wire.DifferentialPrivacy(clip=float(pol.dp.clip), noise_multiplier=z, noise_agents=pol.min_agents,
                                      epsilon=float(pol.dp.epsilon), delta=float(pol.dp.delta))
        return wire.Protection(**{**vars(pol.protection), "dp": dp})

    @staticmethod
    def _load_or_create_master(path: Path) -> bytes:
        if path.exists():
            return path.read_bytes()
        master = os.urandom(32)
        write_private(path, master)
        return master

    def _secret_blob(self, agent: str) -> bytes:
        """What one agent's grant seals: the shared HE keys, plan and policy, and its own mask key."""
        return wire.encode_body(wire.SealedKeys(
            ckks=self._ckks_secret, bfv=self._bfv_secret, plan=self.plan.to_wire() if self.plan else None,
            policy=self.policy, mask_key=secure_aggregation.private_bytes(self.mask_keys[agent]),
            mask_roster=self.mask_roster))[1]

    def _load_or_create_context(self, state_dir: Path):
        path = state_dir / "ckks_secret_context.bin"
        if path.exists():
            log.info("loaded the task's CKKS context from %s", path)
            return he.load_context(path.read_bytes())
        s = self.cfg.he
        params = he.CkksParams(s.poly_modulus_degree, tuple(s.coeff_mod_bit_sizes), s.scale_bits)
        ctx = he.create_secret_context(params)
        write_private(path, he.serialize_secret(ctx))
        log.info("generated a CKKS context (N=%d, q=%s bits, scale 2^%d) into %s",
                 params.poly_modulus_degree, list(params.coeff_mod_bit_sizes), params.scale_bits, path)
        return ctx

    def _load_or_create_bfv(self, state_dir: Path):
        path = state_dir / "bfv_secret_context.bin"
        if path.exists():
            return he.load_context(path.read_bytes())
        b = self.cfg.bfv
        ctx = he.create_bfv_secret_context(he.BfvParams(b.poly_modulus_degree, tuple(b.coeff_mod_bit_sizes),
                                                         b.plain_modulus_bits))
        write_private(path, he.serialize_secret(ctx))
        return ctx

    def _plan(self) -> QuantPlan | None:
        """The task's quantization plan, refused here if its sums could overflow."""
        q = self.cfg.quantization
        if q is None:
            return None
        plan = QuantPlan(tuple(LayerQuant(**layer.model_dump()) for layer in q.layers), q.n_ref, q.max_agents)
        b = self.cfg.bfv
        per_slot = plan.check_packing(he.BfvParams(b.poly_modulus_degree, tuple(b.coeff_mod_bit_sizes),
                                                   b.plain_modulus_bits).usable_bits)
        log.info("quantization plan: %d layer setting(s), sums of up to %d agents in %d-bit lanes, %d per BFV slot",
                 len(plan.layers), plan.max_agents, plan.sum_bits, per_slot)
        return plan

    def start(self) -> None:
        self.session.subscribe(topics.all_enrollments(self.cfg.task))
        self.session.subscribe(topics.all_mask_requests(self.cfg.task))
        self.session.connect()
        task = self.cfg.task
        self.session.send_stream(lambda seq: topics.public_context(task, seq),
                                 wire.PublicContext(context=self.public_blob, bfv_context=self.bfv_public_blob,
                                                    max_summands=self.plan.max_agents if self.plan else 0,
                                                    policy=self.policy),
                                 task=task, rnd=0,
                                 chunk_size=self.cfg.chunk_size, retain=True)
        exposure.log_start_warning(log, self.policy.protection)
        log.info("published the public contexts (CKKS %d, BFV %d bytes; no keys, no plan) and the signed policy "
                 "(%s, p=%s, min %d agents) for task %s", len(self.public_blob), len(self.bfv_public_blob),
                 self.policy.protection.scheme, self.policy.protection.p, self.policy.min_agents, task)

    def serve(self, stop=None) -> None:
        while stop is None or not stop.is_set():
            try:
                msg = self.session.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.handle(msg.topic, msg.payload)
            except wire.WireError as exc:
                log.warning("rejected message on %s: %s", msg.topic, exc)

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            info = topics.parse(topic)
        except ValueError as exc:
            raise wire.WireError(str(exc)) from None
        if info.family == "mask_request":
            self._on_mask_request(info, payload)
            return
        if info.family != "enroll":
            raise wire.WireError("not an enrollment or mask-recovery topic")
        env = wire.decode_envelope(payload, max_bytes=4096)
        wire.check_against_topic(env, info, task=self.cfg.task)
        if env.total != 1 or wire.digest(env.body) != env.digest:
            raise wire.WireError("enrollment must be one chunk with a matching digest")
        req: wire.EnrollRequest = wire.decode_body(env.kind, env.body)
        self._enroll(env, req)

    def _enroll(self, env: wire.Envelope, req: wire.EnrollRequest) -> None:
        agent, task = env.sender, self.cfg.task
        if abs(time.time() - req.ts) > self.cfg.max_clock_skew_s:
            raise wire.WireError(f"enrollment from {agent!r} is stale or from the future (ts {req.ts:.0f})")
        if req.nonce in self._seen_nonces:
            raise wire.WireError(f"replayed enrollment from {agent!r}")
        credential = self.cfg.credentials.get(agent)
        expected = enrollment_proof(credential.get_secret_value() if credential else "",
                                    task, agent, req.public_key, req.nonce, req.ts)
        if credential is not None and proof_matches(expected, req.proof):
            self._remember(req.nonce)  # only proven requests fill the replay cache
        if credential is None or not proof_matches(expected, req.proof):
            log.warning("refused enrollment of %r: unknown agent or wrong credential", agent)
            self.session.send(topics.agent_key(task, agent, 0),
                              wire.KeyRefused(request_nonce=req.nonce, reason="unknown agent or wrong credential"),
                              task=task, rnd=0)
            return
        box: SealedBox = seal(req.public_key, self._secret_blob(agent), agent_box_info(task, agent))
        mac = grant_mac(credential.get_secret_value(), task, agent, req.public_key, req.nonce, box.ciphertext)
        grant = wire.KeyGrant(request_nonce=req.nonce, ephemeral_key=box.ephemeral_key,
                              aead_nonce=box.nonce, sealed_context=box.ciphertext, mac=mac)
        self.session.send_stream(lambda seq: topics.agent_key(task, agent, seq), grant, task=task, rnd=0,
                                 chunk_size=self.cfg.chunk_size)
        self.enrolled.add(agent)
        log.info("enrolled %s: secret context sealed to its X25519 key", agent)

    def _on_mask_request(self, info: topics.TopicInfo, payload: bytes) -> None:
        """Unmask a closed round's sum for its survivors, once per round (mask_ledger.py)."""
        env = wire.decode_envelope(payload, max_bytes=4 * 1024 * 1024)
        wire.check_against_topic(env, info, task=self.cfg.task)
        wire.check_signature(env, self.policy.aggregator_key, "the aggregator")
        if env.total != 1 or wire.digest(env.body) != env.digest:
            raise wire.WireError("a mask request must be one chunk with a matching digest")
        req: wire.MaskRequest = wire.decode_body(env.kind, env.body)
        rnd, task = env.round, self.cfg.task
        try:
            unknown = [a for a in req.selected if a not in self.mask_keys]
            if unknown:
                raise RecoveryRefused(f"round {rnd}: agents {unknown[:5]} have no mask key here")
            lanes = [secure_aggregation.Lane(length, width) for length, width in req.lanes]
            survivors = self.ledger.check(rnd, list(req.selected), list(req.survivors))
        except (RecoveryRefused, secure_aggregation.MaskingError) as exc:
            log.warning("refused to unmask round %d: %s", rnd, exc)
            self.session.send(topics.mask_correction(task, rnd, 0),
                              wire.MaskRefused(survivors=list(req.survivors), reason=str(exc)[:300]),
                              task=task, rnd=rnd)
            return
        write_private(self._ledger_file, json.dumps(self.ledger.to_json()).encode())  # before answering
        t0 = time.perf_counter()
        corr = secure_aggregation.correction(self.mask_keys, list(req.selected), list(survivors), task, rnd, lanes)
        body = wire.MaskCorrection(survivors=list(survivors),
                                   lanes=[np.ascontiguousarray(c).tobytes() for c in corr])
        self.session.send_stream(lambda seq: topics.mask_correction(task, rnd, seq), body, task=task, rnd=rnd,
                                 chunk_size=self.cfg.chunk_size)
        log.info("unmasked round %d for %d survivor(s) of %d selected (%d lane(s), %.2fs)", rnd, len(survivors),
                 len(req.selected), len(lanes), time.perf_counter() - t0)

    def _remember(self, nonce: bytes) -> None:
        now = time.time()
        self._seen_nonces[nonce] = now
        while self._seen_nonces:
            oldest, seen = next(iter(self._seen_nonces.items()))
            if now - seen <= 2 * self.cfg.max_clock_skew_s and len(self._seen_nonces) <= 100_000:
                break
            self._seen_nonces.popitem(last=False)

    def close(self) -> None:
        self.session.close()


def run(cfg: KeyAuthorityConfig, config_path: Path | None = None) -> None:
    stop = stop_event()
    try:
        ka = KeyAuthority(cfg, config_path)
    except (PlanError, StartError) as exc:
        log.error("refusing to start: %s", exc)
        raise SystemExit(2) from None
    ka.start()
    try:
        ka.serve(stop)
    finally:
        ka.close()
