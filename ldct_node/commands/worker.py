"""`ldct-node worker`: a worker host for scale-out (``[broker] url`` set; see ``ldct_node.node.broker``).

Loads the model once, then takes series from the broker's jobs stream one at a time: a job whose
holder went silent for ``broker.visibility_timeout_s`` first (that worker died), else a new one. It
reports who holds the series, denoises the spooled files (on storage shared with the head node) into
the outbox, and publishes the outcome; the head node applies it and sends. /healthz and /metrics on
``http.host:http.port`` (``ldct_worker_info{worker}`` names it; ``ldct_worker_series_total{outcome}``,
``ldct_worker_series_taken_over_total`` and the series histograms of ``ldct_node.node.observe``).

SIGTERM/SIGINT: the series in hand is handed back to the other workers at once, and the command
exits 0. Redis unreachable at start: one-line error, exit 2; later, calls are retried with back-off
and a finished series is published once Redis is back (if no other worker took it meanwhile).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client import Counter, Gauge

from ldct_node.config import Config, load_config
from ldct_node.errors import CommandError
from ldct_node.logs import configure_logging, get_logger, one_line
from ldct_node.node.broker import MAX_DELIVERIES, Heartbeat, JobQueue, Result, Taken, connect, redacted, staging_dir
from ldct_node.node.observe import HttpServer, Metrics
from ldct_node.node.worker import Outcome, OutcomeKind, SeriesProcessor, SeriesProgress, run_series

log = get_logger(__name__)

# How long one wait for a new job blocks; also how soon SIGTERM is noticed while idle.
TAKE_BLOCK_S = 1.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", required=True,
                        help="TOML configuration with [broker] url set (the head node's file: same model, derive settings)")


def worker_name(configured: str) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class Abandoned(Exception):
    """The series in hand is given up: the worker stops, or another worker took the job over."""


@dataclass
class WorkerHealth:
    worker: str
    broker_up: bool
    busy: bool

    @property
    def ok(self) -> bool:
        return self.broker_up

    def to_dict(self) -> dict:
        return {"ok": self.ok, **self.__dict__}


class WorkerHost:
    """The take → denoise → publish loop of one worker host."""

    def __init__(self, jobs: JobQueue, processor: SeriesProcessor, cfg: Config, name: str, metrics: Metrics):
        self.jobs = jobs
        self.processor = processor
        self.cfg = cfg
        self.name = name
        self.metrics = metrics
        self.stopping = threading.Event()
        self.broker_up = True
        self.busy = False
        registry = metrics.registry
        Gauge("ldct_worker_info", "This worker host", ["worker"], registry=registry).labels(worker=name).set(1)
        self.series = Counter("ldct_worker_series", "Series this worker finished, by outcome", ["outcome"], registry=registry)
        self.taken_over = Counter("ldct_worker_series_taken_over", "Series taken over from a worker that went silent",
                                  registry=registry)

    def health(self) -> WorkerHealth:
        return WorkerHealth(self.name, self.broker_up, self.busy)

    def run(self) -> None:
        delay = BACKOFF_INITIAL_S
        while not self.stopping.is_set():
            try:
                taken = self.jobs.take(TAKE_BLOCK_S)
                self._connected()
                delay = BACKOFF_INITIAL_S
                if taken is not None:
                    self.handle(taken)
            except redis.RedisError as exc:
                delay = self._lost_broker(exc, delay)

    def _connected(self) -> None:
        if not self.broker_up:
            log.info("broker reachable again")
        self.broker_up = True

    def _lost_broker(self, exc: Exception, delay: float) -> float:
        if self.broker_up:
            log.warning("broker unreachable: retrying with back-off", error=one_line(exc))
        self.broker_up = False
        self.stopping.wait(delay)
        return min(delay * 2, BACKOFF_MAX_S)

    def handle(self, taken: Taken) -> None:
        job = taken.job
        bound = log.bind(series_uid=job.series_uid, run=job.run, worker=self.name, deliveries=taken.deliveries)
        if taken.deliveries > 1:
            self.taken_over.inc()
        if taken.deliveries > MAX_DELIVERIES:
            outcome = Outcome(OutcomeKind.FAILED, f"taken {taken.deliveries - 1} times without a result (workers crashed or"
                                                  " ran out of memory?): see their logs, then 'ldct-node queue retry'")
            bound.error("series given up after repeated worker deaths", reason=outcome.reason)
            self._publish(taken, outcome, bound)
            return
        self.jobs.report(Result(job.series_uid, job.run, self.name))
        bound.info("denoising series", instances=len(job.sources))
        heartbeat = Heartbeat(self.jobs, taken.entry_id, self.cfg.broker.heartbeat_interval_s)
        progress = SeriesProgress(bound, self.metrics)
        abandoned = threading.Event()

        def guarded(done: int, total: int) -> None:
            if heartbeat.lost.is_set() or self.stopping.is_set():
                abandoned.set()
                raise Abandoned("series abandoned")
            progress(done, total)

        self.busy = True
        heartbeat.start()
        try:
            out_dir = staging_dir(job.outbox, self.processor.output_series_uid(job.series_uid), taken.entry_id)
            outcome = run_series(self.processor, job.sources, out_dir, self.metrics, bound, guarded)
        finally:
            heartbeat.stop()
            self.busy = False
        if heartbeat.lost.is_set():
            bound.warning("series taken over by another worker: result dropped")
            self.series.labels(outcome="abandoned").inc()
            return
        if abandoned.is_set():
            self._hand_back(taken, bound)
            return
        self._publish(taken, outcome, bound)
        if outcome.verdict == OutcomeKind.NO_SPACE:
            # The next series would find the same full volume: give the space time to come back.
            self.stopping.wait(self.cfg.storage.disk_full_retry_s)

    def _hand_back(self, taken: Taken, bound) -> None:
        try:
            self.jobs.release(taken.entry_id)
            bound.info("series handed back to the other workers")
        except redis.RedisError as exc:
            bound.warning("cannot hand the series back: another worker takes it after the visibility timeout",
                          error=one_line(exc))
        self.series.labels(outcome="abandoned").inc()

    def _publish(self, taken: Taken, outcome: Outcome, bound) -> None:
        """Publish until Redis takes it: a finished series is not thrown away over a network blip."""
        result = Result(taken.job.series_uid, taken.job.run, self.name, outcome)
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                owned = self.jobs.complete(taken.entry_id, result)
                break
            except redis.RedisError as exc:
                if self.stopping.is_set():
                    bound.warning("stopping before the result reached the broker: another worker redoes the series")
                    return
                delay = self._lost_broker(exc, delay)
        self._connected()
        if not owned:
            bound.warning("series taken over by another worker: result dropped")
            self.series.labels(outcome="abandoned").inc()
            return
        self.series.labels(outcome=outcome.verdict).inc()
        bound.info("series result published", verdict=outcome.verdict, reason=outcome.reason)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    configure_logging(cfg.log.level, cfg.log.format)
    if not cfg.broker.url:
        raise CommandError(f"{args.config} sets no broker.url: a worker takes series from Redis; set [broker] url")
    name = worker_name(cfg.broker.worker_name)
    client = connect(cfg.broker.url)
    from ldct_node.net.inference import DenoiseEngine  # torch: only once the broker is known to answer
    from ldct_node.node.worker import EngineProcessor

    engine = DenoiseEngine.from_path(cfg.model.weights, cfg.inference)
    log.info("model loaded", model=engine.card.model_id)
    metrics = Metrics()
    # The Redis consumer is unique per process even when hosts share a worker_name: ownership checks rely on it.
    consumer = f"{name}-{uuid.uuid4().hex[:8]}"
    host = WorkerHost(JobQueue(client, cfg.broker.stream, consumer, cfg.broker.visibility_timeout_s),
                      EngineProcessor(engine, cfg.derive, cfg.fidelity), cfg, name, metrics)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: host.stopping.set())
    http = None
    if cfg.http.enabled:
        try:
            http = HttpServer(cfg.http.host, cfg.http.port, host.health, metrics)
        except OSError as exc:
            raise CommandError(f"cannot listen for HTTP on {cfg.http.host}:{cfg.http.port}: {exc.strerror};"
                               " choose another http.port or set http.enabled = false") from None
        http.start()
    log.info("worker ready", worker=name, broker=redacted(cfg.broker.url), stream=cfg.broker.stream)
    started = time.monotonic()
    try:
        host.run()
    finally:
        if http:
            http.stop()
        log.info("worker stopping", worker=name, seconds=round(time.monotonic() - started, 1))
    return 0
