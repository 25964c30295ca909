"""The replica's metrics port, served on the replica's event loop.

prometheus_client's start_http_server starts a thread per connection and never times one out. RLIMIT_NPROC
counts every uid-10001 task on the host (components/containers.py), so about 4,100 idle connections from
anything on the stage network left no container of any stage on that host able to start a thread or run a
health check. Here a connection costs a file descriptor, never a thread, and idle ones cannot pile up: one
that has not sent its request within REQUEST_TIMEOUT_S is closed, and past MAX_WAITING the connection that
has waited longest is closed to admit the newcomer. Prometheus sends its request as soon as it connects, so
it is never the one waiting longest. (The gateway's images/gateway/metrics.py serves the same way: each
image builds from its own folder only.)
"""
from __future__ import annotations

import asyncio
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

REQUEST_TIMEOUT_S = 10.0
MAX_WAITING = 64
MAX_HEAD_BYTES = 8 * 1024


class MetricsServer:
    """Answers `GET /metrics` with `exposition()`, one request per connection."""

    def __init__(self, exposition: Callable[[], bytes]) -> None:
        self.exposition = exposition
        # Connections that have not sent a whole request head yet, oldest first (dicts keep insertion order).
        self.waiting: dict[asyncio.StreamWriter, None] = {}

    async def start(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.answer, "0.0.0.0", port, limit=MAX_HEAD_BYTES)

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.waiting[writer] = None
        if len(self.waiting) > MAX_WAITING:
            longest = next(iter(self.waiting))
            self.waiting.pop(longest)
            longest.transport.abort()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
            return
        finally:
            self.waiting.pop(writer, None)
        method, path, *_ = head.decode("latin-1").split(" ", 2) + ["", ""]
        if method != "GET":
            status, body = "405 Method Not Allowed", b"metrics take GET\n"
        elif path.split("?", 1)[0] != "/metrics":
            status, body = "404 Not Found", b"only /metrics is served here\n"
        else:
            status, body = "200 OK", self.exposition()
        content_type = CONTENT_TYPE_LATEST if status.startswith("200") else "text/plain"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        try:
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        writer.close()
