"""The aggregator daemon: publishes rounds, folds verified encrypted updates into a
running ciphertext sum as they complete, and publishes the encrypted result.

It loads the task's *public* CKKS context (parameters only): it can add
ciphertexts, and cannot decrypt a single one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path


from fedmq.privacy import exposure, signing, he
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import Completed, Reassembler
from fedmq.runtime.config import AggregatorConfig
from fedmq.runtime.mqtt_session import MqttSession
from fedmq.runtime.private_files import write_private
from fedmq.privacy.aggregation import RoundSum
from fedmq.runtime.signals import stop_event
from fedmq.runtime.telemetry_db import TelemetryDB

from aggregator.round_state import Decision, Outcome, Rejected, RoundState
from aggregator.folding import Folding, layout_from_json
from aggregator.intake import Intake
from aggregator.lifecycle import RoundLifecycle
from aggregator.metrics import Metrics
from aggregator.partial_sums import PartialSums
from aggregator.round_store import RoundStore, StoredParts
from aggregator.unmasking import Unmasking

log = logging.getLogger("fedmq.aggregator")
MAX_CONTEXT_CHUNKS = 64  # of the key authority's chunk size: 16 MiB at 256 KiB
MIN_CHUNK_BYTES = 1024  # an agent's smallest chunk_size


class StartError(RuntimeError):
    """A deployment the aggregator cannot run in; the text says what to change."""


class Aggregator(Intake, Folding, PartialSums, Unmasking, RoundLifecycle):
    """The daemon: state, persistence, restore after a restart and the main loop;
    intake, folding and the round lifecycle live in their own modules."""

    _own_shard: str | None = None  # a shard worker's id: the update topics it folds

    def __init__(self, cfg: AggregatorConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.task = cfg.task
        # Everything we publish is signed; agents learn our public key from the sealed policy.
        self.signing_key = signing.load_or_create(cfg.signing_key or Path(cfg.state_dir) / "signing.key")
        self.authority_key = b""  # the key authority's public key (resolved in run)
        self.policy: wire.Policy | None = None  # the task's rules, from the signed public context
        # Inbound payloads beyond inbox_max_bytes wait on disk: a backlog of fifty
        # uploads must not become fifty uploads in memory.
        self.session = MqttSession(cfg.broker, cfg.aggregator_id, manual_ack=True,
                                   inbox_max_bytes=cfg.inbox_max_bytes, spool_dir=Path(cfg.state_dir) / "spool",
                                   signing_key=self.signing_key)
        self._context_chunks = Reassembler(max_stream_bytes=cfg.max_update_bytes)
        self._correction_chunks = Reassembler(max_stream_bytes=cfg.max_update_bytes)
        self._correction = None  # the key authority's answer to the open round's mask request
        self.dp_rounds = 0  # aggregated training rounds: what the DP accountant charges
        self.ctx = None
        self.bfv_ctx = None
        self.max_summands = 0  # the quantization plan's bound on agents per sum (0: none)
        self.online: set[str] = set()
        self.gone: set[str] = set()  # seen online once, now offline: not worth waiting for
        self.state: RoundState | None = None
        self.sum: RoundSum | None = None  # the open round's running sum
        self._agreed_key: tuple | None = None  # the open round's layout, once a quorum of updates agreed on it
        self._held: dict[tuple, list] = {}  # layout -> completed updates waiting for a quorum to agree
        self.protection = cfg.protection or wire.Protection()  # replaced by the policy's
        self.max_samples = 1_000_000  # per update; the policy's bound once it arrives
        self._saved: dict = {}
        self.mask_round = 0  # the sensitivity round whose sum defines the task's mask
        self.mask_digest: bytes | None = None
        self.fingerprint: bytes | None = None  # the task's model, once a quorum of updates agreed on it
        self.bytes_received = 0
        self.agg_s = 0.0
        self._worker_agg_s = 0.0  # sharded rounds: the slowest shard's fold time
        self._partials_done: set[str] = set()  # sharded rounds: workers whose partial sum is combined
        self._plan_round, self._plan = -1, {}  # sharded rounds: the open round's worker -> agents
        self.n_params: int | None = None
        self.model_version = 0
        self.next_round = 1
        self.rounds_done = 0  # training rounds closed (aggregated or aborted)
        self._quorum_online_since: float | None = None
        self._retained: dict[int, int] = {}  # round -> result chunks this process left retained
        self._state_file = Path(cfg.state_dir) / "aggregator_state.json"
        self.store = RoundStore(Path(cfg.state_dir))
        self.telemetry = TelemetryDB(Path(cfg.state_dir) / "telemetry.sqlite")
        self.metrics = Metrics(cfg.metrics_port, cfg.metrics_host)
        self._inbound_bytes = 0
        self._parked_bytes = 0  # update chunks parked on disk while waiting for the public context
        self._telemetry_seen: set[tuple[int, str]] = set()
        self._last_participants: tuple[int, list[str]] | None = None
        self._round_opened = time.monotonic()
        # Completed uploads are not joined in memory: they are read back from disk (update_stream.py).
        self.chunks = Reassembler(max_stream_bytes=cfg.max_update_bytes, parts=StoredParts(self.store),
                                  assemble=False, min_chunk=MIN_CHUNK_BYTES)
        self._restore()

    # ------------------------------------------------------------------ persistence
    def _restore(self) -> None:
        if self._state_file.exists():
            saved = json.loads(self._state_file.read_text())
            self.next_round, self.model_version = saved["next_round"], saved["model_version"]
            self.n_params = saved.get("n_params")
            self.rounds_done = saved.get("rounds_done", 0)
            self.dp_rounds = saved.get("dp_rounds", 0)
            self.fingerprint = bytes.fromhex(saved["fingerprint"]) if saved.get("fingerprint") else None
            self._saved = saved
            self._restore_mask()
            log.info("resuming at round %d (model version %d)", self.next_round, self.model_version)

    def _restore_mask(self) -> None:
        """The agreed mask outlives a restart only under the same protection."""
        saved = self._saved
        if saved.get("protection") == _protection_key(self.protection):
            self.mask_round = saved.get("mask_round", 0)
            digest = saved.get("mask_digest")
            self.mask_digest = bytes.fromhex(digest) if digest else None
        else:
            self.mask_round, self.mask_digest = 0, None

    def apply_policy(self, policy: wire.Policy) -> None:
        """Follow the key authority's signed policy; a config that contradicts it is
        a deployment error, not something to guess around (StartError)."""
        where = f" ({self.config_path})" if self.config_path else ""
        ours = signing.public_bytes(self.signing_key)
        if self._own_shard is not None and policy.worker_keys.get(self._own_shard) != ours:
            raise StartError(f"the key authority's policy does not name shard worker {self._own_shard} with our key"
                             f"{where}: set its worker_keys.{self._own_shard} to {ours.hex()}")
        if self._own_shard is None and policy.aggregator_key != ours:
            raise StartError(f"the key authority's policy names another aggregator key than ours{where}: set its "
                             f"aggregator_key to {ours.hex()}")
        unknown = sorted(set(self.cfg.shard_workers) - policy.worker_keys.keys())
        if unknown:
            raise StartError(f"shard_workers{where} names {unknown} that the key authority's policy does not list "
                             "(worker_keys): agents would refuse every round")
        if self.cfg.protection is not None and self.cfg.protection != policy.protection:
            raise StartError(f"protection{where} differs from the key authority's policy ({policy.protection}); "
                             "remove it from the aggregator config or make the two agree")
        if self.cfg.min_agents < policy.min_agents and self._own_shard is None:
            raise StartError(f"min_agents{where} is {self.cfg.min_agents}, below the policy's {policy.min_agents}: "
                             "agents would refuse every round")
        self.policy, self.protection, self.max_samples = policy, policy.protection, policy.max_samples
        exposure.log_start_warning(log, policy.protection)
        self._restore_mask()

    def _persist(self) -> None:
        write_private(self._state_file, json.dumps({
            "next_round": self.next_round, "model_version": self.model_version, "n_params": self.n_params,
            "rounds_done": self.rounds_done, "dp_rounds": self.dp_rounds,
            "protection": _protection_key(self.protection), "mask_round": self.mask_round,
            "mask_digest": self.mask_digest.hex() if self.mask_digest else None,
            "fingerprint": self.fingerprint.hex() if self.fingerprint else None,
        }).encode())

    # ------------------------------------------------------------------ main loop
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        if self.cfg.rounds and self.rounds_done >= self.cfg.rounds:
            log.warning("task %s already ran its %d training round(s) (state in %s); nothing to do. To go on, raise "
                        "`rounds` in the config; to start over, give the task a new name (agents keep their model "
                        "versions, so a fresh aggregator on the old task would wait for nothing)", self.task,
                        self.rounds_done, self.cfg.state_dir)
            return
        self._connect_and_load(stop)
        resumed = self._resume()
        self._roll_call()
        while not stop.is_set() and (self.cfg.rounds == 0 or self.rounds_done < self.cfg.rounds):
            if resumed:
                resumed = False
                if self._recorded_survivors(self.state.round) is not None:  # died while unmasking: same set
                    self._close_round(Decision(Outcome.AGGREGATE, "closed before a restart; unmasking resumed"),
                                      stop)
                    continue
                self._pump(stop, until=self._closable)
                if stop.is_set():
                    break
                self._close_round(self.state.decide(time.time()), stop)
                continue
            if not self._dp_budget_left():
                break
            self._quorum_online_since = None
            if not self._pump(stop, until=self._enough_online, timeout=self.cfg.wait_for_agents_s):
                log.warning("only %d agent(s) online, need %d; still waiting", len(self.online), self.cfg.min_agents)
                self._roll_call()
                continue
            purpose = "sensitivity" if self._needs_mask_agreement() else "train"
            self._open_round(purpose)
            self._pump(stop, until=self._closable)
            if stop.is_set():
                break
            self._close_round(self.state.decide(time.time()), stop)
        if not stop.is_set() and self._last_participants:
            # The agents report a round's costs after decrypting its result: give the
            # last round's telemetry a moment to arrive before we go.
            rnd, people = self._last_participants
            self._pump(stop, until=lambda: all((rnd, a) in self._telemetry_seen for a in people),
                       timeout=self.cfg.telemetry_linger_s)
        self.telemetry.close()
        log.info("aggregator done after %d training round(s)", self.rounds_done)


    def _subscriptions(self) -> list[str]:
        inbound = topics.all_partials(self.task) if self.cfg.shard_workers else topics.all_updates(self.task)
        return [topics.ALL_STATUS, inbound, topics.ALL_TELEMETRY, topics.all_mask_corrections(self.task)]

    def _connect_and_load(self, stop: threading.Event) -> None:
        """Connect, subscribe, and wait for the key authority's signed public context."""
        try:
            self.authority_key = signing.configured_public(
                self.cfg.authority_key, "authority_key", self.config_path,
                "the aggregator takes the public context and policy only with the key authority's signature",
                "keyauthority")
        except ValueError as exc:
            raise StartError(str(exc)) from None
        for filt in self._subscriptions():
            self.session.subscribe(filt)
        # The public context's chunks one exact topic each, not by wildcard: RabbitMQ's
        # MQTT plugin delivers retained messages to exact-topic subscriptions only.
        for seq in range(MAX_CONTEXT_CHUNKS):
            self.session.subscribe(topics.public_context(self.task, seq))
        self.session.connect()
        log.info("waiting for the public context of task %s", self.task)
        self._pump(stop, until=lambda: self.ctx is not None, park_updates=True)

    def _resume(self) -> bool:
        """Pick up the round that was open when this process died (``kill -9``): its
        state, its running sum, and the chunks of unfinished uploads. Agents that had
        finished are not asked again; the others are asked for what is missing."""
        saved = self.store.load()
        if saved is None:
            return False
        st, layout, blob = saved
        if st.round < self.next_round:  # it closed; we died before forgetting it
            self.store.close()
            return False
        self.state = st
        self._held, self._agreed_key = {}, layout_from_json(layout["agreed"]) if layout.get("agreed") else None
        quantized = self.protection.scheme != "ckks" and st.purpose == "train"
        self.sum = self._stored_sum(blob) if blob else \
            RoundSum(quantized=quantized, ckks=self.ctx, bfv=self.bfv_ctx)
        self.bytes_received, self.agg_s, self._worker_agg_s = 0, 0.0, 0.0
        self._partials_done = set(layout.get("partials", []))
        restored = 0
        complete: list[Completed] = []
        for env in self.store.chunk_envelopes():
            if env.round != st.round:
                continue  # parked while we were down, but for a round that is over
            try:
                done = self.chunks.add(env, stored=True)
                restored += 1
            except wire.WireError:
                continue
            if done is not None:  # every chunk had arrived; we died before folding it
                complete.append(done)
        while complete:
            sender, rnd = complete[0].sender, complete[0].round
            try:
                self._fold(complete.pop(0))
            except (ValueError, Rejected, he.HEError) as exc:
                log.warning("rejected %s's restored round-%d update: %s", sender, rnd, exc)
        log.info("resumed round %d after a restart: %d update(s) already folded %s, %d chunk(s) of unfinished "
                 "uploads restored", st.round, len(st.weights), sorted(st.weights), restored)
        if not self.cfg.shard_workers:  # the root of a sharded round has no uploads to ask for
            for agent in sorted(st.selected - st.weights.keys()):
                self._ask_for_missing(agent)
        return True


def _protection_key(prot: wire.Protection) -> list:
    return [prot.scheme, prot.p, prot.mode, prot.include_first_last, prot.seed, prot.plain_dtype]


def run(cfg: AggregatorConfig, config_path: Path | None = None, role: type[Aggregator] = Aggregator) -> int:
    """Run ``role`` (the aggregator, or aggregator.shard_worker.ShardWorker) until stopped."""
    stop = stop_event()
    agg = role(cfg, config_path)
    try:
        agg.run(stop)
    except StartError as exc:
        log.error("refusing to run: %s", exc)
        return 2
    finally:
        agg.session.close()
    return 0
