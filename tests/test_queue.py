"""The SQLite job queue: every state transition of a series, restart recovery, retry and retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ldct_node.config import SendSettings
from ldct_node.node.jobs import (
    KEPT_IN_OUTBOX,
    DeliveryState,
    JobStore,
    JobStoreError,
    RetryPolicy,
    SeriesState,
    backoff_delay,
    gives_up,
    outputs_complete,
)
from ldct_node.node.send import retry_policy
from ldct_node.node.spool import Spool

S = "1.2.3"
T0 = 1_000_000.0
THREE_TRIES = RetryPolicy(backoff_initial_s=5, backoff_max_s=60, give_up_after_s=86400, max_attempts=3)
ONE_TRY = RetryPolicy(backoff_initial_s=5, backoff_max_s=60, give_up_after_s=86400, max_attempts=1)


@pytest.fixture
def queue(tmp_path):
    q = JobStore(tmp_path / "queue.sqlite3")
    yield q
    q.close()


def add(queue: JobStore, tmp_path: Path, sop: str, now: float = T0, series: str = S) -> Path:
    path = tmp_path / series / f"{sop}.dcm"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"x")
    queue.add_instance(series, sop, path, now=now)
    return path


def outbox_with(tmp_path: Path, files: int) -> Path:
    out = tmp_path / "outbox" / "9.9"
    out.mkdir(parents=True)
    for i in range(files):
        (out / f"9.9.{i}.dcm").write_bytes(b"y")
    return out


def to_sending(queue, tmp_path, destinations=("pacs",), files=2) -> Path:
    add(queue, tmp_path, "1.1")
    queue.promote_quiet(10, now=T0 + 10)
    queue.claim_next(now=T0 + 11)
    out = outbox_with(tmp_path, files)
    queue.denoised(S, "9.9", out, files, 0, 1.5, list(destinations), now=T0 + 12)
    return out


def test_backoff_doubles_from_initial_and_is_capped():
    assert [backoff_delay(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_first_instance_creates_a_received_series_and_resends_are_idempotent(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    add(queue, tmp_path, "1.1", now=T0 + 1)
    row = queue.series(S)
    assert (row.state, row.instances, row.run, row.last_received_at) == (SeriesState.RECEIVED, 1, 1, T0 + 1)


def test_series_is_queued_only_after_the_quiet_period(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    assert queue.promote_quiet(10, now=T0 + 9.9) == []
    assert queue.promote_quiet(10, now=T0 + 10) == [S]
    assert queue.series(S).state == SeriesState.QUEUED


def test_instance_for_a_queued_series_sends_it_back_to_waiting(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    queue.promote_quiet(10, now=T0 + 10)
    add(queue, tmp_path, "1.2", now=T0 + 11)
    assert queue.series(S).state == SeriesState.RECEIVED


def test_claim_hands_out_the_oldest_queued_series_with_its_existing_files(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    gone = add(queue, tmp_path, "1.2")
    gone.unlink()
    add(queue, tmp_path, "2.1", now=T0 + 5, series="2.2")
    queue.promote_quiet(10, now=T0 + 20)
    job = queue.claim_next(now=T0 + 21)
    assert (job.series_uid, [p.name for p in job.sources]) == (S, ["1.1.dcm"])
    assert queue.series(S).state == SeriesState.DENOISING
    assert queue.claim_next(now=T0 + 22).series_uid == "2.2"
    assert queue.claim_next(now=T0 + 23) is None


def test_restart_recovery_requeues_interrupted_denoising_and_leaves_sending_alone(queue, tmp_path):
    to_sending(queue, tmp_path)
    add(queue, tmp_path, "3.1", series="3.3")
    queue.promote_quiet(10, now=T0 + 10)
    queue.claim_next()
    assert queue.recover() == 1
    assert (queue.series("3.3").state, queue.series(S).state) == (SeriesState.QUEUED, SeriesState.SENDING)


def test_state_survives_closing_and_reopening_the_database(tmp_path):
    first = JobStore(tmp_path / "q.sqlite3")
    add(first, tmp_path, "1.1")
    first.close()
    again = JobStore(tmp_path / "q.sqlite3")
    assert again.series(S).state == SeriesState.RECEIVED
    again.close()


def test_denoised_without_destination_is_done_and_kept_in_outbox(queue, tmp_path):
    to_sending(queue, tmp_path, destinations=())
    row = queue.series(S)
    assert (row.state, row.reason, row.derived_series_uid, row.slices) == (SeriesState.DONE, KEPT_IN_OUTBOX, "9.9", 2)


def test_delivered_to_every_destination_is_done(queue, tmp_path):
    to_sending(queue, tmp_path, destinations=("a", "b"))
    assert [d.destination for d in queue.due_deliveries(now=T0 + 12)] == ["a", "b"]
    assert queue.delivered(S, "a", 2) == SeriesState.SENDING
    assert queue.delivered(S, "b", 2) == SeriesState.DONE


def test_failed_attempt_backs_off_then_gives_up_with_the_reason(queue, tmp_path):
    to_sending(queue, tmp_path)
    assert queue.delivery_failed(S, "pacs", "refused", THREE_TRIES, now=T0 + 20).series_state == SeriesState.SENDING
    (delivery,) = queue.series(S).deliveries
    assert (delivery.state, delivery.attempts, delivery.next_attempt_at) == (DeliveryState.PENDING, 1, T0 + 25)
    assert queue.due_deliveries(now=T0 + 24) == []
    queue.delivery_failed(S, "pacs", "refused", THREE_TRIES, now=T0 + 25)
    failed = queue.delivery_failed(S, "pacs", "still refused", THREE_TRIES, now=T0 + 35)
    assert failed.series_state == SeriesState.FAILED
    row = queue.series(S)
    assert row.reason == "pacs: still refused (after 3 attempts)"


def test_retry_of_a_send_failure_sends_again_when_outputs_are_kept(queue, tmp_path):
    to_sending(queue, tmp_path)
    queue.delivery_failed(S, "pacs", "down", ONE_TRY)
    assert queue.retry(S) == SeriesState.SENDING
    (delivery,) = queue.series(S).deliveries
    assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)


def test_retry_denoises_again_when_outputs_are_gone(queue, tmp_path):
    out = to_sending(queue, tmp_path)
    queue.delivery_failed(S, "pacs", "down", ONE_TRY)
    next(out.iterdir()).unlink()
    assert queue.retry(S) == SeriesState.QUEUED
    assert queue.series(S).deliveries == []


def test_retry_refuses_unknown_and_unfailed_series(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    with pytest.raises(JobStoreError, match="only failed"):
        queue.retry(S)
    with pytest.raises(JobStoreError, match="no series"):
        queue.retry("7.7")


def test_instance_after_done_opens_a_new_run_of_the_same_series(queue, tmp_path):
    to_sending(queue, tmp_path, destinations=())
    add(queue, tmp_path, "1.5", now=T0 + 100)
    row = queue.series(S)
    assert (row.state, row.run, row.reason) == (SeriesState.RECEIVED, 2, None)


def test_instance_arriving_mid_run_gets_its_own_run_after_this_one(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    queue.promote_quiet(10, now=T0 + 10)
    queue.claim_next(now=T0 + 11)
    add(queue, tmp_path, "1.2", now=T0 + 12)
    assert queue.series(S).state == SeriesState.DENOISING
    assert queue.finish(S, SeriesState.FAILED, "boom", now=T0 + 13) == SeriesState.RECEIVED
    assert queue.series(S).run == 2


def test_reindex_restores_spooled_files_whose_commit_was_lost(queue, tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.write_instance(S, "1.1", b"x")
    spool.write_instance(S, "1.2", b"x")
    queue.add_instance(S, "1.1", spool.path_for(S, "1.1"))
    assert queue.reindex(spool.scan()) == 1
    assert queue.series(S).instances == 2


def test_remove_refuses_a_series_being_worked_on(queue, tmp_path):
    to_sending(queue, tmp_path)
    with pytest.raises(JobStoreError, match="sending"):
        queue.remove(S)


def test_finished_series_become_due_for_retention_once_and_cleaning_drops_instances(queue, tmp_path):
    to_sending(queue, tmp_path)
    queue.delivered(S, "pacs", 2, now=T0 + 50)
    assert queue.finished_before(T0 + 49) == []
    assert [r.series_uid for r in queue.finished_before(T0 + 50)] == [S]
    queue.cleaned(S)
    assert queue.finished_before(T0 + 50) == []
    assert not queue._db.execute("SELECT * FROM instances").fetchall()


def test_a_cleaned_series_keeps_its_instance_count(queue, tmp_path):
    add(queue, tmp_path, "1.2")
    to_sending(queue, tmp_path)
    queue.delivered(S, "pacs", 2, now=T0 + 50)
    queue.cleaned(S)
    assert queue.series(S).instances == 2
    assert [r.instances for r in queue.jobs()] == [2]


def test_a_new_run_after_cleaning_counts_only_its_own_instances(queue, tmp_path):
    add(queue, tmp_path, "1.2")
    to_sending(queue, tmp_path)
    queue.delivered(S, "pacs", 2, now=T0 + 50)
    queue.cleaned(S)
    add(queue, tmp_path, "1.9", now=T0 + 60)
    assert (queue.series(S).run, queue.series(S).instances) == (2, 1)


def test_a_queue_database_of_an_earlier_version_opens_and_keeps_its_series(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE series (series_uid TEXT PRIMARY KEY, state TEXT NOT NULL, run INTEGER NOT NULL DEFAULT 1,"
        " first_received_at REAL NOT NULL, last_received_at REAL NOT NULL, queued_at REAL, started_at REAL,"
        " denoised_at REAL, finished_at REAL, derived_series_uid TEXT, outbox TEXT, slices INTEGER, skipped INTEGER,"
        " denoise_seconds REAL, reason TEXT, cleaned_at REAL, updated_at REAL NOT NULL)")
    db.execute("INSERT INTO series (series_uid, state, first_received_at, last_received_at, updated_at)"
               " VALUES (?, ?, ?, ?, ?)", (S, SeriesState.RECEIVED, T0, T0, T0))
    db.commit()
    db.close()
    queue = JobStore(path)
    add(queue, tmp_path, "1.1")
    assert (queue.series(S).state, queue.series(S).instances) == (SeriesState.RECEIVED, 1)
    queue.close()


def test_depth_counts_every_state(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    assert queue.depth() == {"received": 1, "queued": 0, "denoising": 0, "sending": 0, "done": 0, "failed": 0}


def test_outputs_complete_needs_every_slice(tmp_path):
    out = outbox_with(tmp_path, 2)
    assert outputs_complete(str(out), 2)
    assert not outputs_complete(str(out), 3)
    assert not outputs_complete(None, 2)


def test_restart_gives_a_partly_received_series_a_fresh_quiet_period(queue, tmp_path):
    add(queue, tmp_path, "1.1", now=T0)
    queue.recover(now=T0 + 100)
    assert queue.promote_quiet(10, now=T0 + 105) == []
    assert queue.promote_quiet(10, now=T0 + 111) == [S]


def test_a_sop_instance_uid_reused_by_a_second_series_costs_the_first_no_slice(queue, tmp_path):
    first = [add(queue, tmp_path, sop, series="1.2.3") for sop in ("1.1", "1.2", "1.3")]
    with capture_logs() as logs:
        second = add(queue, tmp_path, "1.2", series="4.5.6")
    assert (queue.series("1.2.3").instances, queue.series("4.5.6").instances) == (3, 1)
    queue.promote_quiet(10, now=T0 + 10)
    jobs = {job.series_uid: job.sources for job in (queue.claim_next(now=T0 + 11), queue.claim_next(now=T0 + 11))}
    assert jobs == {"1.2.3": first, "4.5.6": [second]}
    (line,) = [e for e in logs if e["event"] == "SOP Instance UID reused in another series, kept in both"]
    assert (line["sop_uid"], line["series_uid"], line["other_series_uids"]) == ("1.2", "4.5.6", ["1.2.3"])


def test_reindex_restores_a_reused_sop_instance_uid_in_each_series(queue, tmp_path):
    spool = Spool(tmp_path / "spool")
    for series in ("1.2.3", "4.5.6"):
        spool.write_instance(series, "1.1", b"x")
    assert queue.reindex(spool.scan()) == 2
    assert queue.reindex(spool.scan()) == 0
    assert (queue.series("1.2.3").instances, queue.series("4.5.6").instances) == (1, 1)


def test_an_instances_table_keyed_by_sop_uid_alone_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL,"
               " received_at REAL NOT NULL)")
    db.execute("CREATE INDEX instances_by_series ON instances (series_uid)")
    db.execute("INSERT INTO instances VALUES ('1.1', ?, '/spool/1.1.dcm', ?)", (S, T0))
    db.commit()
    db.close()
    queue = JobStore(path)
    add(queue, tmp_path, "1.1", series="4.5.6")
    with sqlite3.connect(path) as check:
        rows = check.execute("SELECT series_uid, sop_uid FROM instances ORDER BY series_uid").fetchall()
    assert rows == [(S, "1.1"), ("4.5.6", "1.1")]
    queue.close()


def test_the_default_schedule_retries_at_most_five_minutes_apart_for_a_day_before_failing(queue, tmp_path):
    to_sending(queue, tmp_path)  # pending since T0 + 12
    policy, now, attempts = retry_policy(SendSettings()), T0 + 12, []
    while True:
        outcome = queue.delivery_failed(S, "pacs", "PACS down", policy, now=now)
        attempts.append(now)
        if outcome.gave_up:
            break
        assert outcome.next_attempt_at - now <= 300
        now = outcome.next_attempt_at
    assert attempts[-1] - attempts[0] >= 86400
    assert queue.series(S).state == SeriesState.FAILED


def test_a_delivery_pending_for_give_up_after_s_is_given_up_whatever_its_tries():
    policy = RetryPolicy(backoff_initial_s=1, backoff_max_s=1, give_up_after_s=60)
    assert not gives_up(tried=10_000, pending_for_s=59.9, policy=policy)
    assert gives_up(tried=1, pending_for_s=60, policy=policy)
    assert gives_up(tried=3, pending_for_s=0, policy=RetryPolicy(1, 1, 60, max_attempts=3))


def test_retry_restarts_the_give_up_clock(queue, tmp_path):
    to_sending(queue, tmp_path)
    short = RetryPolicy(backoff_initial_s=1, backoff_max_s=1, give_up_after_s=10)
    assert queue.delivery_failed(S, "pacs", "down", short, now=T0 + 30).gave_up
    queue.retry(S, now=T0 + 100)
    assert not queue.delivery_failed(S, "pacs", "down", short, now=T0 + 105).gave_up


def test_pending_deliveries_name_each_destination_with_its_next_attempt(queue, tmp_path):
    to_sending(queue, tmp_path, destinations=("a", "b"))
    queue.delivery_failed(S, "a", "down", THREE_TRIES, now=T0 + 20)
    assert queue.pending_deliveries() == {"a": (1, T0 + 25), "b": (1, T0 + 12)}
    queue.delivered(S, "b", 2, now=T0 + 21)
    assert queue.pending_deliveries() == {"a": (1, T0 + 25)}


def test_deliveries_of_an_earlier_version_get_a_give_up_clock(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE deliveries (series_uid TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,"
               " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, sent INTEGER, error TEXT,"
               " updated_at REAL NOT NULL, PRIMARY KEY (series_uid, destination))")
    db.execute("INSERT INTO deliveries VALUES (?, 'pacs', ?, 2, ?, NULL, 'down', ?)",
               (S, DeliveryState.PENDING, T0 + 20, T0 + 10))
    db.commit()
    db.close()
    queue = JobStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT pending_since FROM deliveries").fetchone() == (T0 + 10,)
    db.close()
    queue.close()


def test_the_worker_host_that_took_a_run_is_recorded_only_while_that_run_is_denoised(queue, tmp_path):
    add(queue, tmp_path, "1.1")
    queue.promote_quiet(10, now=T0 + 10)
    assert not queue.taken_by(S, 1, "gpu-1")  # queued: nobody may hold it yet
    queue.claim_next(now=T0 + 11)
    assert queue.is_denoising(S, 1) and not queue.is_denoising(S, 2)
    assert not queue.taken_by(S, 2, "gpu-1")  # a run that does not exist
    assert queue.taken_by(S, 1, "gpu-2")
    assert queue.series(S).worker == "gpu-2"
    queue.finish(S, SeriesState.DONE, "ok", now=T0 + 12)
    assert not queue.is_denoising(S, 1)
    assert queue.series(S).worker == "gpu-2"  # who derived the finished run stays visible
    add(queue, tmp_path, "1.2", now=T0 + 13)  # a new run: nobody holds it
    assert queue.series(S).worker is None


def test_a_series_table_without_the_worker_column_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    queue = JobStore(path)
    add(queue, tmp_path, "1.1")
    queue.close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE series DROP COLUMN worker")
    queue = JobStore(path)
    assert queue.series(S).worker is None
    queue.close()
