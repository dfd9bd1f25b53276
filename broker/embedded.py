"""The embedded broker: amqtt, in-process, on loopback by default.

It exists so that ``fedmq demo`` and the default tests need nothing installed.
Anonymous access is allowed because it binds to loopback; for anything that
leaves the machine use mosquitto with passwords, ACLs and TLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from fedmq.runtime.config import BrokerServerConfig

log = logging.getLogger(__name__)


def amqtt_config(cfg: BrokerServerConfig) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{cfg.host}:{cfg.port}",
                                  "max_connections": cfg.max_connections}},
        "timeout_disconnect_delay": 0,
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(cfg: BrokerServerConfig, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    from amqtt.broker import Broker

    broker = Broker(amqtt_config(cfg))
    await broker.start()
    log.info("embedded MQTT broker listening on %s:%s", cfg.host, cfg.port)
    if ready is not None:
        ready.set()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread
            pass
    await stop.wait()
    await broker.shutdown()
    log.info("embedded broker stopped")


class PortBusy(RuntimeError):
    """Another process listens on the configured port."""


class _ProbeNoise(logging.Filter):
    """A client that connects and closes without a packet (a port probe, a health
    check, ``wait_for_port``) is not an error worth a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No data to decode MQTT packet fixed header" not in record.getMessage()


def check_port_free(cfg: BrokerServerConfig) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise PortBusy(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}. Another broker (mosquitto? "
                           f"a running `fedmq broker`?) holds it: stop it, or pass --port with a free port") from None


def run(cfg: BrokerServerConfig) -> int:
    # amqtt logs every packet at INFO; keep the operator's log readable.
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("amqtt", "amqtt.broker", "amqtt.mqtt.protocol.handler", "amqtt.mqtt.protocol.broker_handler"):
        logging.getLogger(name).addFilter(_ProbeNoise())
    for handler in logging.getLogger().handlers:  # filters on a logger do not apply to its children's records
        handler.addFilter(_ProbeNoise())
    try:
        check_port_free(cfg)
    except PortBusy as exc:
        log.error("%s", exc)
        return 2
    asyncio.run(serve(cfg))
    return 0
