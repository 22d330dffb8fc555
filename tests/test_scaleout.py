"""Scale-out over Redis Streams: the message helpers, the head's rules for applying worker results,
the worker's hold on a job (renew, take-over, hand-back) against a real redis-server on loopback, and
a head node with three `ldct-node worker` processes, one of them killed -9 mid-series."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ldct_node import cli
from ldct_node.commands.queue import format_table
from ldct_node.config import BrokerSettings, ConfigError, load_config
from ldct_node.node.broker import (
    BrokerJob,
    Dispatcher,
    JobQueue,
    Result,
    apply_result,
    decode_job,
    decode_result,
    encode_job,
    encode_result,
    redacted,
    staging_dir,
    streams,
)
from ldct_node.node.jobs import Job, JobStore, SeriesState
from ldct_node.node.observe import Metrics
from ldct_node.node.worker import Outcome, OutcomeKind
from tests import peers
from tests.synthetic import ct_series
from tests.test_daemon import config, send, wait_state
from tests.test_send import Pacs

pytestmark = [pytest.mark.peers, pytest.mark.slow]

REDIS_SERVER = Path("/usr/bin/redis-server")
S = "1.2.3"
DERIVED = Outcome(OutcomeKind.DERIVED, derived_series_uid="1.2.3.9", out_dir="/outbox/1.2.3.9.1-0.partial", slices=2,
                  skipped=1, seconds=0.5, set_aside=(("1.2.3.3", "pixel data does not decode"),),
                  log_fields={"mean_hu_change": 0.1})


def derived_in(outbox: Path, entry_id: str = "1-0") -> Outcome:
    """DERIVED, its two files written by a worker into its staging folder for job entry_id."""
    staging = staging_dir(outbox, "1.2.3.9", entry_id)
    staging.mkdir(parents=True)
    for name in ("a.dcm", "b.dcm"):
        (staging / name).write_bytes(b"x")
    return dataclasses.replace(DERIVED, out_dir=str(staging))


# --- messages and settings --------------------------------------------------------------------------


def test_a_job_message_round_trips_with_its_spooled_paths():
    fields = encode_job(Job(S, 2, [Path("/spool/1.2.3/a.dcm"), Path("/spool/1.2.3/b.dcm")]), Path("/outbox"))
    assert all(isinstance(v, str) for v in fields.values())  # what a Redis stream entry holds
    assert decode_job(fields) == BrokerJob(S, 2, [Path("/spool/1.2.3/a.dcm"), Path("/spool/1.2.3/b.dcm")], Path("/outbox"))


@pytest.mark.parametrize("outcome", [None, DERIVED, Outcome(OutcomeKind.FAILED, "ValueError: bad slice")])
def test_a_result_message_round_trips_started_and_every_outcome(outcome):
    result = Result(S, 3, "gpu-1", outcome)
    assert decode_result(encode_result(result)) == result


def test_a_broker_url_is_logged_without_its_password():
    assert redacted("redis://:s3cret@redis.example:6379/0") == "redis://***@redis.example:6379/0"
    assert redacted("redis://localhost:6379") == "redis://localhost:6379"


def test_broker_settings_default_to_no_broker_and_a_fifth_of_the_timeout_as_heartbeat():
    settings = load_config().broker
    assert settings.url == "" and settings.heartbeat_interval_s == 60.0
    assert BrokerSettings(visibility_timeout_s=10, heartbeat_s=1).heartbeat_interval_s == 1


@pytest.mark.parametrize("table, key", [
    ('url = "http://redis:6379"', "broker.url"),
    ('url = "redis://r"\nstream = "a b"', "broker.stream"),
    ("visibility_timeout_s = 0", "broker.visibility_timeout_s"),
    ("visibility_timeout_s = 10\nheartbeat_s = 10", "broker.heartbeat_s"),
])
def test_a_broker_setting_that_cannot_work_is_a_one_line_error_naming_it(tmp_path, table, key):
    path = tmp_path / "node.toml"
    path.write_text(f"[broker]\n{table}\n")
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        load_config(path)
    assert "\n" not in str(err.value)


# --- the head applies results to the current run only -------------------------------------------------


@pytest.fixture
def queue(tmp_path):
    store = JobStore(tmp_path / "queue.sqlite3")
    yield store
    store.close()


def denoising(queue: JobStore, tmp_path: Path, sop: str = "1.2.3.1", now: float = 100.0) -> Job:
    path = tmp_path / "spool" / S / f"{sop}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    queue.add_instance(S, sop, path, now=now)
    queue.promote_quiet(0, now=now + 1)
    return queue.claim_next(now=now + 2)


def test_a_started_result_records_the_worker_that_holds_the_series(queue, tmp_path):
    job = denoising(queue, tmp_path)
    assert apply_result(queue, Result(S, job.run, "gpu-1"), ["pacs"], None) == "started"
    assert queue.series(S).worker == "gpu-1"
    assert "worker=gpu-1" in format_table(queue.jobs())


def test_a_derived_result_hands_the_series_to_the_sender_and_a_duplicate_is_ignored(queue, tmp_path):
    job = denoising(queue, tmp_path)
    outbox = tmp_path / "outbox"
    assert apply_result(queue, Result(S, job.run, "gpu-1", derived_in(outbox)), ["pacs"], None) == OutcomeKind.DERIVED
    row = queue.series(S)
    assert (row.state, row.outbox, row.slices, row.set_aside) == (
        SeriesState.SENDING, str(outbox / "1.2.3.9"), 2, [{"sop_uid": "1.2.3.3", "reason": "pixel data does not decode"}])
    assert sorted(p.name for p in outbox.iterdir()) == ["1.2.3.9"]  # the head moved it out of staging
    # The same run derived again (a head restart dispatched it twice): ignored, its folder removed, sent once.
    duplicate = derived_in(outbox, entry_id="2-0")
    assert apply_result(queue, Result(S, job.run, "gpu-2", duplicate), ["pacs"], None) == "ignored"
    assert apply_result(queue, Result(S, job.run, "gpu-2"), ["pacs"], None) == "ignored"
    assert sorted(p.name for p in outbox.iterdir()) == ["1.2.3.9"]
    assert queue.series(S).worker is None and len(queue.series(S).deliveries) == 1


def test_a_derived_series_missing_from_the_shared_outbox_fails_with_what_to_check(queue, tmp_path):
    job = denoising(queue, tmp_path)
    apply_result(queue, Result(S, job.run, "gpu-1", DERIVED), ["pacs"], None)  # /outbox/... does not exist here
    row = queue.series(S)
    assert row.state == SeriesState.FAILED and "check the shared outbox mount" in row.reason and not row.deliveries


def test_a_result_for_a_run_that_new_instances_replaced_is_ignored(queue, tmp_path):
    first = denoising(queue, tmp_path)
    queue.finish(S, SeriesState.DONE, "ok", now=103)
    second = denoising(queue, tmp_path, sop="1.2.3.2", now=200)  # run 2 is being denoised now
    assert second.run == first.run + 1
    assert apply_result(queue, Result(S, first.run, "gpu-1", DERIVED), ["pacs"], None) == "ignored"
    assert queue.series(S).state == SeriesState.DENOISING


def test_a_failed_result_fails_the_series_with_its_reason_and_counts_it(queue, tmp_path):
    job = denoising(queue, tmp_path)
    metrics = Metrics()
    outcome = Outcome(OutcomeKind.FAILED, "ValueError: no axial CT image")
    assert apply_result(queue, Result(S, job.run, "gpu-1", outcome), ["pacs"], metrics) == OutcomeKind.FAILED
    assert (queue.series(S).state, queue.series(S).reason) == (SeriesState.FAILED, "ValueError: no axial CT image")
    assert metrics.series_failed._value.get() == 1


def test_a_full_outbox_on_a_worker_queues_the_series_again_with_the_reason(queue, tmp_path):
    job = denoising(queue, tmp_path)
    outcome = Outcome(OutcomeKind.NO_SPACE, "outbox volume full (No space left on device)")
    apply_result(queue, Result(S, job.run, "gpu-1", outcome), ["pacs"], None)
    row = queue.series(S)
    assert row.state == SeriesState.QUEUED and "gpu-1" in row.reason and "outbox volume full" in row.reason


# --- against a real redis-server ------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path):
    """A redis-server of its own on a free loopback port, no persistence; stopped by its pid."""
    if not REDIS_SERVER.is_file():
        pytest.skip(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")
    port = peers.free_port()
    log = open(tmp_path / "redis.log", "wb")
    proc = subprocess.Popen([str(REDIS_SERVER), "--port", str(port), "--bind", peers.LOOPBACK, "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        peers.wait_until(lambda: peers.port_open(port), "redis-server", proc)
        yield f"redis://{peers.LOOPBACK}:{port}/0"
    finally:
        peers.stop_process(proc)
        log.close()


def job_queue(url: str, consumer: str, visibility_timeout_s: float = 0.3) -> JobQueue:
    from ldct_node.node.broker import connect

    return JobQueue(connect(url), "t", consumer, visibility_timeout_s)


def test_a_job_held_by_a_silent_worker_is_taken_over_and_the_first_result_is_refused(redis_url):
    first, second = job_queue(redis_url, "w1"), job_queue(redis_url, "w2")
    first.client.xadd(streams("t")[0], encode_job(Job(S, 1, [Path("/spool/a.dcm")]), Path("/outbox")))
    taken = first.take(0.1)
    assert taken.job.series_uid == S and taken.deliveries == 1
    assert second.take(0.1) is None  # held, and not yet silent for the visibility timeout
    time.sleep(0.4)
    again = second.take(0.1)
    assert (again.entry_id, again.deliveries) == (taken.entry_id, 2)
    assert not first.renew(taken.entry_id)  # the first worker learns it lost the job
    assert not first.complete(taken.entry_id, Result(S, 1, "w1", DERIVED))
    assert second.complete(again.entry_id, Result(S, 1, "w2", DERIVED))
    results = second.client.xrange(streams("t")[1])
    assert [decode_result(fields).worker for _, fields in results] == ["w2"]
    assert second.client.xlen(streams("t")[0]) == 0  # done jobs leave the stream


def test_renewing_keeps_a_long_series_from_being_taken_over(redis_url):
    first, second = job_queue(redis_url, "w1"), job_queue(redis_url, "w2")
    first.client.xadd(streams("t")[0], encode_job(Job(S, 1, []), Path("/outbox")))
    taken = first.take(0.1)
    for _ in range(4):
        time.sleep(0.15)
        assert first.renew(taken.entry_id)
        assert second.take(0.01) is None


def test_a_job_handed_back_is_taken_by_another_worker_at_once(redis_url):
    first, second = job_queue(redis_url, "w1", visibility_timeout_s=60), job_queue(redis_url, "w2", 60)
    first.client.xadd(streams("t")[0], encode_job(Job(S, 1, []), Path("/outbox")))
    taken = first.take(0.1)
    assert first.release(taken.entry_id)
    assert second.take(0.1).entry_id == taken.entry_id


def test_the_dispatcher_hands_queued_series_out_and_applies_what_comes_back(redis_url, queue, tmp_path):
    job_path = tmp_path / "spool" / S / "1.2.3.1.dcm"
    job_path.parent.mkdir(parents=True)
    job_path.write_bytes(b"x")
    queue.add_instance(S, "1.2.3.1", job_path, now=0)
    queue.promote_quiet(0, now=1)
    from ldct_node.node.broker import connect

    metrics = Metrics()
    dispatcher = Dispatcher(connect(redis_url), "t", queue, tmp_path / "outbox", [], 0.05, metrics)
    assert dispatcher.step()
    worker = job_queue(redis_url, "w1")
    taken = worker.take(0.1)
    assert taken.job == BrokerJob(S, 1, [job_path], tmp_path / "outbox")
    worker.report(Result(S, 1, "w1"))
    assert worker.complete(taken.entry_id, Result(S, 1, "w1", derived_in(tmp_path / "outbox", taken.entry_id)))
    assert dispatcher.step()
    row = queue.series(S)
    assert (row.state, row.worker, row.reason) == (SeriesState.DONE, "w1", "kept in outbox (no destination configured)")
    samples = {(s.labels["worker"], s.labels["verdict"]): s.value for f in text_string_to_metric_families(
        metrics.render().decode()) if f.name == "ldct_broker_results" for s in f.samples if s.name.endswith("_total")}
    assert samples == {("w1", "started"): 1, ("w1", "derived"): 1}


def test_a_worker_without_a_reachable_broker_exits_2_with_one_line_saying_what_to_do(tmp_path, capsys):
    path = tmp_path / "worker.toml"
    path.write_text(f'[broker]\nurl = "redis://{peers.LOOPBACK}:{peers.free_port()}/0"\n')
    assert cli.main(["worker", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot reach the broker" in err and "broker.url" in err


# --- a head node, three worker processes, one killed -9 mid-series ----------------------------------------

SERIES = 4
SLICES = 24
VISIBILITY_S = 3.0


def worker_config(tmp_path: Path, name: str, url: str, weights: Path) -> tuple[Path, int]:
    http_port = peers.free_port()
    tables = {
        "model": {"weights": weights},
        "inference": {"device": "cpu", "threads": 1, "batch_size": 1, "chunk_slices": 1},
        "broker": {"url": url, "visibility_timeout_s": VISIBILITY_S, "heartbeat_s": 0.5, "worker_name": name},
        "http": {"host": peers.LOOPBACK, "port": http_port},
        "log": {"format": "json"},
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(peers.toml_text(tables))
    return path, http_port


def worker_metric(http_port: int, name: str) -> float:
    with peers.urllib.request.urlopen(f"http://{peers.LOOPBACK}:{http_port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def kill_a_worker_mid_series(node, workers: dict[str, tuple[subprocess.Popen, int]]):
    """kill -9 a worker that holds a series and has not finished it; the series' row as it was then.
    The worker is frozen first, then the head is given time to apply anything it published: one that
    finished in between is let go and the next holder is tried, so the kill never lands after the fact."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = [row for row in node.queue.jobs((SeriesState.DENOISING,)) if row.worker]
        if held:
            proc = workers[held[0].worker][0]
            proc.send_signal(signal.SIGSTOP)
            time.sleep(10 * node.cfg.queue.poll_interval_s)
            row = node.queue.series(held[0].series_uid)
            if (row.state, row.run, row.worker) == (SeriesState.DENOISING, held[0].run, held[0].worker):
                peers.kill_hard(proc)
                return row
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    pytest.fail("no worker was seen holding a series")


