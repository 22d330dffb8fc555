"""Housekeeping: series assembly (a series quiet for ``queue.quiet_period_s`` becomes ``queued``)
and retention (spooled input and derived output of series done ``storage.keep_days`` ago are removed),
in a thread of their own so that a long denoise neither delays assembly nor stretches the measured
quiet period."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from ldct_node.logs import get_logger
from ldct_node.node.jobs import KEPT_IN_OUTBOX, JobStore, SeriesState
from ldct_node.node.spool import Spool
from ldct_node.polling import PollingThread

log = get_logger(__name__)

SECONDS_PER_DAY = 86400.0


class Housekeeper(PollingThread):
    """Series assembly (quiet series become queued) and retention. Apart from the worker, so that a
    long denoise neither delays assembly nor stretches the measured quiet period."""

    def __init__(self, queue: JobStore, spool: Spool, quiet_period_s: float, keep_days: float, poll_interval_s: float):
        super().__init__("ldct-housekeeping", poll_interval_s)
        self.queue = queue
        self.spool = spool
        self.quiet_period_s = quiet_period_s
        self.keep_days = keep_days

    def step(self) -> bool:
        """One round; always False: what is due is done in one round, the next waits an interval."""
        try:
            for uid in self.queue.promote_quiet(self.quiet_period_s):
                log.info("series complete", series_uid=uid)
            remove_delivered(self.queue, self.spool, self.keep_days)
        except (OSError, sqlite3.Error) as exc:
            # Retention failing (a file held open, permissions) or the database briefly locked by
            # an admin command must not stop series assembly for good.
            log.error("housekeeping failed, will try again", error=str(exc))
        return False


def remove_delivered(queue: JobStore, spool: Spool, keep_days: float, now: float | None = None) -> list[str]:
    """Retention: delete spooled input and derived output of series done more than keep_days ago.
    A series kept in the outbox (no destination) keeps its output; failed series keep everything
    so that `ldct-node queue retry` can still work. Returns the series cleaned."""
    now = time.time() if now is None else now
    cleaned = []
    for row in queue.finished_before(now - keep_days * SECONDS_PER_DAY):
        with spool.series_lock(row.series_uid):
            current = queue.series(row.series_uid)
            if current is None or current.state != SeriesState.DONE or current.cleaned_at is not None:
                continue  # a new run started meanwhile; its files are needed
            spooled = spool.series_dir(row.series_uid)
            removed = {"spool_removed": str(spooled), "spool_files": count_files(spooled)}
            spool.remove_series(row.series_uid)
            if row.outbox and row.reason != KEPT_IN_OUTBOX:
                removed.update(outbox_removed=row.outbox, outbox_files=count_files(Path(row.outbox)))
                shutil.rmtree(row.outbox, ignore_errors=True)
            elif row.outbox:
                removed["outbox_kept"] = row.outbox
            queue.cleaned(row.series_uid)
        cleaned.append(row.series_uid)
        log.info("series files removed (retention)", series_uid=row.series_uid, keep_days=keep_days, **removed)
    return cleaned


def count_files(folder: Path) -> int:
    """Files directly in folder; 0 when it is gone (removed by hand, or an earlier cleaning cut short)."""
    return sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
