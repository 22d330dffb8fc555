"""Streaming (``queue.stream = true``): denoise and send a series while it is still arriving.

Without it a series waits for its quiet period, then is denoised and sent whole. With it the
worker, whenever no complete series waits, takes the instances of arriving series that are not
derived yet (up to ``inference.chunk_slices`` at a time, oldest series first) and derives them into
the series' outbox folder; the sender C-STOREs each chunk to every destination as soon as it is
written. The quiet period then only closes the series: the run that closes it derives what is
left (a slice that came late or out of order included), takes the HU fidelity gate over the whole
series, and the ordinary delivery sends each destination only what streaming did not.

What keeps this exact:

- The derived UIDs are deterministic and the run's creation time is fixed at its first chunk, so
  a slice derived while streaming and one derived when the series closes belong to the same
  derived series, and anything derived or sent twice (a crash between writing or sending and
  recording it) reaches PACS as the same instance again, a replacement, never a copy. A source
  instance received again in the same run (a sender's retry: same SOP Instance UID, so the same
  instance) is not derived again.
- Every chunk is recorded in the job store (tables ``stream_runs``, ``streamed``, ``stream_sent``)
  in one transaction with the fidelity sums so far; after kill -9 the close run trusts only what
  was recorded and whose file exists, and derives the rest.
- The fidelity gate is also applied to the series so far after every chunk: once it is exceeded
  streaming stops for that run ("held", shown by ``queue list`` as the reason) and nothing more is
  sent until the close run has judged the whole series. Slices already sent stay in PACS beside the
  original; a series that fails at the close is reported failed as before.
- A new run of the series (instances after it finished, ``queue retry``) forgets all of it.

Only single-slice models stream (the shipped one): a slice of a model that reads its neighbours
would be derived before a neighbour that arrives later. With such a model, or with ``[broker]``,
series wait for the quiet period as before.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from ldct_node.config import DeriveSettings, FidelitySettings
from ldct_node.dicom.fidelity import FidelityAccumulator
from ldct_node.dicom.series import Skipped, scan_files
from ldct_node.logs import get_logger, one_line
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.denoise_series import Streamed, denoise_instances, output_series_uid
from ldct_node.node.jobs import Job, JobStore, SeriesState, forget_stream
from ldct_node.node.worker import reset_dir

log = get_logger(__name__)

# While these, the series' run may still stream: its chunks may be derived (received) or sent (all three).
_STREAMING = (SeriesState.RECEIVED, SeriesState.QUEUED, SeriesState.DENOISING)


@dataclass(frozen=True)
class Arrived:
    """Instances of one run of a series that streaming has not derived yet."""

    series_uid: str
    run: int
    sources: dict[Path, str]  # spooled file -> SOP Instance UID
    created: datetime | None  # None: the run's first chunk
    fidelity: dict | None


class StreamLedger:
    """Streaming's records, in the job store's database and transactions."""

    def __init__(self, store: JobStore):
        self.store = store

    def next_arrived(self, limit: int) -> Arrived | None:
        """Up to `limit` instances not derived in this run, of the series that began arriving first;
        None when no arriving series has any. An instance received again (a sender's retry) is the
        same instance (same SOP Instance UID) and is not derived again."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT s.series_uid, s.run, r.created, r.fidelity FROM series s"
                " LEFT JOIN stream_runs r USING (series_uid)"
                " WHERE s.state = ? AND r.held IS NULL AND EXISTS (" + _UNDERIVED.format(columns="1", series="s.series_uid") + ")"
                " ORDER BY s.first_received_at, s.series_uid LIMIT 1",
                (SeriesState.RECEIVED,),
            ).fetchone()
            if row is None:
                return None
            uid = row["series_uid"]
            rows = db.execute(_UNDERIVED.format(columns="i.path, i.sop_uid", series="?")
                              + " ORDER BY i.received_at LIMIT ?", (uid, limit)).fetchall()
        created = None if row["created"] is None else datetime.fromtimestamp(row["created"]).astimezone()
        fidelity = None if row["fidelity"] is None else json.loads(row["fidelity"])
        return Arrived(uid, row["run"], {Path(r[0]): r[1] for r in rows}, created, fidelity)

    def record(self, arrived: Arrived, created: datetime, derived: dict[str, Path], set_aside: dict[str, str],
               fidelity: dict, held: str | None) -> bool:
        """A chunk is written: remember it (False, nothing kept, when the run has changed meanwhile)."""
        with self.store.transaction() as db:
            if not _current(db, arrived.series_uid, arrived.run, (SeriesState.RECEIVED, SeriesState.QUEUED)):
                return False
            db.execute(
                "INSERT INTO stream_runs (series_uid, run, created, fidelity, held) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (series_uid) DO UPDATE SET fidelity = excluded.fidelity, held = excluded.held",
                (arrived.series_uid, arrived.run, created.timestamp(), json.dumps(fidelity), held),
            )
            if held:
                _show(db, arrived.series_uid, held)
            rows = [(arrived.series_uid, sop, str(path), None) for sop, path in derived.items()]
            rows += [(arrived.series_uid, sop, None, reason) for sop, reason in set_aside.items()]
            db.executemany("INSERT OR REPLACE INTO streamed (series_uid, sop_uid, derived, reason) VALUES (?, ?, ?, ?)",
                           rows)
        return True

    def hold(self, series_uid: str, run: int, reason: str) -> None:
        """Stop streaming this run; the close run does the rest."""
        with self.store.transaction() as db:
            if _current(db, series_uid, run, _STREAMING):
                db.execute(
                    "INSERT INTO stream_runs (series_uid, run, created, fidelity, held) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (series_uid) DO UPDATE SET held = excluded.held",
                    (series_uid, run, time.time(), json.dumps(FidelityAccumulator().to_state()), reason),
                )
                _show(db, series_uid, reason)

    def for_close(self, job: Job, out_dir: Path) -> Streamed | None:
        """What the run that closes job's series into out_dir can keep; None (and the records dropped)
        when nothing can be: streaming never began, derived nothing, derived into another folder (the
        weights or settings changed), or a file it recorded is gone."""
        with self.store.transaction() as db:
            run = db.execute("SELECT run, created, fidelity FROM stream_runs WHERE series_uid = ?",
                             (job.series_uid,)).fetchone()
            rows = db.execute(
                "SELECT t.sop_uid, t.derived, t.reason, i.path FROM streamed t JOIN instances i USING (series_uid, sop_uid)"
                " WHERE t.series_uid = ?", (job.series_uid,)).fetchall()
            # With nothing derived, the folder may still hold an earlier run's files: the close run starts afresh.
            derived = [Path(r["derived"]) for r in rows if r["derived"] is not None]
            usable = run is not None and run["run"] == job.run and bool(derived) and all(
                path.parent == out_dir and path.is_file() for path in derived)
            if not usable:
                forget_stream(db, job.series_uid)
                return None
        return Streamed(
            job.series_uid,
            {r["sop_uid"]: Path(r["derived"]) for r in rows if r["derived"] is not None},
            [Skipped(Path(r["path"]), r["reason"]) for r in rows if r["derived"] is None],
            json.loads(run["fidelity"]),
            datetime.fromtimestamp(run["created"]).astimezone(),
        )

    def unsent(self, destination: str) -> dict[str, list[Path]]:
        """Per series still streaming (and not held): derived files the destination has not stored."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT t.series_uid, t.derived FROM streamed t JOIN series s USING (series_uid)"
                " JOIN stream_runs r USING (series_uid)"
                f" WHERE s.state IN ({','.join('?' * len(_STREAMING))}) AND r.held IS NULL AND t.derived IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM stream_sent x WHERE x.series_uid = t.series_uid"
                "  AND x.destination = ? AND x.derived = t.derived)"
                " ORDER BY s.first_received_at, t.rowid",
                (*_STREAMING, destination),
            ).fetchall()
        found: dict[str, list[Path]] = {}
        for series_uid, path in rows:
            found.setdefault(series_uid, []).append(Path(path))
        return found

    def sent(self, series_uid: str, destination: str, paths: list[Path]) -> None:
        """The destination stored these files (only those streaming still knows are recorded)."""
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO stream_sent (series_uid, destination, derived) SELECT ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM streamed WHERE series_uid = ? AND derived = ?)",
                [(series_uid, destination, str(p), series_uid, str(p)) for p in paths],
            )

    def sent_to(self, series_uid: str, destination: str) -> set[Path]:
        """What streaming already delivered of the series' current run to the destination."""
        with self.store.transaction() as db:
            return {Path(r[0]) for r in db.execute(
                "SELECT derived FROM stream_sent WHERE series_uid = ? AND destination = ?", (series_uid, destination))}


