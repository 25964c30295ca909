"""Prometheus metrics of the gateway, from nginx's own access log (nginx 1.22 has no metrics module).

nginx sends one JSON line per proxied request over syslog (UDP on loopback, so nothing touches the
read-only disk and a slow exporter never holds a request up); this module counts them by slot (the pool
nginx chose) and status, times them in a histogram, and serves the text format on METRICS_PORT, which the
gateway publishes nowhere and routes nothing to: Prometheus reaches it on the stage network.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from bisect import bisect_left
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("gateway.metrics")

SYSLOG_ADDRESS = ("127.0.0.1", 5140)
METRICS_PORT = 9102
BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
REQUESTS = "mlops_gateway_requests_total"
DURATION = "mlops_gateway_request_duration_seconds"


class GatewayMetrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        # Per slot: a count per bucket (the last one is +Inf), the sum and the count.
        self.durations: dict[str, tuple[list[int], list[float]]] = {}

    def record(self, line: str) -> None:
        """Count one access-log line: a syslog header, then `{"slot": ..., "status": ..., "seconds": ...}`."""
        try:
            entry = json.loads(line[line.index("{"):])
            slot, status, seconds = str(entry["slot"]), str(entry["status"]), float(entry["seconds"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable access-log line %r", line[:200])
            return
        with self.lock:
            self.requests[(slot, status)] = self.requests.get((slot, status), 0) + 1
            buckets, total = self.durations.setdefault(slot, ([0] * (len(BUCKETS) + 1), [0.0]))
            buckets[bisect_left(BUCKETS, seconds)] += 1
            total[0] += seconds

    def exposition(self) -> str:
        lines = [f"# HELP {REQUESTS} Requests the gateway proxied, by slot and HTTP status",
                 f"# TYPE {REQUESTS} counter"]
        with self.lock:
            for (slot, status), count in sorted(self.requests.items()):
                lines.append(f'{REQUESTS}{{slot="{slot}",code="{status}"}} {count}')
            lines += [f"# HELP {DURATION} Time from the client's request to the gateway's response, by slot",
                      f"# TYPE {DURATION} histogram"]
            for slot, (buckets, total) in sorted(self.durations.items()):
                cumulative = 0
                for bound, count in zip((*map(str, BUCKETS), "+Inf"), buckets):
                    cumulative += count
                    lines.append(f'{DURATION}_bucket{{slot="{slot}",le="{bound}"}} {cumulative}')
                lines += [f'{DURATION}_sum{{slot="{slot}"}} {total[0]}', f'{DURATION}_count{{slot="{slot}"}} {cumulative}']
        return "\n".join(lines) + "\n"

    def receive(self, sock: socket.socket) -> None:
        while True:
            self.record(sock.recv(4096).decode(errors="replace"))


def serve(metrics: GatewayMetrics, port: int = METRICS_PORT, syslog: tuple[str, int] = SYSLOG_ADDRESS) -> None:
    """Listen for nginx's log lines and for scrapes, each on a daemon thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Bursts of requests arrive faster than one thread parses them: a large receive buffer keeps lines.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(syslog)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = metrics.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not worth a line each
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=metrics.receive, args=(sock,), name="access-log", daemon=True).start()
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
