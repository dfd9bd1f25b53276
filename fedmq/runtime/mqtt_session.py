"""A small paho-mqtt 2.x session shared by every role.

Why a wrapper: every role needs the same things done the same way — MQTT 3.1.1
(amqtt and RabbitMQ's plugin speak nothing newer), QoS 1, max_inflight set before
connect, a last will, subscriptions restored after a reconnect, and incoming
messages handed to the role's own thread through a queue so that long HE or
training work never blocks paho's network loop (and its keep-alive pings).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.protocol import wire
from fedmq.protocol.chunking import single, split
from fedmq.runtime.config import BrokerEndpoint

log = logging.getLogger(__name__)


class BrokerError(ConnectionError):
    pass


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0


class SpillingInbox:
    """A FIFO of inbound messages that keeps at most ``max_bytes`` of payloads in
    memory; beyond that, payloads wait in files under ``spool_dir``.

    Why: a broker may push a backlog faster than the role can handle it (mosquitto
    2.0 sends all queued messages once acknowledgements start flowing, whatever its
    in-flight limit), and paho's network thread must never block — it also reads the
    PUBACKs the role itself waits for. Spooled messages are still unacknowledged
    (manual ack), so a crash loses none of them: the broker delivers them again.
    """

    def __init__(self, max_bytes: int | None = None, spool_dir: Path | None = None) -> None:
        if max_bytes is not None and spool_dir is None:
            raise ValueError("a spilling inbox needs a spool directory")
        self.max_bytes = max_bytes
        self.spool_dir = spool_dir
        self._q: queue.Queue[tuple[Inbound, Path | None]] = queue.Queue()
        self._in_memory = 0
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.spilled = 0
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for stale in spool_dir.glob("*.msg"):  # a previous run's: unacknowledged, so redelivered
                stale.unlink()

    def put(self, msg: Inbound) -> None:
        with self._lock:
            spill = self.max_bytes is not None and self._in_memory + len(msg.payload) > self.max_bytes
            if not spill:
                self._in_memory += len(msg.payload)
        if spill:
            path = self.spool_dir / f"{next(self._seq):012d}.msg"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msg.payload)
            self.spilled += 1
            self._q.put((dataclasses.replace(msg, payload=b""), path))
        else:
            self._q.put((msg, None))

    def get(self, timeout: float | None = None) -> Inbound:
        msg, path = self._q.get(timeout=timeout)  # raises queue.Empty, like queue.Queue
        if path is None:
            with self._lock:
                self._in_memory -= len(msg.payload)
            return msg
        payload = path.read_bytes()
        path.unlink()
        return dataclasses.replace(msg, payload=payload)

    def qsize(self) -> int:
        return self._q.qsize()


class _JitteredClient(mqtt.Client):
    """paho's client with "full jitter" reconnect back-off: each wait is drawn
    uniformly from [min, current cap], the cap doubling up to ``max_delay``. A
    fleet that lost its broker together then does not reconnect in lock-step
    (paho's own back-off is deterministic). It retries forever, as paho does;
    nothing accumulates per attempt."""

    nodes: list[tuple[str, int]] = []  # a clustered broker's nodes: each reconnect tries the next

    def _reconnect_wait(self) -> None:
        self._wait_backoff()
        if len(self.nodes) > 1:  # fail over: the node we lost may be down for good
            here = (self._host, self._port)
            at = self.nodes.index(here) if here in self.nodes else -1
            self._host, self._port = self.nodes[(at + 1) % len(self.nodes)]
            log.info("reconnecting via broker node %s:%s", self._host, self._port)

    def _wait_backoff(self) -> None:
        with self._reconnect_delay_mutex:
            cap = self._reconnect_min_delay if self._reconnect_delay is None else min(
                self._reconnect_delay * 2, self._reconnect_max_delay)
            self._reconnect_delay = cap
            wait = random.uniform(min(self._reconnect_min_delay, cap), cap)
        target = time.monotonic() + wait
        stopping = (mqtt._ConnectionState.MQTT_CS_DISCONNECTING, mqtt._ConnectionState.MQTT_CS_DISCONNECTED)
        while self._state not in stopping and not self._thread_terminate:
            remaining = target - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, 0.5))


class MqttSession:
    def __init__(self, endpoint: BrokerEndpoint, client_id: str, *,
                 will: tuple[str, bytes] | None = None, manual_ack: bool = False,
                 inbox_max_bytes: int | None = None, spool_dir: Path | None = None,
                 signing_key: Ed25519PrivateKey | None = None) -> None:
        """``manual_ack``: a QoS 1 message is acknowledged only when the role calls
        :meth:`ack` after handling it. The broker then never has more than its
        in-flight window outstanding to us — backpressure instead of an unbounded
        inbox — and a message we die holding is delivered again to our persistent
        session after a restart."""
        self.endpoint = endpoint
        self.client_id = client_id
        self.inbox = SpillingInbox(inbox_max_bytes, spool_dir)
        self.signing_key = signing_key  # signs every stream this session sends (key authority, aggregator)
        self._manual_ack = manual_ack
        self.bytes_sent = 0
        self.bytes_received = 0
        self._subs: dict[str, int] = {}
        self._unacked: list[mqtt.MQTTMessageInfo] = []  # QoS 1 publishes to flush before close
        self._ever_connected = False
        # Called (in paho's thread) after every *re*connection: the broker has published
        # our last will by then, so a role re-announces itself here.
        self.on_reconnect: Callable[[], None] | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._refused: str | None = None
        self._lock = threading.Lock()
        c = _JitteredClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv311, clean_session=not endpoint.persistent_session,
                        manual_ack=manual_ack)
        c.max_inflight_messages_set(endpoint.max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=0.5, max_delay=30)
        if endpoint.username:
            pw = endpoint.password.get_secret_value() if endpoint.password else None
            c.username_pw_set(endpoint.username, pw)
        if endpoint.tls_ca:
            c.tls_set(ca_certs=str(endpoint.tls_ca),
                      certfile=str(endpoint.tls_cert) if endpoint.tls_cert else None,
                      keyfile=str(endpoint.tls_key) if endpoint.tls_key else None)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.nodes = endpoint.nodes
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        ep = self.endpoint
        errors = []
        for host, port in ep.nodes:  # the first node that answers; a down node is skipped
            try:
                self.client.connect(host, port, keepalive=ep.keepalive)
                break
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc}")
        else:
            raise BrokerError(f"cannot reach broker {'; '.join(errors)}") from None
        self.client.loop_start()
        deadline = time.monotonic() + ep.connect_timeout_s
        # Wait for CONNACK *and* the SUBACK of the initial subscriptions, so nothing
        # published right after connect() can race past our own subscriptions.
        while not self._connected.is_set() and self._refused is None and time.monotonic() < deadline:
            self._connected.wait(0.05)  # a refusal (bad password, ACL) ends the wait at once
        if not (self._connected.is_set()
                and self._subscribed.wait(max(deadline - time.monotonic(), 0.01))):
            self.client.loop_stop()
            reason = self._refused or f"no CONNACK/SUBACK within {ep.connect_timeout_s}s"
            raise BrokerError(f"broker {self.client.host}:{self.client.port} refused {self.client_id!r}: {reason}")

    def close(self, flush_s: float = 5.0) -> None:
        """Disconnect after the broker acknowledged what we published (bounded wait),
        so a role's last words — a round's close, an offline status — are not lost."""
        if not self.connected:
            flush_s = 0.0  # the broker is away: waiting would only delay a stop (systemd kills at 30 s)
        deadline = time.monotonic() + flush_s
        for info in self._unacked:
            # Includes publishes made while the broker was away: they go out when paho
            # reconnects, so a round's close is not lost on a broker restart.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                info.wait_for_publish(remaining)
            except (RuntimeError, ValueError):
                pass
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ callbacks (paho thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("broker refused connection: %s", reason_code)
            client.disconnect()
            return
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            _, self._sub_mid = client.subscribe(subs)
        else:
            self._subscribed.set()
        self._connected.set()
        if self._ever_connected and self.on_reconnect is not None:
            log.info("reconnected to the broker")
            self.on_reconnect()
        self._ever_connected = True
        log.debug("connected to %s:%s", client.host, client.port)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("broker refused subscription(s): %s", ", ".join(failed))
        if mid == self._sub_mid:
            self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            log.warning("lost broker connection (%s); paho reconnects with back-off", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.bytes_received += len(msg.payload)
        with self._lock:
            filters = list(self._subs)
        if not any(mqtt.topic_matches_sub(f, msg.topic) for f in filters):
            # amqtt replays retained messages of *other* clients' filters to a new
            # subscriber: not ours, not an attack, not worth a warning.
            log.debug("ignored %s: matches none of our subscriptions", msg.topic)
            if self._manual_ack and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos))

    # ------------------------------------------------------------------ API
    def ack(self, msg: Inbound) -> None:
        """Acknowledge a handled message (sessions made with ``manual_ack``)."""
        if msg.qos > 0 and self._manual_ack:
            self.client.ack(msg.mid, msg.qos)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = qos
        if self.connected:
            result, _ = self.client.subscribe(topic, qos)
            if result != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerError(f"subscribe {topic!r} failed: {mqtt.error_string(result)}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            # paho keeps it and sends it after the reconnect; say so, so that waiting
            # for its PUBACK waits for that instead of failing at once.
            info.rc = mqtt.MQTT_ERR_SUCCESS
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        self.bytes_sent += len(payload)
        if qos > 0:
            if len(self._unacked) > 256:
                self._unacked = [i for i in self._unacked if not i.is_published()]
            self._unacked.append(info)
        return info

    def send(self, topic: str, msg: object, *, task: str, rnd: int, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish a one-chunk message body in an envelope."""
        env = single(msg, task=task, rnd=rnd, sender=self.client_id, signing_key=self.signing_key)
        return self.publish(topic, wire.encode_envelope(env), retain=retain)

    def send_stream(self, topic_of, msg: object, *, task: str, rnd: int, chunk_size: int,
                    retain: bool = False, delay_s: float = 0.0, timeout_s: float = 300.0,
                    encoded: tuple[str, bytes] | None = None, only: set[int] | None = None,
                    abort: threading.Event | None = None) -> tuple[int, int]:
        """Publish a (possibly large) body as chunks on ``topic_of(seq)`` and wait for
        the broker's PUBACKs; returns (bytes published, number of chunks). Raises BrokerError if the
        broker does not acknowledge (e.g. it dropped us for an oversize packet).
        ``encoded`` passes a body already serialized by ``wire.encode_body``; ``only``
        restricts publishing to those chunk numbers (a resumed upload); ``abort`` (the
        role's stop event) ends the wait for acknowledgements at once with BrokerError —
        SIGTERM must not wait for a broker that is down."""
        kind, body = encoded or wire.encode_body(msg)
        sent, infos = 0, []
        for env in split(kind, task, rnd, self.client_id, body, chunk_size, self.signing_key):
            if only is not None and env.seq not in only:
                continue
            payload = wire.encode_envelope(env)
            infos.append(self.publish(topic_of(env.seq), payload, retain=retain))
            sent += len(payload)
            if delay_s:
                time.sleep(delay_s)
            if abort is not None and abort.is_set():
                raise BrokerError("stopped while publishing")
        deadline = time.monotonic() + timeout_s
        for info in infos:
            try:
                while not info.is_published() and time.monotonic() < deadline:
                    if abort is not None and abort.is_set():
                        raise BrokerError("stopped while waiting for the broker's acknowledgements")
                    info.wait_for_publish(min(0.2, max(deadline - time.monotonic(), 0.01)))
            except (RuntimeError, ValueError) as exc:
                raise BrokerError(f"chunk not accepted by the broker: {exc}") from None
            if not info.is_published():
                raise BrokerError(f"broker did not acknowledge chunk {info.mid} within {timeout_s}s "
                                  "(is the chunk larger than the broker's max packet size?)")
        return sent, len(infos)

    def delete_retained(self, topic: str, timeout_s: float = 10.0) -> None:
        """Clear a retained message, confirmed by the broker (so it holds across our exit)."""
        self.publish(topic, b"", retain=True).wait_for_publish(timeout_s)
