"""The job store: the node's persistent queue of series, one SQLite database (WAL) with a row per series.

Series states (column ``series.state``)::

    received ──(quiet period over)──> queued ──(worker claims)──> denoising
        ^                                ^                            │ derived series in outbox
        │ instance arrives after         │ retry, outputs gone        v
        │ done/failed: a new run         │                         sending ──(every destination stored)──> done
        │                                │                            │
        └──────────── done / failed <────┴── retry, outputs kept ─────┘──(a destination gave up)──> failed

- ``received``: instances are arriving; the series waits until none came for ``queue.quiet_period_s``.
- ``queued``: complete, waiting for the worker.
- ``denoising``: the worker is writing the derived series to ``outbox/<derived series UID>/``.
- ``sending``: one row per destination in ``deliveries`` (``pending`` → ``done`` | ``failed``),
  retried with capped exponential back-off until ``send.give_up_after_s`` (a day by default) has
  passed since the delivery became pending, so an outage of a PACS heals without a human.
- ``done``: every destination stored every instance, or no destination is configured
  (``reason`` = "kept in outbox"). ``failed``: ``reason`` says why in one line.

Instances of a run that the worker could not use (a slice whose pixel data does not decode, ...) are
set aside: ``series.set_aside`` lists each one's SOP Instance UID and reason (JSON), the rest of the
series is derived and sent as usual.

Restart recovery (``recover``): ``denoising`` goes back to ``queued`` (the derived UIDs are
deterministic, so the re-run writes the same files); ``sending`` simply resumes; spooled files whose
row was lost are re-indexed. An instance arriving for a ``done``/``failed`` series opens a new run
(``run`` + 1) of the same series, whose output carries the same UIDs, so PACS sees a replacement.
An instance arriving during ``denoising``/``sending`` is picked up by a new run once that one ends.

A damaged database file (torn by a disk fault, zeroed, overwritten) is no reason for a hospital node
to stay down: ``open_job_store`` moves it aside as ``<name>.damaged-<UTC time>`` for inspection and
starts an empty one, which restart recovery fills again from the spool (``reindex``); the derived
UIDs are deterministic, so series sent before reach PACS again as replacements, never copies.

Observe it from outside with ``ldct-node queue list --json`` (see ``SeriesRow``).
All writes happen in one transaction each, behind one lock, so the C-STORE threads, the worker
and the sender can share a JobStore.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Iterable, Iterator

from ldct_node.durable import DATA_FILE_MODE, private_dir, private_file, restrict
from ldct_node.errors import UserError
from ldct_node.logs import get_logger
from ldct_node.node.spool import SpooledInstance

log = get_logger(__name__)


class SeriesState(StrEnum):
    """Column ``series.state``; the values are what the database holds, so they never change."""

    RECEIVED = "received"
    QUEUED = "queued"
    DENOISING = "denoising"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    """Column ``deliveries.state``: pending -> done | failed; stored values, like SeriesState's."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


FINISHED = (SeriesState.DONE, SeriesState.FAILED)
# The worker or sender is working on these; taking files away under them would corrupt a run.
ACTIVE = (SeriesState.DENOISING, SeriesState.SENDING)

KEPT_IN_OUTBOX = "kept in outbox (no destination configured)"

# `ldct-node queue` writes to the same file as the running node; a writer waits this long for the other.
_BUSY_TIMEOUT_S = 30.0

_INSTANCES_TABLE = """CREATE TABLE IF NOT EXISTS instances (
    series_uid  TEXT NOT NULL,
    sop_uid     TEXT NOT NULL,
    path        TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (series_uid, sop_uid)
);"""

