"""`ldct-node queue list|retry|purge`: look at and manage the node's jobs.

Works on the queue database of the configuration given (``--config``, else the embedded
default), alongside a running node: SQLite's WAL lets both use it at once, and the node picks up
a retried series at its next poll.

    ldct-node queue list [--json] [--state STATE ...] [--config FILE]
    ldct-node queue retry (SERIES_UID ... | --all-failed) [--config FILE]
    ldct-node queue purge (SERIES_UID ... | --state STATE ...) [--config FILE]

DETAIL shows, after deliveries and reason, the instances of a run the worker set aside because it
could not use them ("set aside N: SOP Instance UID: reason; ..."); ``--json`` has them all under
``set_aside``. With a broker (``[broker] url``), DETAIL starts with ``worker=NAME``, the worker host
that holds the series being denoised (or derived the finished run); ``--json`` has it as ``worker``.
With ``queue.stream``, a series still arriving shows ``streamed=N``, the slices derived (and sent
on) so far; ``--json`` has it as ``streamed``. ``retry`` sends a failed series again when its derived series is still in the outbox, otherwise
denoises it again. ``purge`` forgets series and deletes their spooled input and derived output;
series being denoised or sent are refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from ldct_node.config import load_config
from ldct_node.errors import CommandError
from ldct_node.node.jobs import ACTIVE, Delivery, DeliveryState, JobStore, JobStoreDamaged, JobStoreError, SeriesRow, SeriesState
from ldct_node.node.spool import Spool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration (default: embedded default)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    lister = sub.add_parser("list", parents=[common], help="show the jobs")
    lister.add_argument("--json", action="store_true", help="one JSON array of jobs (for scripts and tests)")
    # Plain strings: argparse shows the choices with repr() when one is wrong.
    lister.add_argument("--state", action="append", choices=[s.value for s in SeriesState],
                        help="only jobs in this state (repeatable)")
    retry = sub.add_parser("retry", parents=[common], help="send or denoise failed series again")
    retry.add_argument("series", nargs="*", metavar="SERIES_UID")
    retry.add_argument("--all-failed", action="store_true", help="every failed series")
    purge = sub.add_parser("purge", parents=[common], help="forget series and delete their files")
    purge.add_argument("series", nargs="*", metavar="SERIES_UID")
    purge.add_argument("--state", action="append", choices=[s.value for s in SeriesState if s not in ACTIVE],
                       help="every series in this state (repeatable)")


# Instances set aside named in the table's DETAIL; --json lists them all.
SET_ASIDE_SHOWN = 3


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def format_table(rows: list[SeriesRow]) -> str:
    if not rows:
        return "no jobs"
    lines = [f"{'SERIES UID':<64}  {'STATE':<9}  {'RUN':>3}  {'INST':>4}  {'LAST RECEIVED (UTC)':<19}  DETAIL"]
    for row in rows:
        detail = row.reason or ""
        if row.deliveries:
            detail = "; ".join(delivery_detail(d) for d in row.deliveries) + (f"  {detail}" if detail else "")
        if row.set_aside:
            detail = (f"{detail}  " if detail else "") + set_aside_detail(row.set_aside)
        if row.worker:
            detail = f"worker={row.worker}" + (f"  {detail}" if detail else "")
        if row.streamed and row.state in (SeriesState.RECEIVED, SeriesState.QUEUED):
            detail = f"streamed={row.streamed}" + (f"  {detail}" if detail else "")
        lines.append(f"{row.series_uid:<64}  {row.state:<9}  {row.run:>3}  {row.instances:>4}  "
                     f"{_when(row.last_received_at):<19}  {detail}")
    return "\n".join(lines)


def delivery_detail(d: Delivery) -> str:
    """destination=state/attempts, and for one that is retrying: when it is next tried, and why it failed."""
    text = f"{d.destination}={d.state}/{d.attempts}"
    if d.state == DeliveryState.PENDING and d.attempts:
        text += f" next {_when(d.next_attempt_at)} ({d.error})"
    return text


def set_aside_detail(items: list[dict], shown: int = SET_ASIDE_SHOWN) -> str:
    """'set aside N: UID: reason; ...' for the instances of a run the worker could not use (the first few)."""
    listed = "; ".join(f"{item['sop_uid']}: {item['reason']}" for item in items[:shown])
    more = f"; ... and {len(items) - shown} more" if len(items) > shown else ""
    return f"set aside {len(items)}: {listed}{more}"


def _selected(queue: JobStore, uids: list[str], states: list[SeriesState] | None) -> list[str]:
    if bool(uids) == bool(states):
        raise CommandError("name series UIDs or a selection flag, not both and not neither")
    return uids or [row.series_uid for row in queue.jobs(tuple(states))]


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not cfg.storage.database.is_file():
        raise CommandError(f"no queue database at {cfg.storage.database}: has the node run with this configuration?")
    try:
        queue = JobStore(cfg.storage.database)
    except JobStoreDamaged as exc:
        raise CommandError(f"{exc}; restart the node: it sets the file aside and rebuilds the queue from the spool") from None
    try:
        if args.action == "list":
            rows = queue.jobs(tuple(map(SeriesState, args.state)) if args.state else tuple(SeriesState))
            print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else format_table(rows))
            return 0
        if args.action == "retry":
            for uid in _selected(queue, args.series, [SeriesState.FAILED] if args.all_failed else None):
                print(f"{uid}: {queue.retry(uid)}")
            return 0
        spool = Spool(cfg.storage.spool_dir)
        for uid in _selected(queue, args.series, [SeriesState(s) for s in args.state] if args.state else None):
            row = queue.remove(uid)
            spool.remove_series(uid)
            if row.outbox:
                shutil.rmtree(row.outbox, ignore_errors=True)
            print(f"{uid}: purged")
        return 0
    except JobStoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        queue.close()
