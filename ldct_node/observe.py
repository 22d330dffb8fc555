"""Health and metrics over HTTP.

``GET /healthz``: JSON ``{"ok", "receiver_up", "worker_alive", "sender_alive", "spool_free_bytes",
"spool_min_free_bytes", "queue": {state: count}}``; 200 when all is well, 503 when the receiver is
down, the worker or sender thread died, or the spool is below ``receive.min_free_bytes``.

``GET /metrics``: Prometheus text format, from a registry of our own (no process-global state):

- ``ldct_instances_received_total``            instances spooled
- ``ldct_instances_ignored_total{reason}``     valid CT instances left alone (localizer, loop guard ...)
- ``ldct_instances_refused_total{status}``     C-STOREs answered with a failure status
- ``ldct_series_done_total`` / ``ldct_series_failed_total``
- ``ldct_series_denoise_seconds``              histogram of seconds per series (denoise + write)
- ``ldct_send_retries_total``                  delivery attempts that failed and will be retried
- ``ldct_queue_depth{state}``                  series per queue state (read from the database)
- ``ldct_spool_free_bytes``
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .logs import get_logger

log = get_logger(__name__)

# Series take seconds (tiny, GPU) to many minutes (total body on CPU).
SERIES_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)


class _QueueDepth:
    """Reads queue depth at scrape time, so the gauge can never drift from the database."""

    def __init__(self, depth: Callable[[], dict[str, int]]):
        self._depth = depth

    def collect(self):
        family = GaugeMetricFamily("ldct_queue_depth", "Series per queue state", labels=["state"])
        for state, count in self._depth().items():
            family.add_metric([state], count)
        yield family


class Metrics:
    def __init__(self, depth: Callable[[], dict[str, int]] | None = None,
                 spool_free: Callable[[], float] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("ldct_instances_received", "Instances spooled", registry=r)
        self.ignored = Counter("ldct_instances_ignored", "Valid CT instances left alone", ["reason"], registry=r)
        self.refused = Counter("ldct_instances_refused", "C-STOREs answered with a failure status", ["status"],
                               registry=r)
        self.series_done = Counter("ldct_series_done", "Series delivered or kept in the outbox", registry=r)
        self.series_failed = Counter("ldct_series_failed", "Series failed", registry=r)
        self.series_seconds = Histogram("ldct_series_denoise_seconds", "Seconds to denoise one series",
                                        buckets=SERIES_SECONDS_BUCKETS, registry=r)
        self.send_retries = Counter("ldct_send_retries", "Delivery attempts failed and to be retried", registry=r)
        if depth is not None:
            r.register(_QueueDepth(depth))
        if spool_free is not None:
            Gauge("ldct_spool_free_bytes", "Free bytes on the spool volume", registry=r).set_function(spool_free)

    def series_finished(self, state: str) -> None:
        (self.series_done if state == "done" else self.series_failed).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Health:
    receiver_up: bool
    worker_alive: bool
    sender_alive: bool
    housekeeper_alive: bool  # series assembly and retention
    spool_free_bytes: int
    spool_min_free_bytes: int
    queue: dict[str, int]

    @property
    def ok(self) -> bool:
        return (self.receiver_up and self.worker_alive and self.sender_alive and self.housekeeper_alive
                and self.spool_free_bytes >= self.spool_min_free_bytes)

    def to_dict(self) -> dict:
        return {"ok": self.ok, **self.__dict__}


class HttpServer:
    """Serves /healthz and /metrics from a background thread."""

    def __init__(self, host: str, port: int, health: Callable[[], Health], metrics: Metrics):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path == "/healthz":
                    report = outer.health()
                    self._reply(200 if report.ok else 503, "application/json", json.dumps(report.to_dict()).encode())
                elif self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, outer.metrics.render())
                else:
                    self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                # Scrapes every few seconds would flood the journal; errors still reach the handler's log.
                pass

        self.health = health
        self.metrics = metrics
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ldct-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        log.info("http listening", host=self._server.server_address[0], port=self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
