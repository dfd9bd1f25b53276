"""Taking part in a round: a round start is checked and parked until its base
model and mask are known, then the agent trains, protects (encrypts or
quantizes) and uploads its update, kept on disk for resend requests."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import psutil

from agent.enrollment import EnrollmentRefused, StartRefused
from fedmq.privacy import client_dp, he, masking, protection
from fedmq.protocol import shards, topics, wire
from fedmq.runtime.mqtt_session import BrokerError
from fedmq.runtime.telemetry import PhaseClock

log = logging.getLogger("fedmq.agent")


class RoundSkipped(RuntimeError):
    """This round cannot be done properly here; the agent sits it out and says why."""


KEEP_STARTS = 16  # round starts remembered, to check results against


class RoundWork:
    """train -> protect -> upload, one round at a time."""

    def _on_round_start(self, env: wire.Envelope) -> None:
        start: wire.RoundStart = wire.decode_body(env.kind, env.body)
        rnd = env.round
        self._check_policy(rnd, start)
        self.seen_starts[rnd] = start
        for old in sorted(self.seen_starts)[:-KEEP_STARTS]:
            del self.seen_starts[old]
        try:
            self._handle_start(rnd, start)
        finally:
            early = self._early_results.pop(rnd, None)
            if early is not None:
                self._on_result(*early)

    def _check_policy(self, rnd: int, start: wire.RoundStart) -> None:
        """The start must follow the task's sealed policy: the aggregator may not
        lower the protection (p = 0 would make us send plain weights), pick the
        random mask's seed, or shrink a round until one update stands alone."""
        pol = self._keys.policy
        if start.protection != pol.protection:
            want, got = pol.protection, start.protection
            raise wire.WireError(
                f"round {rnd} start asks for protection {got.scheme} p={got.p} mode={got.mode} seed={got.seed}, "
                f"but the task's sealed policy says {want.scheme} p={want.p} mode={want.mode} seed={want.seed}: "
                "refused (protection downgrade?)")
        if start.quorum < pol.min_agents or len(start.selected) < pol.min_agents:
            raise wire.WireError(f"round {rnd} selects {len(start.selected)} agent(s) with quorum {start.quorum}; "
                                 f"the task's policy needs at least {pol.min_agents}: refused")
        unknown = sorted({s.worker for s in start.shards} - pol.worker_keys.keys())
        if unknown:
            raise wire.WireError(f"round {rnd} names shard worker(s) {unknown[:5]} that the task's sealed policy "
                                 "does not list: refused (our update would go to a reader nobody vouched for)")
        shards.members(start.selected, start.shards)  # ShardError (a ValueError) unless they cover the selection

    def _handle_start(self, rnd: int, start: wire.RoundStart) -> None:
        if rnd in self.handled_rounds or rnd <= self.latest_version:
            return  # a retained start we have already dealt with
        if self.id not in start.selected:
            log.info("%s: not selected for round %d", self.id, rnd)
            self.handled_rounds.add(rnd)
            self._mask_for(start)  # still learn the mask, to rebuild the model from the result
            return
        if time.time() > start.deadline:
            log.info("%s: round %d is past its deadline; skipping", self.id, rnd)
            self.handled_rounds.add(rnd)
            return
        try:
            self._check_fingerprint(rnd, start)  # before parking: a mismatch never becomes ready
        except RoundSkipped as exc:
            self.handled_rounds.add(rnd)
            log.error("%s: sitting round %d out: %s", self.id, rnd, exc)
            self._sit_out(rnd, str(exc))
            return
        if not self._ready_for(start):
            log.info("%s: round %d waits for model %d / mask round %d", self.id, rnd,
                     start.model_version, start.mask_round)
            self.parked = (rnd, start)
            return
        self._run_round(rnd, start)

    def _ready_for(self, start: wire.RoundStart) -> bool:
        has_model = start.model_version == 0 or start.model_version in self.models
        has_mask = start.purpose == "sensitivity" or self._mask_for(start) is not None
        return has_model and has_mask

    def _run_round(self, rnd: int, start: wire.RoundStart) -> None:
        self.handled_rounds.add(rnd)
        if not self._memory_allows(rnd):
            return
        self._busy_until = start.deadline + 60
        self.notifier.status(f"round {rnd}: {start.purpose}")
        try:
            if start.purpose == "sensitivity":
                self._send_sensitivity(rnd, start)
            else:
                self._participate(rnd, start)
        except (StartRefused, EnrollmentRefused):
            raise
        except RoundSkipped as exc:
            log.error("%s: sitting round %d out: %s", self.id, rnd, exc)
            self._sit_out(rnd, str(exc))
        except Exception as exc:  # a misbehaving workload (or anything else) costs one round, never the agent
            log.exception("%s: round %d failed; sitting it out: %s", self.id, rnd, exc)
            self._sit_out(rnd, f"{type(exc).__name__}: {exc}")
        finally:
            self._busy_until = None
            self.notifier.status(f"round {rnd} done; waiting for rounds of task {self.task}")

    def _sit_out(self, rnd: int, why: str) -> None:
        """Tell the aggregator at once (telemetry with ``failed``): it counts us as a
        dropout instead of waiting for the deadline. The traceback stays in our log."""
        clock = self._clock(rnd)
        tele = wire.Telemetry(phases=clock.phases, bytes_sent=0, bytes_received=0, peak_rss=clock.peak_rss,
                              num_samples=0, failed=why[:300])
        self.session.send(topics.telemetry(self.id), tele, task=self.task, rnd=rnd)
        self.clocks.pop(rnd, None)

    def _check_fingerprint(self, rnd: int, start: wire.RoundStart) -> None:
        """Every agent of a task trains the same model from the same start; say what differs."""
        mine = self._trainer().fingerprint
        if start.fingerprint is None or start.fingerprint == mine:
            return
        what = "layout (parameter names, shapes or dtypes)" if start.fingerprint[:16] != mine[:16] \
            else "initial weights"
        raise RoundSkipped(f"this agent's workload differs from the task's model in its {what}: task fingerprint "
                           f"{start.fingerprint.hex()[:16]}, mine {mine.hex()[:16]} "
                           f"({self.trainer.n_params} parameters); refusing to train")

    def _memory_allows(self, rnd: int) -> bool:
        """Decline a round that would take the agent over its memory ceiling: better
        one round without this device than the OOM killer mid-upload."""
        limit = self.cfg.memory_limit_mb
        if limit is None:
            return True
        rss = psutil.Process().memory_info().rss
        n = self.trainer.n_params if self.trainer is not None else 0
        # weights, gradients and optimizer state (float32/64), plus the encrypted update
        # (~31 B/param serialized, about twice that while being built)
        need = rss + n * (8 * 4 + 2 * 31)
        if need > limit * 1024 * 1024:
            log.error("%s: declining round %d: it needs about %.0f MB, over the %d MB ceiling", self.id, rnd,
                      need / 1e6, limit)
            return False
        return True

    def _clock(self, rnd: int) -> PhaseClock:
        clock = self.clocks.get(rnd)
        if clock is None:
            s = self.session
            clock = self.clocks[rnd] = PhaseClock(counters=lambda: (s.bytes_sent, s.bytes_received))
        return clock

    def _mask_for(self, start: wire.RoundStart) -> np.ndarray | None:
        """This task's mask, or None while the agreement it depends on is pending."""
        prot = start.protection
        trainer = self._trainer()
        n = trainer.n_params
        mask = masking.full_mask(n, 0.0 if prot.scheme == "quantize" else prot.p)
        if mask is not None:
            return mask
        forced = masking.first_last_layers(trainer.layer_sizes()) if prot.include_first_last else None
        if prot.mode == "random":
            mask = masking.random_mask(n, prot.p, prot.seed, forced)
        else:
            scores = self.sensitivity.get(start.mask_round)
            if scores is None:
                return None
            mask = masking.top_p_mask(scores, prot.p, forced)
        self.masks.setdefault(masking.mask_digest(mask), mask)
        return mask

    def _trainer(self):
        if self.trainer is None:
            try:
                from agent.workload_trainer import WorkloadTrainer  # torch only once there is work
            except (ImportError, OSError) as exc:  # e.g. a CUDA-only torch on a GPU-less Pi
                from fedmq.learning.torch_check import explain

                raise StartRefused(f"cannot train: {explain(str(exc))}") from exc
            self.trainer = WorkloadTrainer(self.cfg)
        return self.trainer

    def _base_weights(self, version: int) -> np.ndarray:
        if version == 0:
            return self._trainer().initial_weights()
        return self.models[version]

    def _participate(self, rnd: int, start: wire.RoundStart) -> None:
        clock = self._clock(rnd)
        trainer = self._trainer()
        base = self._base_weights(start.model_version)
        prot = start.protection
        mask = self._mask_for(start)
        digest = masking.mask_digest(mask) if 0 < mask.sum() < mask.size else None
        if start.mask_digest is not None and digest != start.mask_digest:
            log.error("%s: my mask (digest %s) differs from the task's (%s); not uploading a round-%d update "
                      "that would be rejected", self.id, digest.hex()[:16] if digest else None,
                      start.mask_digest.hex()[:16], rnd)
            return
        with clock.phase("train"):
            weights = trainer.train(base, rnd)
        if time.time() > start.deadline:
            raise RoundSkipped(f"training ran past round {rnd}'s deadline")
        n = trainer.num_samples
        if prot.dp is not None:  # clipped change plus our share of the noise, every update weighted 1
            change, clipped = client_dp.privatize(weights - base, prot.dp, self._rng)
            weights, n = base + change, 1
            self.dp_clipped[rnd] = clipped
        if self.cfg.faults.oracle_dir is not None:
            self._dump_oracle(f"round{rnd}", weights=weights, num_samples=n, mask=mask, base=base)
        secure = self._round_masking(rnd, start) if prot.secure_masking else None
        if prot.scheme != "ckks":
            if self.plan is None:
                raise he.HEError("the task quantizes but the key authority sent no quantization plan")
            with clock.phase("encrypt"):  # quantize, and BFV-encrypt the selected codes
                update, clipped = protection.protect_quantized(
                    self.bfv, self.plan, weights - base, n, mask, trainer.layer_sizes(), self._rng,
                    len(start.selected), digest, secure)
                update = dataclasses.replace(update, fingerprint=trainer.fingerprint)
            self.clipped[rnd] = clipped
            if clipped:
                log.warning("%s: round %d clipped %d of %d values to the plan's ranges",
                            self.id, rnd, clipped, weights.size)
        else:
            with clock.phase("encrypt"):
                update = protection.protect_ckks(self.ctx, weights, n, mask, prot.plain_dtype,
                                                 len(start.selected), digest, secure, self._rng)
                update = dataclasses.replace(update, fingerprint=trainer.fingerprint)
        self._upload(rnd, clock, update)

    def _round_masking(self, rnd: int, start: wire.RoundStart) -> protection.RoundMasking:
        keys = self._keys
        if keys.mask_key is None:
            raise RoundSkipped("the task masks updates but our keys carry no mask key (granted by an older key "
                               "authority): delete keys.bin from the state dir to re-enroll")
        missing = [a for a in start.selected if a not in keys.mask_roster]
        if missing:
            raise RoundSkipped(f"selected agents {missing[:5]} are not in the key authority's roster: their "
                               "masks could not cancel")
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return protection.RoundMasking(
            me=self.id, key=X25519PrivateKey.from_private_bytes(keys.mask_key), roster=dict(keys.mask_roster),
            selected=list(start.selected), task=self.task, round=rnd,
            max_weight=1 if start.protection.dp is not None else keys.policy.max_samples)

    def _send_sensitivity(self, rnd: int, start: wire.RoundStart) -> None:
        """Step 1 of the mask agreement: our sensitivity map, encrypted, weighted by our samples."""
        clock = self._clock(rnd)
        trainer = self._trainer()
        base = self._base_weights(start.model_version)
        with clock.phase("sensitivity"):
            scores = trainer.sensitivity(base, self.cfg.train.sensitivity_samples)
        n = trainer.num_samples
        if self.cfg.faults.oracle_dir is not None:
            self._dump_oracle(f"round{rnd}-sensitivity", scores=scores, num_samples=n)
        with clock.phase("encrypt"):
            update = protection.protect_ckks(self.ctx, scores, n, np.ones(scores.size, dtype=bool), "float32",
                                             len(start.selected), None)
            update = dataclasses.replace(update, fingerprint=trainer.fingerprint)
        self._upload(rnd, clock, update)

    def _upload(self, rnd: int, clock: PhaseClock, update: wire.Update) -> None:
        with clock.phase("serialize"):
            encoded = wire.encode_body(update)
            self.uploads.put(rnd, encoded[1], self.cfg.chunk_size)
        with clock.phase("upload"):
            try:
                sent, _ = self.session.send_stream(
                    self._update_topics(rnd, self._shard_worker(rnd)), None, task=self.task, rnd=rnd,
                    chunk_size=self.cfg.chunk_size, delay_s=self.cfg.faults.chunk_delay_s, encoded=encoded,
                    abort=self._stop)
            except BrokerError as exc:
                # The update is kept: once we are back, the aggregator asks for what it lacks.
                log.warning("%s: round %d upload interrupted (%s); kept for resumption", self.id, rnd, exc)
                return
        self.sent_bytes[rnd] = sent
        log.info("%s: round %d update sent: %d samples, %d/%d values encrypted in %d ciphertexts, %d bytes",
                 self.id, rnd, update.num_samples, update.n_encrypted, update.n_params,
                 len(update.ciphertexts), sent)

    def _shard_worker(self, rnd: int) -> str | None:
        start = self.seen_starts.get(rnd)
        return None if start is None else shards.worker_of(self.id, start.selected, start.shards)

    def _update_topics(self, rnd: int, worker: str | None):
        """Where this round's upload goes: the aggregator's topic, or in a sharded round
        the topic of the worker folding our shard (only it may read there)."""
        if worker is None:
            return lambda seq: topics.update_chunk(self.task, rnd, self.id, seq)
        return lambda seq: topics.shard_update_chunk(self.task, worker, rnd, self.id, seq)

    def _dump_oracle(self, name: str, **arrays) -> None:
        """Test-only: what we protected, in the clear, for checking encrypted aggregates exactly."""
        out = Path(self.cfg.faults.oracle_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"{self.id}-{name}.npz", **arrays)
