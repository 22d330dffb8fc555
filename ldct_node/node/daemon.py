"""The whole node in one process (`ldct-node serve`, ``ldct_node.commands.serve``).

Start-up, in order: configuration (one-line error on a bad file) → logging → the data directory's
lock (one node per data directory; a second one exits with a one-line error) → spool and queue
(a damaged queue database is moved aside and rebuilt from the spool; restart recovery: interrupted denoising is queued again, spooled files without a row are
re-indexed, sending resumes) → model, loaded once (one-line WeightsError if missing) →
receiver (C-STORE SCP) → worker thread (denoise; with ``[broker] url`` a dispatcher thread instead,
which hands series to `ldct-node worker` hosts and applies their results, see ``ldct_node.node.broker``)
→ sender thread → HTTP
(/healthz, /metrics) → housekeeping thread (series assembly after the quiet period, retention) →
``READY=1`` to systemd. Then the main loop feeds systemd's watchdog while the receiver and every
thread are alive. SIGTERM/SIGINT: ``STOPPING=1``,
the receiver closes its port, the worker and sender get ``queue.stop_timeout_s`` to finish
what they are doing; anything cut short is redone after the next start.

How to watch it from outside: ``ldct-node queue list --json --config FILE`` (states in
``ldct_node.node.jobs``), ``GET /healthz`` and ``GET /metrics`` (``ldct_node.node.observe``), and the JSON
log lines on stderr (event names: "receiver listening", "association ended" (the audit line of
each association), "series complete", "denoising series", "denoising progress", "series denoised",
"series delivered", "delivery attempt failed", "series finished", "series files removed
(retention)", "instance ignored", "instance refused"; with ``queue.stream``: "chunk derived while
receiving", "streamed chunk sent", "streamed chunk not sent", "finishing streamed series").
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sqlite3
import time
from pathlib import Path

from ldct_node.config import Config
from ldct_node.durable import DATA_FILE_MODE, private_dir
from ldct_node.errors import CommandError
from ldct_node.logs import get_logger
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.broker import Dispatcher, connect
from ldct_node.node.housekeeping import Housekeeper
from ldct_node.node.jobs import open_job_store
from ldct_node.node.observe import DeliveryBacklog, Health, HttpServer, Metrics
from ldct_node.node.receive import Receiver
from ldct_node.node.send import Sender
from ldct_node.node.spool import Spool
from ldct_node.node.stream import Streamer, StreamLedger
from ldct_node.node.worker import EngineProcessor, SeriesProcessor, Worker

log = get_logger(__name__)

# In the data directory; the node holds an exclusive flock on it for its whole life.
LOCK_FILE = "ldct-node.lock"


def sd_notify(message: str) -> bool:
    """Send a state line to systemd ($NOTIFY_SOCKET); False when not run under Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        # A stale or wrong NOTIFY_SOCKET must not take the node down; systemd will notice the silence.
        log.warning("cannot notify systemd", socket=address, error=str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec (as it recommends), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory for this process: an exclusive flock on ``<data_dir>/ldct-node.lock``,
    which then names our pid. Two nodes on one spool and queue would denoise and send every series
    twice and fight over retention, so a second one is refused (CommandError) before it opens
    anything else. The lock belongs to the returned descriptor, which the caller keeps open for the
    process's lifetime; the kernel drops it when the process ends, kill -9 included, so a stale
    lock file never blocks a restart."""
    path = Path(data_dir) / LOCK_FILE
    try:
        private_dir(Path(data_dir))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, DATA_FILE_MODE)
        os.fchmod(fd, DATA_FILE_MODE)  # also one an earlier version created with the umask
    except OSError as exc:
        raise CommandError(
            f"cannot use the data directory {data_dir}: {exc}; fix its permissions or set storage.data_dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CommandError(f"cannot lock {path}: {exc.strerror}; put storage.data_dir on a file system that supports locks") from None
        raise CommandError(
            f"another ldct-node is already serving data directory {data_dir} (pid {holder or 'unknown'}):"
            " stop it or use another storage.data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Node:
    """Receiver, worker, sender and HTTP server over one spool and one queue."""

    def __init__(self, cfg: Config, processor: SeriesProcessor | None = None):
        self.cfg = cfg
        storage = cfg.storage
        try:
            self.spool = Spool(storage.spool_dir, cfg.receive.min_free_bytes)
            private_dir(storage.outbox_dir, tighten=True)
            self.queue = open_job_store(storage.database)
        except (OSError, sqlite3.Error) as exc:
            raise CommandError(
                f"cannot use the data directory {storage.data_dir}: {exc}; fix its permissions or set storage.data_dir"
            ) from None
        self.metrics = Metrics(depth=self.queue.depth, spool_free=self.spool.free_bytes)
        self.metrics.registry.register(DeliveryBacklog(self.queue.pending_deliveries))
        self.receiver = Receiver(cfg.receive, self.spool, self.queue, metrics=self.metrics)
        destinations = [d.name for d in cfg.send.destinations]
        self.ledger = StreamLedger(self.queue)
        self.sender = Sender(self.queue, cfg.send, cfg.queue.poll_interval_s, self.metrics, self.ledger)
        # Scale-out: worker hosts (`ldct-node worker`) denoise; this node needs no model.
        self.processor = None if cfg.broker.url else processor or self._load_processor()
        if cfg.broker.url:
            if cfg.queue.stream:
                log.warning("queue.stream is on but series go to worker hosts ([broker] url): they wait for the quiet period")
            self.worker = Dispatcher(connect(cfg.broker.url), cfg.broker.stream, self.queue, storage.outbox_dir,
                                     destinations, cfg.queue.poll_interval_s, self.metrics)
        else:
            self.worker = Worker(
                self.queue, self.processor, storage.outbox_dir, destinations,
                cfg.queue.poll_interval_s, self.metrics, disk_full_retry_s=storage.disk_full_retry_s,
                ledger=self.ledger, streamer=self._streamer(),
            )
        self.housekeeper = Housekeeper(self.queue, self.spool, cfg.queue.quiet_period_s, storage.keep_days,
                                       cfg.queue.poll_interval_s)
        self.http = None

    def _streamer(self) -> Streamer | None:
        """The worker's streaming turn when queue.stream is on and the model can stream."""
        if not self.cfg.queue.stream:
            return None
        engine = getattr(self.processor, "engine", None)
        if engine is None or engine.in_slices != 1:
            log.warning("queue.stream is on but the model reads neighbouring slices: series wait for the quiet"
                        " period", in_slices=getattr(engine, "in_slices", None))
            return None
        return Streamer(self.ledger, engine, self.cfg.derive, self.cfg.fidelity, self.cfg.storage.outbox_dir,
                        chunk_written=self.sender.wake)

    def _load_processor(self) -> SeriesProcessor:
        engine = DenoiseEngine.from_path(self.cfg.model.weights, self.cfg.inference)
        log.info("model loaded", model=engine.card.model_id)
        return EngineProcessor(engine, self.cfg.derive, self.cfg.fidelity)

    def recover(self) -> None:
        requeued = self.queue.recover()
        reindexed = self.queue.reindex(self.spool.scan())
        log.info("queue recovered", requeued_denoising=requeued, reindexed_instances=reindexed,
                 depth=self.queue.depth())

    def start(self) -> None:
        self.recover()
        try:
            self.receiver.start()
        except OSError as exc:
            raise CommandError(
                f"cannot listen for DICOM on {self.cfg.receive.host}:{self.cfg.receive.port}: {exc.strerror};"
                " choose another receive.port or stop the other listener"
            ) from None
        self.worker.start()
        self.sender.start()
        self.housekeeper.start()
        if self.cfg.http.enabled:
            try:
                self.http = HttpServer(self.cfg.http.host, self.cfg.http.port, self.health, self.metrics)
            except OSError as exc:
                self.receiver.stop()
                raise CommandError(
                    f"cannot listen for HTTP on {self.cfg.http.host}:{self.cfg.http.port}: {exc.strerror};"
                    " choose another http.port or set http.enabled = false"
                ) from None
            self.http.start()

    def health(self) -> Health:
        return Health(
            receiver_up=self.receiver.is_running,
            worker_alive=self.worker.is_alive(),
            sender_alive=self.sender.is_alive(),
            housekeeper_alive=self.housekeeper.is_alive(),
            spool_free_bytes=self.spool.free_bytes(),
            spool_min_free_bytes=self.spool.min_free_bytes,
            queue=self.queue.depth(),
            degraded=self.worker.degraded,
        )

    def alive(self) -> bool:
        """What the systemd watchdog vouches for: every part still running (a full disk is not a hang)."""
        threads = (self.worker, self.sender, self.housekeeper)
        return self.receiver.is_running and all(t.is_alive() for t in threads)

    def stop(self) -> None:
        self.receiver.stop()
        if self.http:
            self.http.stop()
        threads = (self.housekeeper, self.worker, self.sender)
        for thread in threads:
            thread.stop()
        deadline = time.monotonic() + self.cfg.queue.stop_timeout_s
        for thread in threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            # The database stays open for the thread still working; the process exits under it and
            # the next start redoes that series.
            log.warning("stopped with a series unfinished; it resumes at the next start")
        else:
            self.queue.close()