# Streaming (queue.stream, ldct_node.node.stream): instances derived and sent while their series is
# still arriving. Rows belong to one run of a series; a new run of the series drops them.
STREAM_TABLES = """
CREATE TABLE IF NOT EXISTS stream_runs (
    series_uid  TEXT PRIMARY KEY,
    run         INTEGER NOT NULL,
    created     REAL NOT NULL,
    fidelity    TEXT NOT NULL,
    held        TEXT
);
CREATE TABLE IF NOT EXISTS streamed (
    series_uid  TEXT NOT NULL,
    sop_uid     TEXT NOT NULL,
    derived     TEXT,
    reason      TEXT,
    PRIMARY KEY (series_uid, sop_uid)
);
CREATE TABLE IF NOT EXISTS stream_sent (
    series_uid  TEXT NOT NULL,
    destination TEXT NOT NULL,
    derived     TEXT NOT NULL,
    PRIMARY KEY (series_uid, destination, derived)
);
"""
STREAM_TABLE_NAMES = ("stream_runs", "streamed", "stream_sent")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid          TEXT PRIMARY KEY,
    state               TEXT NOT NULL,
    run                 INTEGER NOT NULL DEFAULT 1,
    first_received_at   REAL NOT NULL,
    last_received_at    REAL NOT NULL,
    queued_at           REAL,
    started_at          REAL,
    denoised_at         REAL,
    finished_at         REAL,
    derived_series_uid  TEXT,
    outbox              TEXT,
    slices              INTEGER,
    skipped             INTEGER,
    denoise_seconds     REAL,
    reason              TEXT,
    cleaned_at          REAL,
    instances           INTEGER,
    set_aside           TEXT,
    worker              TEXT,
    updated_at          REAL NOT NULL
);
{instances}
CREATE TABLE IF NOT EXISTS deliveries (
    series_uid      TEXT NOT NULL,
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    pending_since   REAL,
    sent            INTEGER,
    error           TEXT,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (series_uid, destination)
);
{streaming}""".format(instances=_INSTANCES_TABLE, streaming=STREAM_TABLES)


class JobStoreError(UserError, ValueError):
    """A request the queue cannot honour (unknown series, wrong state), as one line."""


class JobStoreDamaged(Exception):
    """The queue database file is not a sound SQLite database; the message is one line."""


def is_damage(exc: sqlite3.Error) -> bool:
    """SQLite found the file corrupt or not a database at all (not locked, read-only or missing)."""
    # Extended result codes carry the primary code in their low byte.
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): doubling, capped."""
    return min(initial_s * 2 ** (attempt - 1), max_s)


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed delivery is tried again, and when it is given up (send.* settings)."""

    backoff_initial_s: float
    backoff_max_s: float
    give_up_after_s: float
    max_attempts: int = 0  # 0: no limit by count, only by time


def gives_up(tried: int, pending_for_s: float, policy: RetryPolicy) -> bool:
    """A delivery that has failed `tried` times while pending for `pending_for_s` is given up."""
    return pending_for_s >= policy.give_up_after_s or 0 < policy.max_attempts <= tried


@dataclass(frozen=True)
class FailedAttempt:
    series_state: SeriesState
    gave_up: bool
    next_attempt_at: float


@dataclass
class Delivery:
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    pending_since: float | None
    sent: int | None
    error: str | None


@dataclass
class SeriesRow:
    """One series job as `ldct-node queue list --json` shows it. Times are Unix seconds; for one
    run, queued_at − last_received_at is the quiet period, denoised_at − started_at the denoising
    and finished_at − denoised_at the sending."""

    series_uid: str
    state: SeriesState
    run: int
    instances: int  # of this run; still counted after retention removed their files
    first_received_at: float
    last_received_at: float
    queued_at: float | None
    started_at: float | None
    denoised_at: float | None
    finished_at: float | None
    derived_series_uid: str | None
    outbox: str | None
    slices: int | None
    skipped: int | None
    denoise_seconds: float | None
    reason: str | None
    cleaned_at: float | None
    updated_at: float
    deliveries: list[Delivery] = field(default_factory=list)
    # Instances of this run the worker could not use: {"sop_uid": ..., "reason": ...} each.
    set_aside: list[dict] = field(default_factory=list)
    # With a broker ([broker] url): the worker host that took the current run; None before, or without a broker.
    worker: str | None = None
    # With queue.stream: slices of this run derived while the series was still arriving.
    streamed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """A series the worker claimed: its run number and the spooled files that exist."""

    series_uid: str
    run: int
    sources: list[Path]


@dataclass(frozen=True)
class DueDelivery:
    series_uid: str
    destination: str
    attempts: int
    derived_series_uid: str
    outbox: Path
    slices: int


class JobStore:
    def __init__(self, database: Path):
        private_dir(database.parent)
        # SQLite creates the file with the umask and gives its -wal and -shm the file's mode: made 0600 first.
        private_file(database)
        for leftover in (database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
            if leftover.exists():  # kept by an earlier version's crash, with the umask's mode
                restrict(leftover, DATA_FILE_MODE)
        # One connection shared under a lock: SQLite serialises writers anyway, and a single
        # connection keeps every transaction's view consistent for the threads of one process.
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None,
                                   timeout=_BUSY_TIMEOUT_S)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # Damage in any page shows here, at start, rather than as a failed C-STORE or a stuck series later.
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if is_damage(exc):
                raise JobStoreDamaged(f"queue database {database} is damaged: {exc}") from None
            raise
        if problems != ["ok"]:
            self._db.close()
            raise JobStoreDamaged(f"queue database {database} is damaged: {problems[0]}")
        # NORMAL in WAL mode survives a killed process; after a power cut the last commits may be
        # missing, which `reindex` repairs from the spool (the spooled file is fsynced first).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        _add_missing_columns(self._db)
        # After the migration, which drops the old table with its indexes: finds a reused SOP Instance UID.
        self._db.execute("CREATE INDEX IF NOT EXISTS instances_by_sop_uid ON instances (sop_uid)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the store's lock (for ldct_node.node.stream's records, which share the file)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- receive ---------------------------------------------------------------------------

    def add_instance(self, series_uid: str, sop_uid: str, path: Path, now: float | None = None) -> None:
        """Record a spooled instance; a re-sent instance replaces its row (idempotent). A SOP Instance
        UID another series already holds is kept in both (the spool files them apart) and logged:
        a modality reusing UIDs must not cost the first series a slice."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO instances (series_uid, sop_uid, path, received_at) VALUES (?, ?, ?, ?)",
                (series_uid, sop_uid, str(path), now),
            )
            others = [r[0] for r in db.execute(
                "SELECT series_uid FROM instances WHERE sop_uid = ? AND series_uid != ?", (sop_uid, series_uid))]
            if others:
                log.warning("SOP Instance UID reused in another series, kept in both", sop_uid=sop_uid,
                            series_uid=series_uid, other_series_uids=others)
            row = db.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO series (series_uid, state, first_received_at, last_received_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (series_uid, SeriesState.RECEIVED, now, now, now),
                )
            elif row["state"] in FINISHED:
                self._reopen(db, series_uid, now)
            else:
                # queued goes back to received: the series was not complete after all.
                state = SeriesState.RECEIVED if row["state"] == SeriesState.QUEUED else row["state"]
                db.execute(
                    "UPDATE series SET state = ?, last_received_at = max(last_received_at, ?), updated_at = ?"
                    " WHERE series_uid = ?",
                    (state, now, now, series_uid),
                )

    @staticmethod
    def _reopen(db: sqlite3.Connection, series_uid: str, now: float) -> None:
        db.execute(
            "UPDATE series SET state = ?, run = run + 1, last_received_at = max(last_received_at, ?), queued_at = NULL,"
            " started_at = NULL, denoised_at = NULL, finished_at = NULL, reason = NULL, cleaned_at = NULL,"
            " instances = NULL, set_aside = NULL, worker = NULL, updated_at = ?"
            " WHERE series_uid = ?",
            (SeriesState.RECEIVED, now, now, series_uid),
        )
        db.execute("DELETE FROM deliveries WHERE series_uid = ?", (series_uid,))
        forget_stream(db, series_uid)

    def reindex(self, spooled: Iterable[SpooledInstance]) -> int:
        """Add spooled files that have no row (their commit was lost in a crash), dated by their
        modification time so that the quiet period still counts from their arrival. Returns how many."""
        with self._lock:
            known = {(r[0], r[1]) for r in self._db.execute("SELECT series_uid, sop_uid FROM instances")}
        missing = [inst for inst in spooled if (inst.series_uid, inst.sop_uid) not in known]
        for inst in missing:
            self.add_instance(inst.series_uid, inst.sop_uid, inst.path, now=inst.path.stat().st_mtime)
        return len(missing)

    # --- assembly ----------------------------------------------------------------------------

    def promote_quiet(self, quiet_period_s: float, now: float | None = None) -> list[str]:
        """received → queued for every series with no new instance for quiet_period_s."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            uids = [r[0] for r in db.execute(
                "SELECT series_uid FROM series WHERE state = ? AND last_received_at <= ? ORDER BY last_received_at",
                (SeriesState.RECEIVED, now - quiet_period_s),
            )]
            db.executemany(
                "UPDATE series SET state = ?, queued_at = ?, updated_at = ? WHERE series_uid = ?",
                [(SeriesState.QUEUED, now, now, uid) for uid in uids],
            )
        return uids

    # --- worker ------------------------------------------------------------------------------

    def claim_next(self, now: float | None = None) -> Job | None:
        """The oldest queued series, now denoising; None when nothing is queued."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute(
                "SELECT series_uid, run FROM series WHERE state = ? ORDER BY queued_at, series_uid LIMIT 1",
                (SeriesState.QUEUED,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE series SET state = ?, started_at = ?, reason = NULL, worker = NULL, updated_at = ? WHERE series_uid = ?",
                (SeriesState.DENOISING, now, now, row["series_uid"]),
            )
            paths = [Path(r[0]) for r in db.execute(
                "SELECT path FROM instances WHERE series_uid = ? ORDER BY path", (row["series_uid"],)
            )]
        return Job(row["series_uid"], row["run"], [p for p in paths if p.is_file()])

    def is_denoising(self, series_uid: str, run: int) -> bool:
        """This run of the series is the one being denoised now: a broker result for any other
        (a re-delivered duplicate, a run that new instances replaced) must be ignored."""
        with self._lock:
            row = self._db.execute("SELECT state, run FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return row is not None and row["state"] == SeriesState.DENOISING and row["run"] == run

    def taken_by(self, series_uid: str, run: int, worker: str, now: float | None = None) -> bool:
        """A broker worker host started this run; False (nothing changed) when the run is no longer being denoised."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return db.execute(
                "UPDATE series SET worker = ?, updated_at = ? WHERE series_uid = ? AND run = ? AND state = ?",
                (worker, now, series_uid, run, SeriesState.DENOISING),
            ).rowcount == 1

    def denoised(
        self,
        series_uid: str,
        derived_series_uid: str,
        outbox: Path,
        slices: int,
        skipped: int,
        seconds: float,
        destinations: list[str],
        now: float | None = None,
        set_aside: list[tuple[str, str]] = (),
    ) -> SeriesState:
        """The worker wrote the derived series: sending (one pending delivery per destination), or done
        when there is no destination. set_aside: (SOP Instance UID, reason) of each instance it could
        not use. Returns the new state."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE series SET derived_series_uid = ?, outbox = ?, slices = ?, skipped = ?, denoise_seconds = ?,"
                " denoised_at = ?, set_aside = ?, updated_at = ? WHERE series_uid = ?",
                (derived_series_uid, str(outbox), slices, skipped, seconds, now, _set_aside_json(set_aside), now,
                 series_uid),
            )
            db.execute("DELETE FROM deliveries WHERE series_uid = ?", (series_uid,))
            if not destinations:
                return self._finish(db, series_uid, SeriesState.DONE, KEPT_IN_OUTBOX, now)
            db.executemany(
                "INSERT INTO deliveries (series_uid, destination, state, next_attempt_at, pending_since, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(series_uid, name, DeliveryState.PENDING, now, now, now) for name in destinations],
            )
            db.execute("UPDATE series SET state = ? WHERE series_uid = ?", (SeriesState.SENDING, series_uid))
            return SeriesState.SENDING

    def requeue(self, series_uid: str, reason: str, now: float | None = None) -> SeriesState:
        """The run could not finish for a reason outside the series (a full outbox): queued again,
        first in line as before, with the reason shown until it is claimed."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE series SET state = ?, started_at = NULL, reason = ?, updated_at = ? WHERE series_uid = ?",
                (SeriesState.QUEUED, reason, now, series_uid),
            )
        return SeriesState.QUEUED

    def finish(self, series_uid: str, state: SeriesState, reason: str, now: float | None = None,
               set_aside: list[tuple[str, str]] = ()) -> SeriesState:
        """End the current run as done or failed (worker failures, nothing to denoise); set_aside as in denoised."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute("UPDATE series SET set_aside = ? WHERE series_uid = ?", (_set_aside_json(set_aside), series_uid))
            return self._finish(db, series_uid, state, reason, now)

    @staticmethod
    def _finish(db: sqlite3.Connection, series_uid: str, state: SeriesState, reason: str | None,
                now: float) -> SeriesState:
        row = db.execute(
            "SELECT started_at, last_received_at FROM series WHERE series_uid = ?", (series_uid,)
        ).fetchone()
        db.execute(
            "UPDATE series SET state = ?, reason = ?, finished_at = ?, updated_at = ? WHERE series_uid = ?",
            (state, reason, now, now, series_uid),
        )
        if row["started_at"] is not None and row["last_received_at"] > row["started_at"]:
            # Instances came in while this run worked: they get a run of their own.
            JobStore._reopen(db, series_uid, row["last_received_at"])
            return SeriesState.RECEIVED
        return state

    # --- sender ------------------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None) -> list[DueDelivery]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT d.series_uid, d.destination, d.attempts, s.derived_series_uid, s.outbox, s.slices"
                " FROM deliveries d JOIN series s USING (series_uid)"
                " WHERE s.state = ? AND d.state = ? AND d.next_attempt_at <= ?"
                " ORDER BY d.next_attempt_at, d.series_uid, d.destination",
                (SeriesState.SENDING, DeliveryState.PENDING, now),
            ).fetchall()
        return [DueDelivery(r[0], r[1], r[2], r[3], Path(r[4]), r[5]) for r in rows]

    def delivered(self, series_uid: str, destination: str, sent: int, now: float | None = None) -> SeriesState:
        """One destination stored the series. Returns the series state afterwards."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, sent = ?, error = NULL, updated_at = ?"
                " WHERE series_uid = ? AND destination = ?",
                (DeliveryState.DONE, sent, now, series_uid, destination),
            )
            return self._settle(db, series_uid, now)

    def delivery_failed(
        self, series_uid: str, destination: str, error: str, policy: RetryPolicy, now: float | None = None,
    ) -> FailedAttempt:
        """One attempt failed: back off and stay pending, or give up as the policy says."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute(
                "SELECT attempts, pending_since FROM deliveries WHERE series_uid = ? AND destination = ?",
                (series_uid, destination),
            ).fetchone()
            tried = row["attempts"] + 1
            gave_up = gives_up(tried, now - row["pending_since"], policy)
            next_attempt_at = now + backoff_delay(tried, policy.backoff_initial_s, policy.backoff_max_s)
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, error = ?, updated_at = ?"
                " WHERE series_uid = ? AND destination = ?",
                (DeliveryState.FAILED if gave_up else DeliveryState.PENDING, tried, next_attempt_at, error, now,
                 series_uid, destination),
            )
            return FailedAttempt(self._settle(db, series_uid, now), gave_up, next_attempt_at)

    def pending_deliveries(self) -> dict[str, tuple[int, float]]:
        """Per destination: deliveries waiting to be sent, and the earliest next attempt among them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT d.destination, count(*), min(d.next_attempt_at) FROM deliveries d JOIN series s"
                " USING (series_uid) WHERE s.state = ? AND d.state = ? GROUP BY d.destination",
                (SeriesState.SENDING, DeliveryState.PENDING),
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def _settle(self, db: sqlite3.Connection, series_uid: str, now: float) -> SeriesState:
        rows = db.execute(
            "SELECT destination, state, attempts, error FROM deliveries WHERE series_uid = ?", (series_uid,)
        ).fetchall()
        if any(r["state"] == DeliveryState.PENDING for r in rows):
            return SeriesState.SENDING
        failures = [f"{r['destination']}: {r['error']} (after {r['attempts']} attempts)"
                    for r in rows if r["state"] == DeliveryState.FAILED]
        if failures:
            return self._finish(db, series_uid, SeriesState.FAILED, "; ".join(failures), now)
        return self._finish(db, series_uid, SeriesState.DONE, None, now)

    # --- restart, admin, retention --------------------------------------------------------------

    def recover(self, now: float | None = None) -> int:
        """After a crash or restart: interrupted denoising runs are queued again. Returns how many.

        Series still being received restart their quiet period: their sender was cut off by our
        downtime and will resend the rest, so queueing them at once would deliver a partial series.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute("UPDATE series SET last_received_at = ?, updated_at = ? WHERE state = ?",
                       (now, now, SeriesState.RECEIVED))
            return db.execute(
                "UPDATE series SET state = ?, queued_at = coalesce(queued_at, ?), started_at = NULL, updated_at = ?"
                " WHERE state = ?",
                (SeriesState.QUEUED, now, now, SeriesState.DENOISING),
            ).rowcount

    def retry(self, series_uid: str, now: float | None = None) -> SeriesState:
        """Give a failed series another go: sending again when its derived series is still in the
        outbox, otherwise denoising again. Returns the new state."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT state, outbox, slices FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                raise JobStoreError(f"no series {series_uid} in the queue (see 'ldct-node queue list')")
            if row["state"] != SeriesState.FAILED:
                raise JobStoreError(f"series {series_uid} is {row['state']}, only failed series can be retried")
            failed = db.execute(
                "SELECT count(*) FROM deliveries WHERE series_uid = ? AND state = ?", (series_uid, DeliveryState.FAILED)
            ).fetchone()[0]
            if failed and outputs_complete(row["outbox"], row["slices"]):
                db.execute(
                    "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, pending_since = ?, updated_at = ?"
                    " WHERE series_uid = ? AND state = ?",
                    (DeliveryState.PENDING, now, now, now, series_uid, DeliveryState.FAILED),
                )
                state = SeriesState.SENDING
            else:
                db.execute("DELETE FROM deliveries WHERE series_uid = ?", (series_uid,))
                forget_stream(db, series_uid)
                state = SeriesState.QUEUED
            # A resumed send counts as started now, so instances arriving during it get a run of their own.
            started = now if state == SeriesState.SENDING else None
            db.execute(
                "UPDATE series SET state = ?, queued_at = ?, started_at = ?, finished_at = NULL, reason = NULL,"
                " updated_at = ? WHERE series_uid = ?",
                (state, now, started, now, series_uid),
            )
        return state

    def remove(self, series_uid: str) -> SeriesRow:
        """Forget a series that nobody is working on; the caller removes its files."""
        with self.transaction() as db:
            row = self._row(db, series_uid)
            if row is None:
                raise JobStoreError(f"no series {series_uid} in the queue (see 'ldct-node queue list')")
            if row.state in ACTIVE:
                raise JobStoreError(f"series {series_uid} is {row.state}; wait until it is done or failed, or stop the node")
            for table in ("deliveries", "instances", "series", *STREAM_TABLE_NAMES):
                db.execute(f"DELETE FROM {table} WHERE series_uid = ?", (series_uid,))
        return row

    def finished_before(self, cutoff: float) -> list[SeriesRow]:
        """Finished series whose files are still on disk and that ended before `cutoff` (retention)."""
        with self._lock:
            uids = [r[0] for r in self._db.execute(
                "SELECT series_uid FROM series WHERE state = ? AND cleaned_at IS NULL AND finished_at <= ?",
                (SeriesState.DONE, cutoff),
            )]
            return [self._row(self._db, uid) for uid in uids]

    def cleaned(self, series_uid: str, now: float | None = None) -> None:
        """The series' spooled input is gone: forget its instance rows so a restart does not re-index them,
        keeping their number on the series row for `queue list`."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE series SET instances = (SELECT count(*) FROM instances WHERE series_uid = ?), cleaned_at = ?,"
                " updated_at = ? WHERE series_uid = ?",
                (series_uid, now, now, series_uid),
            )
            db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            forget_stream(db, series_uid)

    def series(self, series_uid: str) -> SeriesRow | None:
        with self._lock:
            return self._row(self._db, series_uid)

    def jobs(self, states: tuple[SeriesState, ...] = tuple(SeriesState)) -> list[SeriesRow]:
        with self._lock:
            uids = [r[0] for r in self._db.execute(
                f"SELECT series_uid FROM series WHERE state IN ({','.join('?' * len(states))})"
                " ORDER BY first_received_at, series_uid",
                states,
            )]
            return [self._row(self._db, uid) for uid in uids]

    def depth(self) -> dict[SeriesState, int]:
        """Number of series per state (every state present, zero included)."""
        with self._lock:
            counts = dict(self._db.execute("SELECT state, count(*) FROM series GROUP BY state").fetchall())
        return {state: counts.get(state, 0) for state in SeriesState}

    @staticmethod
    def _row(db: sqlite3.Connection, series_uid: str) -> SeriesRow | None:
        row = db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is None:
            return None
        fields = dict(row)
        fields["state"] = SeriesState(fields["state"])
        fields["set_aside"] = json.loads(fields["set_aside"]) if fields.get("set_aside") else []
        # The column is set only once retention has removed the instance rows; until then they are counted.
        if fields["instances"] is None:
            fields["instances"] = db.execute(
                "SELECT count(*) FROM instances WHERE series_uid = ?", (series_uid,)).fetchone()[0]
        fields["streamed"] = db.execute(
            "SELECT count(*) FROM streamed WHERE series_uid = ? AND derived IS NOT NULL", (series_uid,)).fetchone()[0]
        deliveries = [
            Delivery(r["destination"], DeliveryState(r["state"]), r["attempts"], r["next_attempt_at"],
                     r["pending_since"], r["sent"], r["error"])
            for r in db.execute(
                "SELECT * FROM deliveries WHERE series_uid = ? ORDER BY destination", (series_uid,)
            )
        ]
        return SeriesRow(deliveries=deliveries, **fields)


