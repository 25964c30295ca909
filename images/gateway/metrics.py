"""Prometheus metrics of the gateway, from nginx's own access log (nginx 1.22 has no metrics module).

nginx sends one JSON line per proxied request over syslog (UDP on loopback, so nothing touches the
read-only disk and a slow exporter never holds a request up); this module counts them by model, slot (the
pool nginx chose) and status, times them in a histogram, and serves the text format on METRICS_PORT, which the
gateway publishes nowhere and routes nothing to: Prometheus reaches it on the stage network.

The lines are read by a thread of their own, in gulps: the first line of a gulp wakes it, it lets the lines that
follow gather for GATHER_S, then takes every one waiting without blocking. Per proxied request an event loop's
callbacks per datagram cost about 60 µs of the CPU the gateway shares with a replica, a thread woken per
datagram about 25 (two context switches each), a gulp under 10 (BENCHMARKS.md, the gateway hop); a count reaches
the exposition at most GATHER_S late. Scrapes are served on one event loop in another thread. A thread per
scrape connection, with no timeout, let about 4,100 idle connections use up RLIMIT_NPROC, which counts every
uid-10001 task on the host (components/containers.py): no container of any stage there could then start a thread
or run a health check. Here a connection costs a file descriptor, never a thread, and idle ones cannot pile up:
one that has not sent its request within REQUEST_TIMEOUT_S is closed, and past MAX_WAITING the connection that
has waited longest is closed to admit the newcomer. Prometheus sends its request as soon as it connects, so it
is never the one waiting longest. (The replicas' serving/metrics_server.py serves the same way: each image
builds from its own folder only.)
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from bisect import bisect_left

log = logging.getLogger("gateway.metrics")

SYSLOG_ADDRESS = ("127.0.0.1", 5140)
METRICS_PORT = 9102
BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
REQUESTS = "mlops_gateway_requests_total"
DURATION = "mlops_gateway_request_duration_seconds"
REQUEST_TIMEOUT_S = 10.0
MAX_WAITING = 64
MAX_HEAD_BYTES = 8 * 1024
# nginx sends a syslog message of at most 2 KiB (NGX_SYSLOG_MAX_STR); the lines here are far shorter.
MAX_LINE_BYTES = 4096
# What a gulp may hold: a loopback datagram of one line takes 832 bytes of the receive buffer, which the kernel
# caps at twice net.core.rmem_max (208 KiB by default): 512 lines, 25,000 requests/s at this gather time, nearly
# four times what nginx proxies within the gateway's 0.5 CPU at about 77 µs a request (BENCHMARKS.md, figure 8).
GATHER_S = 0.02


class GatewayMetrics:
    """Counts from the syslog datagrams nginx sends; the reading thread records, the scrape thread exports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        # Per model and slot: a count per bucket (the last one is +Inf), the sum and the count.
        self.durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def record(self, line: str) -> None:
        """Count one access-log line: a syslog header, then
        `{"model": ..., "slot": ..., "status": ..., "seconds": ...}`. nginx logs only the models it serves
        (gateway.py), so the series stay as few as the stage's models."""
        try:
            entry = json.loads(line[line.index("{"):])
            model, slot = str(entry["model"]), str(entry["slot"])
            status, seconds = str(entry["status"]), float(entry["seconds"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable access-log line %r", line[:200])
            return
        bucket = bisect_left(BUCKETS, seconds)
        with self.lock:
            self.requests[(model, slot, status)] = self.requests.get((model, slot, status), 0) + 1
            buckets, total = self.durations.setdefault((model, slot), ([0] * (len(BUCKETS) + 1), [0.0]))
            buckets[bucket] += 1
            total[0] += seconds

    def exposition(self) -> str:
        with self.lock:
            requests = sorted(self.requests.items())
            durations = sorted((key, (list(buckets), total[0])) for key, (buckets, total) in self.durations.items())
        lines = [f"# HELP {REQUESTS} Requests the gateway proxied, by model, slot and HTTP status",
                 f"# TYPE {REQUESTS} counter"]
        for (model, slot, status), count in requests:
            lines.append(f'{REQUESTS}{{model="{model}",slot="{slot}",code="{status}"}} {count}')
        lines += [f"# HELP {DURATION} Time from the client's request to the gateway's response, by model and slot",
                  f"# TYPE {DURATION} histogram"]
        for (model, slot), (buckets, seconds) in durations:
            labels = f'model="{model}",slot="{slot}"'
            cumulative = 0
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), buckets):
                cumulative += count
                lines.append(f'{DURATION}_bucket{{{labels},le="{bound}"}} {cumulative}')
            lines += [f'{DURATION}_sum{{{labels}}} {seconds}', f'{DURATION}_count{{{labels}}} {cumulative}']
        return "\n".join(lines) + "\n"


def read_access_log(metrics: GatewayMetrics, log_lines: socket.socket) -> None:
    while True:
        metrics.record(log_lines.recv(MAX_LINE_BYTES).decode(errors="replace"))
        time.sleep(GATHER_S)
        while True:
            try:
                line = log_lines.recv(MAX_LINE_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            metrics.record(line.decode(errors="replace"))


class ScrapeServer:
    """Answers `GET /metrics` with the metrics' exposition, one request per connection."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        # Connections that have not sent a whole request head yet, oldest first (dicts keep insertion order).
        self.waiting: dict[asyncio.StreamWriter, None] = {}

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
            status, body = "200 OK", self.metrics.exposition().encode()
        content_type = "text/plain; version=0.0.4" if status.startswith("200") else "text/plain"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        try:
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        writer.close()


async def listen(metrics: GatewayMetrics, scrapes: socket.socket) -> None:
    server = await asyncio.start_server(ScrapeServer(metrics).answer, sock=scrapes, limit=MAX_HEAD_BYTES)
    await server.serve_forever()


def serve(metrics: GatewayMetrics, port: int = METRICS_PORT, syslog: tuple[str, int] = SYSLOG_ADDRESS) -> None:
    """Read nginx's log lines on one daemon thread and answer scrapes on another. The ports are bound here, so a
    port taken fails the gateway's start rather than leave it without metrics."""
    log_lines = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A gulp's lines wait in the receive buffer (GATHER_S): ask for more than the default cap, which keeps it.
    log_lines.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    log_lines.bind(syslog)
    scrapes = socket.create_server(("0.0.0.0", port), backlog=128)
    threading.Thread(target=read_access_log, args=(metrics, log_lines), name="access-log", daemon=True).start()
    threading.Thread(target=asyncio.run, args=(listen(metrics, scrapes),), name="metrics", daemon=True).start()
