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


def run(cfg: BrokerServerConfig) -> None:
    # amqtt logs every packet at INFO; keep the operator's log readable.
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    asyncio.run(serve(cfg))