def test_three_workers_one_killed_mid_series_deliver_every_instance_exactly_once(redis_url, tmp_path):
    weights = Path(__file__).resolve().parents[1] / "weights" / "tscnet-student-v2.safetensors"
    pacs = Pacs()
    cfg = config(tmp_path, weights, [pacs.destination])
    cfg = dataclasses.replace(cfg, broker=BrokerSettings(url=redis_url, visibility_timeout_s=VISIBILITY_S))
    from ldct_node.node.daemon import Node

    node = Node(cfg)
    workers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        node.start()
        for name in ("w1", "w2", "w3"):
            path, http_port = worker_config(tmp_path, name, redis_url, weights)
            log = open(tmp_path / f"{name}.log", "wb")
            workers[name] = (subprocess.Popen(peers.cli_command("worker", "--config", str(path)), stdout=log,
                                              stderr=subprocess.STDOUT), http_port)
        for name, (proc, http_port) in workers.items():
            peers.wait_until(lambda: peers.http_ok(f"http://{peers.LOOPBACK}:{http_port}/healthz"), name, proc)
        sent = [ct_series(SLICES, rows=64, columns=64) for _ in range(SERIES)]
        # From scanners in parallel, so the series are complete together and the workers share them.
        with ThreadPoolExecutor(SERIES) as scanners:
            assert all(set(statuses) == {0} for statuses in scanners.map(lambda series: send(node, series), sent))
        victim = kill_a_worker_mid_series(node, workers)
        rows = [wait_state(node.queue, series[0].SeriesInstanceUID, SeriesState.DONE) for series in sent]
        # The killed worker's series was derived by another one, after the visibility timeout.
        assert node.queue.series(victim.series_uid).worker != victim.worker
        survivors = [port for name, (_, port) in workers.items() if name != victim.worker]
        assert sum(worker_metric(port, "ldct_worker_series_taken_over_total") for port in survivors) >= 1
        # Every derived instance reached the destination, and none twice.
        assert len(pacs.stored) == len(set(pacs.stored)) == SERIES * SLICES
        assert all(row.slices == SLICES for row in rows)
        for name, (proc, _) in workers.items():
            if name != victim.worker:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
    finally:
        for proc, _ in workers.values():
            peers.kill_hard(proc)
        node.stop()
        pacs.stop()


