"""Health and metrics over HTTP.

``GET /healthz``: JSON ``{"ok", "receiver_up", "worker_alive", "sender_alive", "spool_free_bytes",
"spool_min_free_bytes", "queue": {state: count}, "degraded": [reason ...]}``; 200 when all is well,
503 when the receiver is down, the worker or sender thread died, the spool is below
``receive.min_free_bytes``, or ``degraded`` names a reason (the outbox volume is full).

``GET /metrics``: Prometheus text format, from a registry of our own (no process-global state):

- ``ldct_instances_received_total``            instances spooled
- ``ldct_instances_ignored_total{reason}``     valid CT instances left alone (localizer, loop guard ...)
- ``ldct_instances_refused_total{status}``     C-STOREs answered with a failure status
- ``ldct_connections_refused_total{reason}``   connections and associations the receiver refused or cut:
                                               ``called_ae_title``, ``calling_ae_title`` (allow-list),
                                               ``association_limit``, ``caller_limit``,
                                               ``unassociated_limit`` (closed at connect),
                                               ``negotiation_timeout``, ``pdu_too_long``,
                                               ``instance_too_large``, ``uid_too_long``,
                                               ``tls_handshake`` (no TLS, or a certificate refused)
- ``ldct_series_done_total`` / ``ldct_series_failed_total``
- ``ldct_series_denoise_seconds``              histogram of seconds per series (denoise + write)
- ``ldct_series_fidelity_failed_total``        series failed by the HU fidelity gate (also in series_failed)
- ``ldct_last_series_noise_sd_before_hu`` / ``ldct_last_series_noise_sd_after_hu`` /
  ``ldct_last_series_mean_hu_change`` / ``ldct_last_series_lowpass_change_p95_hu``
                                               the HU fidelity measures of the last series (NaN: not measurable)
- ``ldct_series_noise_sd_before_hu`` / ``ldct_series_noise_sd_after_hu`` / ``ldct_series_mean_hu_change`` /
  ``ldct_series_lowpass_change_p95_hu``        histograms of the same over all series
- ``ldct_denoising_series_slices`` / ``ldct_denoising_series_slices_done``
                                               slices of the series being denoised, and how many are done
                                               (both 0 while the worker is idle)
- ``ldct_send_retries_total``                  delivery attempts that failed and will be retried
- ``ldct_queue_depth{state}``                  series per queue state (read from the database)
- ``ldct_deliveries_pending{destination}`` / ``ldct_delivery_next_attempt_timestamp_seconds{destination}``
                                               deliveries waiting (first try or retrying), and the earliest
                                               next attempt among them (Unix seconds)
- ``ldct_spool_free_bytes``
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ldct_node.dicom.fidelity import FidelitySummary
from ldct_node.logs import get_logger
from ldct_node.node.jobs import SeriesState

log = get_logger(__name__)

# Series take seconds (tiny, GPU) to many minutes (total body on CPU).
SERIES_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
# Noise SD of the fine-grain band: a few HU (normal dose, or after denoising) to ~100 HU (very low dose).
NOISE_SD_BUCKETS = (2, 5, 10, 15, 20, 30, 40, 60, 80, 120)
# Mean soft-tissue change, signed, around the default 3 HU limit.
MEAN_CHANGE_BUCKETS = (-20, -10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10, 20)
# Low-pass change (95th percentile), around the default 10 HU limit.
LOWPASS_CHANGE_BUCKETS = (0.5, 1, 2, 3, 5, 7, 10, 15, 20, 50)


class _QueueDepth:
    """Reads queue depth at scrape time, so the gauge can never drift from the database."""

    def __init__(self, depth: Callable[[], dict[SeriesState, int]]):
        self._depth = depth

    def collect(self):
        family = GaugeMetricFamily("ldct_queue_depth", "Series per queue state", labels=["state"])
        for state, count in self._depth().items():
            family.add_metric([state], count)
        yield family


class DeliveryBacklog:
    """Reads pending deliveries at scrape time: a destination that is down shows as a growing backlog."""

    def __init__(self, pending: Callable[[], dict[str, tuple[int, float]]]):
        self._pending = pending

    def collect(self):
        count = GaugeMetricFamily("ldct_deliveries_pending", "Deliveries waiting to be sent", labels=["destination"])
        due = GaugeMetricFamily("ldct_delivery_next_attempt_timestamp_seconds",
                                "Earliest next attempt among pending deliveries", labels=["destination"])
        for destination, (pending, next_attempt_at) in self._pending().items():
            count.add_metric([destination], pending)
            due.add_metric([destination], next_attempt_at)
        yield count
        yield due


class Metrics:
    def __init__(self, depth: Callable[[], dict[SeriesState, int]] | None = None,
                 spool_free: Callable[[], float] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("ldct_instances_received", "Instances spooled", registry=r)
        self.ignored = Counter("ldct_instances_ignored", "Valid CT instances left alone", ["reason"], registry=r)
        self.refused = Counter("ldct_instances_refused", "C-STOREs answered with a failure status", ["status"],
                               registry=r)
        self.connections_refused = Counter("ldct_connections_refused",
                                           "Connections and associations the receiver refused or cut", ["reason"],
                                           registry=r)
        self.series_done = Counter("ldct_series_done", "Series delivered or kept in the outbox", registry=r)
        self.series_failed = Counter("ldct_series_failed", "Series failed", registry=r)
        self.series_seconds = Histogram("ldct_series_denoise_seconds", "Seconds to denoise one series",
                                        buckets=SERIES_SECONDS_BUCKETS, registry=r)
        self.slices_total = Gauge("ldct_denoising_series_slices", "Slices of the series being denoised", registry=r)
        self.slices_done = Gauge("ldct_denoising_series_slices_done", "Slices of the series being denoised done",
                                 registry=r)
        self.send_retries = Counter("ldct_send_retries", "Delivery attempts failed and to be retried", registry=r)
        self.fidelity_failed = Counter("ldct_series_fidelity_failed", "Series failed by the HU fidelity gate",
                                       registry=r)
        self._fidelity = {
            name: (Gauge(f"ldct_last_series_{name}", f"{text}, last series (NaN: not measurable)", registry=r),
                   Histogram(f"ldct_series_{name}", f"{text} per series", buckets=buckets, registry=r))
            for name, text, buckets in (
                ("noise_sd_before_hu", "Noise SD in uniform soft tissue before denoising, HU", NOISE_SD_BUCKETS),
                ("noise_sd_after_hu", "Noise SD in uniform soft tissue after denoising, HU", NOISE_SD_BUCKETS),
                ("mean_hu_change", "Mean soft-tissue HU change (out - in)", MEAN_CHANGE_BUCKETS),
                ("lowpass_change_p95_hu", "95th percentile of the low-pass soft-tissue HU change",
                 LOWPASS_CHANGE_BUCKETS),
            )
        }
        if depth is not None:
            r.register(_QueueDepth(depth))
        if spool_free is not None:
            Gauge("ldct_spool_free_bytes", "Free bytes on the spool volume", registry=r).set_function(spool_free)

    def series_fidelity(self, summary: FidelitySummary, failed: bool) -> None:
        """Record one series' HU fidelity measures; failed: the gate stopped it."""
        values = {
            "noise_sd_before_hu": summary.noise_sd_before,
            "noise_sd_after_hu": summary.noise_sd_after,
            "mean_hu_change": summary.mean_hu_change,
            "lowpass_change_p95_hu": summary.lowpass_p95_hu,
        }
        for name, value in values.items():
            gauge, histogram = self._fidelity[name]
            gauge.set(math.nan if value is None else value)
            if value is not None:
                histogram.observe(value)
        if failed:
            self.fidelity_failed.inc()

    def series_progress(self, done: int, total: int) -> None:
        self.slices_done.set(done)
        self.slices_total.set(total)

    def series_finished(self, state: SeriesState) -> None:
        (self.series_done if state == SeriesState.DONE else self.series_failed).inc()

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
    queue: dict[SeriesState, int]
    degraded: tuple[str, ...] = ()  # one line per reason the node cannot do its work now (outbox full)

    @property
    def ok(self) -> bool:
        return (self.receiver_up and self.worker_alive and self.sender_alive and self.housekeeper_alive
                and self.spool_free_bytes >= self.spool_min_free_bytes and not self.degraded)

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
