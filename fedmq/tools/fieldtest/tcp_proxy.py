"""A TCP proxy between one agent and the broker, to cut the agent's network on cue.

Modes, switchable at any time from another thread:

- ``pass``: bytes flow both ways.
- ``drop``: every connection is reset and new ones are reset on accept — a lost
  Wi-Fi association; the client notices at once and reconnects with back-off.
- ``blackhole``: connections stay up but nothing is forwarded (reads stop, so the
  kernel buffers fill and the sender stalls) — a silent partition; whether it
  becomes a disconnect depends on keep-alive, as on a real link.
- ``delay``: every read is forwarded ``delay_s`` late — a slow, high-latency link.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Literal

log = logging.getLogger("fedmq.tools.fieldtest.proxy")
Mode = Literal["pass", "drop", "blackhole", "delay"]


class TcpProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", name: str = "proxy") -> None:
        self.target = (target_host, target_port)
        self.name = name
        self.port = 0
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.connections = 0  # accepted so far (a reconnect shows up here)
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-loop", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_mode(self, mode: Mode, delay_s: float = 0.0) -> None:
        def apply() -> None:
            self.mode, self.delay_s = mode, delay_s
            if mode == "drop":
                for w in list(self._writers):
                    w.transport.abort()  # RST, like a vanished route
        self._loop.call_soon_threadsafe(apply)
        log.info("%s: %s%s", self.name, mode, f" {delay_s:.2f}s" if mode == "delay" else "")

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "drop":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # broker down: the client sees a refused/reset connection
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode == "blackhole":
                    await asyncio.sleep(0.05)
                if self.mode == "drop":
                    break
                if self.mode == "delay" and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()  # one side gone: the other goes too, as through a real path