def test_the_worker_unit_runs_ldct_node_worker_on_the_shared_data_directory_as_the_node_user():
    from tests.test_node_peers import SYSTEMD, unit_directives

    worker, node = unit_directives(SYSTEMD / "ldct-node-worker.service"), unit_directives(SYSTEMD / "ldct-node.service")
    assert worker["ExecStart"] == [node["ExecStart"][0].replace(" serve ", " worker ")]
    assert worker["ReadWritePaths"] == worker["RequiresMountsFor"] == ["/var/lib/ldct-node"]
    assert (worker["User"], worker["Group"]) == (node["User"], node["Group"])  # same uid on the shared files
    hardening = ("NoNewPrivileges", "ProtectSystem", "PrivateDevices", "SystemCallFilter", "RestrictAddressFamilies")
    assert all(worker[key] == node[key] for key in hardening)


def test_a_head_node_whose_broker_is_unreachable_stops_at_start_with_one_line(tmp_path, tiny_weights):
    from ldct_node.node.broker import BrokerUnavailable
    from ldct_node.node.daemon import Node

    cfg = dataclasses.replace(config(tmp_path, tiny_weights),
                              broker=BrokerSettings(url=f"redis://:pw@{peers.LOOPBACK}:{peers.free_port()}/0"))
    with pytest.raises(BrokerUnavailable, match="start redis-server there or fix broker.url") as err:
        Node(cfg)
    assert "\n" not in str(err.value) and "pw" not in str(err.value)


