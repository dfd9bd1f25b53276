"""Results and model versions: the encrypted result of a round is checked against
the round it claims, decrypted and adopted as the new global model; kept uploads
are settled and resend requests answered; telemetry reports the round's costs."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import numpy as np

from agent import model_files
from fedmq.privacy import protection
from fedmq.protocol import topics, wire
from fedmq.runtime.mqtt_session import BrokerError
from fedmq.runtime.telemetry import PhaseClock

log = logging.getLogger("fedmq.agent")


class Results:
    """What the agent does with what the aggregator sends back."""

    def _on_result_chunk(self, env: wire.Envelope) -> None:
        if env.round <= self.latest_version or env.round in self.sensitivity:
            return
        self._clock(env.round).begin("download")  # from the first result chunk to the last
        done = self.chunks.add(env)
        if done is None:
            return
        self._clock(env.round).end("download")
        result: wire.Result = wire.decode_body(done.kind, done.body)
        if env.round not in self.seen_starts:
            # Only a round we saw start can have a result; its start may still be on its way.
            log.info("%s: holding the round-%d result until that round's start arrives", self.id, env.round)
            self._early_results[env.round] = (env, result, len(done.body))
            for old in sorted(self._early_results)[:-2]:
                del self._early_results[old]
            return
        self._on_result(env, result, len(done.body))

    def _check_result(self, rnd: int, result: wire.Result) -> None:
        """A result must fit the round it claims: same purpose, the scheme and base
        model the round started with (WireError otherwise)."""
        start = self.seen_starts[rnd]
        if result.purpose != start.purpose:
            raise wire.WireError(f"round {rnd} started as {start.purpose!r}, its result says {result.purpose!r}")
        scheme = start.protection.scheme if start.purpose == "train" else "ckks"
        if result.scheme != scheme:
            raise wire.WireError(f"round {rnd} uses scheme {scheme!r}, its result says {result.scheme!r}")
        if result.base_version != start.model_version:
            raise wire.WireError(f"round {rnd} trained from model {start.model_version}, its result says "
                                 f"{result.base_version}")
        if result.purpose == "train" and result.n_params != self._trainer().n_params:
            raise wire.WireError(f"round {rnd}'s model has {result.n_params} parameters, this agent's workload "
                                 f"{self._trainer().n_params}: not adopted (another workload than the task's)")
        if result.scheme != "ckks" and result.base_version != 0 and result.base_version not in self.models:
            raise wire.WireError(f"round {rnd}'s quantized result adds to model version {result.base_version}, "
                                 "which this agent does not hold (it missed that round); skipping it")

    def _on_result(self, env: wire.Envelope, result: wire.Result, received: int) -> None:
        rnd = env.round
        if rnd <= self.latest_version or rnd in self.sensitivity:
            return
        self._check_result(rnd, result)
        clock = self._clock(rnd)
        trainer = self._trainer()
        metrics: dict[str, float] = {}
        mask = self._mask_of_result(result)
        with clock.phase("decrypt"):
            if result.scheme != "ckks":
                weights = protection.rebuild_quantized(self.bfv, self.plan, result, mask, trainer.layer_sizes(),
                                                       self._base_weights(result.base_version))
            else:
                weights = protection.rebuild_ckks(self.ctx, result, mask)
        if not np.isfinite(weights).all():
            raise wire.WireError(f"round {rnd}'s result decrypts to NaN or infinity; not adopted")
        if result.purpose == "sensitivity":
            self.sensitivity[rnd] = weights
            log.info("%s: aggregated sensitivity map of round %d decrypted (%d agents)",
                     self.id, rnd, len(result.participants))
        else:
            with clock.phase("evaluate"):
                try:
                    metrics = trainer.evaluate(weights)
                except Exception as exc:  # the model is adopted all the same; the metrics are lost
                    log.exception("%s: the workload's evaluate failed on round %d's model: %s", self.id, rnd, exc)
            self._adopt(rnd, weights, metrics, result)
        self._publish_telemetry(rnd, clock, metrics, received)
        self._settle_upload(rnd, result.participants, "aggregated", f"{len(result.participants)} agents made it")
        self.uploads.drop_before(rnd)
        for old in [r for r in self.clocks if r < rnd]:
            self.clocks.pop(old).close()
        self.chunks.discard(keep=lambda key: key[0] != "result" or key[1] >= rnd)
        if self.parked and self._ready_for(self.parked[1]):
            prnd, start = self.parked
            self.parked = None
            self._run_round(prnd, start)

    def _adopt(self, rnd: int, weights: np.ndarray, metrics: dict[str, float], result: wire.Result) -> None:
        self.models = {rnd: weights}
        self.latest_version = rnd
        model_files.save(Path(self.cfg.state_dir), rnd, weights, self.trainer, metrics,
                         keep_checkpoints=self.cfg.checkpoints)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no metrics"
        log.info("%s: round %d result from %d agents decrypted; test accuracy %s (%s)", self.id, rnd,
                 len(result.participants), f"{metrics['accuracy']:.4f}" if "accuracy" in metrics else "n/a", shown)

    def _on_round_closed(self, env: wire.Envelope) -> None:
        """A round closed without our update (we were late, or it was aborted): say so
        and let the kept upload go — it contributes to nothing."""
        closed: wire.RoundClosed = wire.decode_body(env.kind, env.body)
        self._settle_upload(env.round, closed.participants, closed.status, closed.reason)

    def _settle_upload(self, rnd: int, participants: list[str], status: str, reason: str) -> None:
        """The round is over: forget the kept upload, and say so if it did not count."""
        if self.uploads.drop(rnd) and self.id not in participants:
            log.warning("%s: round %d %s without my update (%s); it contributes nothing", self.id, rnd, status,
                        reason)

    def _on_resend(self, env: wire.Envelope) -> None:
        req: wire.ResendRequest = wire.decode_body(env.kind, env.body)
        kept = self.uploads.get(env.round)
        if kept is None:
            log.info("%s: aggregator asks for round %d chunks, but no upload of that round is kept", self.id,
                     env.round)
            return
        encoded, chunk_size = kept
        only = req.chunks() or None
        try:
            sent, chunks = self.session.send_stream(
                self._update_topics(env.round, env.sender if env.sender in self._keys.policy.worker_keys else None),
                None, task=self.task,
                rnd=env.round, chunk_size=chunk_size, encoded=encoded, only=only, abort=self._stop)
        except BrokerError as exc:
            log.warning("%s: resending round %d interrupted (%s); still kept", self.id, env.round, exc)
            return
        log.info("%s: resent %d chunk(s) (%d bytes) of round %d at the aggregator's request", self.id, chunks, sent,
                 env.round)

    def _mask_of_result(self, result: wire.Result) -> np.ndarray:
        if result.n_encrypted in (0, result.n_params):
            return np.full(result.n_params, result.n_encrypted == result.n_params)
        mask = self.masks.get(result.mask_digest or b"")
        if mask is None:
            raise wire.WireError("result was split by a mask this agent cannot derive")
        return mask

    def _publish_telemetry(self, rnd: int, clock: PhaseClock, metrics: dict[str, float], received: int) -> None:
        peak = max(clock.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        trainer = self._trainer()
        accuracy = metrics.get("accuracy")
        reported = {**{f"train_{k}" if not k.startswith("train") else k: v for k, v in trainer.train_metrics.items()},
                    **metrics}
        tele = wire.Telemetry(phases=clock.phases, bytes_sent=self.sent_bytes.pop(rnd, 0), bytes_received=received,
                              peak_rss=peak, num_samples=trainer.num_samples,
                              accuracy=accuracy if accuracy is not None and 0 <= accuracy <= 1 else None,
                              clipped=self.clipped.pop(rnd, 0), metrics=dict(list(reported.items())[:32]))
        self.session.send(topics.telemetry(self.id), tele, task=self.task, rnd=rnd)
        self.clocks.pop(rnd, None)