def forget_stream(db: sqlite3.Connection, series_uid: str) -> None:
    """Drop what streaming recorded for the series: its run is over, or its outputs are derived again."""
    for table in STREAM_TABLE_NAMES:
        db.execute(f"DELETE FROM {table} WHERE series_uid = ?", (series_uid,))


def open_job_store(database: Path, now: float | None = None) -> JobStore:
    """The node's queue. A damaged file is moved aside and an empty queue started in its place;
    the caller rebuilds it from the spool (JobStore.reindex)."""
    try:
        return JobStore(database)
    except JobStoreDamaged as exc:
        aside = set_aside(database, time.time() if now is None else now)
        log.error("queue database damaged: moved aside, rebuilding the queue from the spool", moved_to=str(aside),
                  error=str(exc))
        return JobStore(database)


def set_aside(database: Path, now: float) -> Path:
    """Rename the database (and its WAL, which belongs to it alone) to <name>.damaged-<UTC time>."""
    aside = database.with_name(f"{database.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}")
    for suffix in ("", "-wal", "-shm"):
        part = database.with_name(database.name + suffix)
        if part.exists():
            part.replace(aside.with_name(aside.name + suffix))
    return aside


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to _SCHEMA: the node must start on its old queue."""
    have = {r["name"] for r in db.execute("PRAGMA table_info(series)")}
    if "instances" not in have:
        db.execute("ALTER TABLE series ADD COLUMN instances INTEGER")
    if "set_aside" not in have:
        db.execute("ALTER TABLE series ADD COLUMN set_aside TEXT")
    if "worker" not in have:
        db.execute("ALTER TABLE series ADD COLUMN worker TEXT")
    if "pending_since" not in {r["name"] for r in db.execute("PRAGMA table_info(deliveries)")}:
        db.execute("ALTER TABLE deliveries ADD COLUMN pending_since REAL")
        # The last attempt is the closest record of how long an earlier version has been trying.
        db.execute("UPDATE deliveries SET pending_since = updated_at")
    key = [r["name"] for r in sorted(db.execute("PRAGMA table_info(instances)"), key=lambda r: r["pk"]) if r["pk"]]
    if key == ["sop_uid"]:
        # Keyed by SOP Instance UID alone, a UID reused by a second series took the row from the first.
        db.executescript(
            "BEGIN IMMEDIATE;"
            " ALTER TABLE instances RENAME TO instances_by_sop_uid;"
            f" {_INSTANCES_TABLE}"
            " INSERT INTO instances (series_uid, sop_uid, path, received_at)"
            "  SELECT series_uid, sop_uid, path, received_at FROM instances_by_sop_uid;"
            " DROP TABLE instances_by_sop_uid;"
            " COMMIT;"
        )


def _set_aside_json(items: list[tuple[str, str]]) -> str | None:
    """The set_aside column: a JSON list of {"sop_uid", "reason"}; NULL when nothing was set aside."""
    return json.dumps([{"sop_uid": uid, "reason": reason} for uid, reason in items]) if items else None


def outputs_complete(outbox: str | None, slices: int | None) -> bool:
    """The derived series of a run is still whole in the outbox (so a retry need not denoise again)."""
    if not outbox or not slices:
        return False
    return sum(1 for _ in Path(outbox).glob("*.dcm")) == slices