# --- one worker host in-process, with a fake processor ---------------------------------------------------


class StoppedMidSeries:
    """A processor during whose run the worker is told to stop (SIGTERM)."""

    def __init__(self, host_ref: list):
        self.host_ref = host_ref

    def output_series_uid(self, series_uid: str) -> str:
        return f"{series_uid}.9"

    def denoise(self, sources, out_dir, progress):
        self.host_ref[0].stopping.set()
        progress(1, len(sources))
        raise AssertionError("progress should have abandoned the series")


def worker_host(url: str, processor, visibility_timeout_s: float = 60.0):
    from ldct_node.commands.worker import WorkerHost
    from ldct_node.config import Config

    cfg = Config(broker=BrokerSettings(url=url, visibility_timeout_s=visibility_timeout_s))
    return WorkerHost(job_queue(url, "w1", visibility_timeout_s), processor, cfg, "w1", Metrics())


def add_job(url: str, tmp_path: Path) -> None:
    source = tmp_path / "spool" / S / "1.2.3.1.dcm"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"x")
    job_queue(url, "producer").client.xadd(streams("t")[0], encode_job(Job(S, 1, [source]), tmp_path / "outbox"))


def published(url: str) -> list[Result]:
    return [decode_result(fields) for _, fields in job_queue(url, "reader").client.xrange(streams("t")[1])]