# The instances of a series that this run has not derived.
_UNDERIVED = (
    "SELECT {columns} FROM instances i LEFT JOIN streamed t ON t.series_uid = i.series_uid AND t.sop_uid = i.sop_uid"
    " WHERE i.series_uid = {series} AND t.sop_uid IS NULL"
)


def _show(db, series_uid: str, held: str) -> None:
    """The series' reason column, which `queue list` shows, until the worker claims the series."""
    db.execute("UPDATE series SET reason = ?, updated_at = ? WHERE series_uid = ?", (held, time.time(), series_uid))


def _current(db, series_uid: str, run: int, states: tuple[SeriesState, ...]) -> bool:
    row = db.execute("SELECT state, run FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
    return row is not None and row["run"] == run and row["state"] in states


class Streamer:
    """The worker's streaming turn: derive one chunk of an arriving series."""

    def __init__(self, ledger: StreamLedger, engine: DenoiseEngine, derive: DeriveSettings,
                 fidelity: FidelitySettings, outbox_root: Path, chunk_written: Callable[[], None] = lambda: None):
        self.ledger = ledger
        self.engine = engine
        self.derive = derive
        self.fidelity = fidelity
        self.outbox_root = outbox_root
        self.chunk_written = chunk_written  # the sender's wake-up

    def step(self) -> bool:
        """Derive up to one chunk; False when no arriving series has anything new."""
        arrived = self.ledger.next_arrived(self.engine.chunk_slices)
        if arrived is None:
            return False
        bound = log.bind(series_uid=arrived.series_uid, run=arrived.run)
        try:
            self._derive(arrived, bound)
        except Exception as exc:  # noqa: BLE001 - the close run derives the series the ordinary way
            reason = f"streaming stopped: {one_line(exc)}"
            bound.warning("streaming stopped for the series", reason=reason)
            self.ledger.hold(arrived.series_uid, arrived.run, reason)
        return True

    def _derive(self, arrived: Arrived, bound) -> None:
        out_dir = self.outbox_root / output_series_uid(arrived.series_uid, self.engine, self.derive)
        if arrived.created is None:
            reset_dir(out_dir)  # files of an earlier run must not be sent with this one
        created = arrived.created or datetime.now().astimezone()
        measured = (FidelityAccumulator(self.fidelity) if arrived.fidelity is None
                    else FidelityAccumulator.from_state(self.fidelity, arrived.fidelity))
        scan = scan_files(list(arrived.sources))
        instances = scan.series.get(arrived.series_uid, [])
        set_aside = {arrived.sources[s.path]: s.reason for s in scan.skipped}
        # Every instance of the chunk must end derived or set aside, or it would be taken again and again.
        set_aside.update({arrived.sources[i.path]: "SeriesInstanceUID differs from the series it was spooled in"
                          for uid, found in scan.series.items() if uid != arrived.series_uid for i in found})
        result = denoise_instances(arrived.series_uid, instances, out_dir, self.engine, self.derive,
                                   fidelity=self.fidelity, measured=measured, created=created)
        set_aside.update({arrived.sources[s.path]: s.reason for s in result.skipped})
        held = result.fidelity_failure and f"streaming held: {result.fidelity_failure} in the slices so far"
        if not self.ledger.record(arrived, created, result.by_source, set_aside, result.measured.to_state(), held):
            return
        (bound.warning if held else bound.info)(
            "chunk derived while receiving", slices=len(result.by_source), set_aside=len(set_aside),
            seconds=round(result.seconds, 3), **({"held": held} if held else {}))
        self.chunk_written()