def test_a_worker_publishes_the_derived_series_it_wrote_into_the_shared_outbox(redis_url, tmp_path):
    from tests.test_daemon import FakeProcessor

    add_job(redis_url, tmp_path)
    host = worker_host(redis_url, FakeProcessor())
    taken = host.jobs.take(0.1)
    host.handle(taken)
    started, finished = published(redis_url)
    assert (started.worker, started.outcome) == ("w1", None)
    staging = staging_dir(tmp_path / "outbox", f"{S}.9", taken.entry_id)
    assert finished.outcome.verdict == OutcomeKind.DERIVED and finished.outcome.out_dir == str(staging)
    assert len(list(staging.iterdir())) == 1


def test_a_worker_stopped_mid_series_hands_it_back_at_once_and_publishes_no_outcome(redis_url, tmp_path):
    add_job(redis_url, tmp_path)
    ref: list = []
    host = worker_host(redis_url, StoppedMidSeries(ref))
    ref.append(host)
    host.handle(host.jobs.take(0.1))
    assert [r.outcome for r in published(redis_url)] == [None]  # "started" only
    assert job_queue(redis_url, "w2", 60).take(0.1).job.series_uid == S  # long before the 60 s timeout


def test_a_series_that_every_worker_died_on_is_failed_after_max_deliveries(redis_url, tmp_path):
    from ldct_node.node.broker import MAX_DELIVERIES
    from tests.test_daemon import FakeProcessor

    add_job(redis_url, tmp_path)
    dying = job_queue(redis_url, "dies", visibility_timeout_s=0.01)
    for _ in range(MAX_DELIVERIES):
        assert dying.take(0.1) is not None
        time.sleep(0.02)
    host = worker_host(redis_url, FakeProcessor(), visibility_timeout_s=0.01)
    host.handle(host.jobs.take(0.1))
    (result,) = published(redis_url)
    assert result.outcome.verdict == OutcomeKind.FAILED and f"taken {MAX_DELIVERIES} times" in result.outcome.reason
    assert host.jobs.client.xlen(streams("t")[0]) == 0


def test_a_malformed_job_is_dropped_once_instead_of_failing_every_worker(redis_url):
    worker = job_queue(redis_url, "w1")
    worker.client.xadd(streams("t")[0], {"series_uid": S})
    assert worker.take(0.1) is None
    assert worker.client.xlen(streams("t")[0]) == 0


def test_a_malformed_worker_result_is_dropped_and_the_dispatcher_goes_on(redis_url, queue, tmp_path):
    from ldct_node.node.broker import connect

    dispatcher = Dispatcher(connect(redis_url), "t", queue, tmp_path / "outbox", [], 0.05)
    dispatcher.client.xadd(streams("t")[1], {"type": "outcome", "series_uid": S})
    assert dispatcher.step()
    assert dispatcher.client.xlen(streams("t")[1]) == 0 and not dispatcher.degraded


def test_a_worker_given_a_configuration_without_a_broker_says_to_set_one(tmp_path, capsys):
    path = tmp_path / "node.toml"
    path.write_text("[queue]\nquiet_period_s = 1\n")
    assert cli.main(["worker", "--config", str(path)]) == 2
    assert "set [broker] url" in capsys.readouterr().err
