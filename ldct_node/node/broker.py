"""Scale-out over Redis Streams: a head node hands series to worker hosts and applies what they made.

Streams (``[broker] stream`` is the prefix ``P``):

- ``P:jobs``: one entry per series run the head claimed from its job store: ``series_uid``, ``run``,
  ``sources`` (JSON list of spooled paths) and ``outbox`` (where the derived series goes). Spool and
  outbox sit on storage every host mounts at the same path. Consumer group ``workers``; each worker
  host is one consumer.
- ``P:results``: what the workers report: ``started`` (who holds the run, for ``queue list``) and
  ``outcome`` (a ``worker.Outcome`` as JSON). Consumer group ``head``.

Failure semantics. A worker takes a job with XREADGROUP; the job stays in its pending list until it
publishes the outcome and acknowledges the job in one step (a Lua script, atomic in Redis). While it
works it renews the job every ``heartbeat_s`` (XCLAIM to itself, which resets the idle time). A
worker that dies stops renewing; after ``visibility_timeout_s`` another worker takes the job over
with XAUTOCLAIM and derives the series again. Renewing and completing first check that the job is
still this worker's, so a worker that was taken over (stalled, cut off from Redis) publishes nothing.
The head applies an outcome only to the series' current denoising run and ignores any other
(a duplicate, a run replaced by newly arrived instances); only the head sends, and derived UIDs are
deterministic, so PACS sees every instance once even when a series was derived twice. Workers write
into a staging folder per job (``staging_dir``); the head alone moves an applied run's output to
``<outbox>/<derived UID>``, so no worker ever writes into a folder that is being sent.
A job whose workers died ``MAX_DELIVERIES`` times (a series that kills the process) is failed with
that reason instead of taking down every worker in turn.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, Counter

from ldct_node.errors import UserError
from ldct_node.logs import get_logger, one_line
from ldct_node.node.jobs import Job, JobStore
from ldct_node.node.observe import Metrics
from ldct_node.node.worker import Outcome, OutcomeKind, apply_outcome
from ldct_node.polling import PollingThread

log = get_logger(__name__)

WORKERS_GROUP = "workers"
HEAD_GROUP = "head"
HEAD_CONSUMER = "head"
# Deliveries of one job before it is failed: a series that kills every worker must not go round forever
# (a worker stopped by SIGTERM hands its job back, which counts too: a few restarts must not fail a series).
MAX_DELIVERIES = 5
# Redis calls that do not block answer in milliseconds; longer means the server or the network is gone.
SOCKET_TIMEOUT_S = 10.0
RESULTS_PER_STEP = 100

STARTED = "started"
OUTCOME = "outcome"


class BrokerUnavailable(UserError):
    """Redis cannot be reached at start, as one line saying what to do."""


def streams(prefix: str) -> tuple[str, str]:
    """The jobs and results stream names under a [broker] stream prefix."""
    return f"{prefix}:jobs", f"{prefix}:results"


def redacted(url: str) -> str:
    """The URL without its password, for log lines and error messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def connect(url: str) -> redis.Redis:
    """A client that has answered PING; BrokerUnavailable otherwise."""
    try:
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S,
                                      socket_connect_timeout=SOCKET_TIMEOUT_S, health_check_interval=30)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {redacted(url)} ({one_line(exc)}): start redis-server there"
                                " or fix broker.url") from None
    return client


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """The consumer group exists (from the stream's start, so jobs added before any worker ran are seen)."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# --- messages (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerJob:
    series_uid: str
    run: int
    sources: list[Path]
    outbox: Path


def encode_job(job: Job, outbox: Path) -> dict[str, str]:
    return {"series_uid": job.series_uid, "run": str(job.run), "sources": json.dumps([str(p) for p in job.sources]),
            "outbox": str(outbox)}


def decode_job(fields: dict[str, str]) -> BrokerJob:
    return BrokerJob(fields["series_uid"], int(fields["run"]), [Path(p) for p in json.loads(fields["sources"])],
                     Path(fields["outbox"]))


@dataclass(frozen=True)
class Result:
    """A worker's report on one run: it started it (outcome None), or how it ended."""

    series_uid: str
    run: int
    worker: str
    outcome: Outcome | None = None


def encode_result(result: Result) -> dict[str, str]:
    fields = {"series_uid": result.series_uid, "run": str(result.run), "worker": result.worker}
    if result.outcome is None:
        return {"type": STARTED, **fields}
    return {"type": OUTCOME, **fields, "outcome": json.dumps(result.outcome.to_dict())}


def decode_result(fields: dict[str, str]) -> Result:
    outcome = Outcome.from_dict(json.loads(fields["outcome"])) if fields["type"] == OUTCOME else None
    return Result(fields["series_uid"], int(fields["run"]), fields["worker"], outcome)


# --- head node ------------------------------------------------------------------------------------


class ResultCounter:
    """Per-worker results on the head's /metrics: ldct_broker_results_total{worker, verdict}; verdict
    "started", an Outcome verdict, or "ignored" (a stale or duplicate result)."""

    def __init__(self, registry: CollectorRegistry):
        self.counter = Counter("ldct_broker_results", "Worker results the head received", ["worker", "verdict"],
                               registry=registry)

    def count(self, worker: str, verdict: str) -> None:
        self.counter.labels(worker=worker, verdict=verdict).inc()


def staging_dir(outbox: Path, derived_series_uid: str, entry_id: str) -> Path:
    """Where a worker writes the derived series of one job: its own folder beside the final one, so
    that no other delivery of a job (a head restart dispatches a series again) writes into a folder the
    head is sending from. A worker that takes over a dead one's job reuses (and empties) its folder."""
    return outbox / f"{derived_series_uid}.{entry_id}.partial"


def promote(staging: Path, derived_series_uid: str) -> Path:
    """The head, sole writer of final outbox folders, moves an applied run's output to <outbox>/<derived UID>."""
    final = staging.parent / derived_series_uid
    shutil.rmtree(final, ignore_errors=True)  # an earlier run's output: this run replaces it
    staging.rename(final)
    return final


def apply_result(queue: JobStore, result: Result, destinations: list[str], metrics: Metrics | None) -> str:
    """Apply one worker result to the job store: only to the series' current denoising run. Returns
    what it counted as: "ignored", "started" or the outcome's verdict."""
    bound = log.bind(series_uid=result.series_uid, run=result.run, worker=result.worker)
    if not queue.is_denoising(result.series_uid, result.run):
        bound.info("stale worker result ignored", result=OUTCOME if result.outcome else STARTED)
        if result.outcome and result.outcome.out_dir:
            shutil.rmtree(result.outcome.out_dir, ignore_errors=True)  # its own staging folder, never sent
        return "ignored"
    if result.outcome is None:
        queue.taken_by(result.series_uid, result.run, result.worker)
        bound.info("series taken by worker")
        return STARTED
    if result.outcome.verdict == OutcomeKind.NO_SPACE:
        reason = f"{result.outcome.reason} on worker {result.worker}: queued again"
        bound.warning("series waits for disk space", reason=reason)
        queue.requeue(result.series_uid, reason)
        return result.outcome.verdict
    outcome = result.outcome
    if outcome.verdict == OutcomeKind.DERIVED:
        try:
            outcome = dataclasses.replace(outcome, out_dir=str(promote(Path(outcome.out_dir), outcome.derived_series_uid)))
        except OSError as exc:
            outcome = Outcome(OutcomeKind.FAILED, f"cannot move the derived series into the outbox: {one_line(exc)};"
                                                  " check the shared outbox mount, then 'ldct-node queue retry'")
    apply_outcome(queue, result.series_uid, outcome, destinations, metrics, bound)
    return outcome.verdict


class Dispatcher(PollingThread):
    """The head node's stand-in for the local Worker: queued series go to the jobs stream, worker
    results come back into the job store. A lost broker leaves series queued and says so in /healthz."""

    def __init__(self, client: redis.Redis, prefix: str, queue: JobStore, outbox_root: Path,
                 destinations: list[str], poll_interval_s: float, metrics: Metrics | None = None):
        super().__init__("ldct-dispatcher", poll_interval_s)
        self.client = client
        self.jobs_stream, self.results_stream = streams(prefix)
        self.queue = queue
        self.outbox_root = outbox_root
        self.destinations = destinations
        self.metrics = metrics
        self.results = ResultCounter(metrics.registry) if metrics else None
        self.broker_down: str | None = None
        # Created once per connection, not on every poll; again after an error (a restarted Redis may have lost them).
        self._groups_ready = False
        # Results read before a restart but not acknowledged are read again first (applying is idempotent).
        self._read_from = "0"

    @property
    def degraded(self) -> tuple[str, ...]:
        return (self.broker_down,) if self.broker_down else ()

    def step(self) -> bool:
        try:
            if not self._groups_ready:
                ensure_group(self.client, self.jobs_stream, WORKERS_GROUP)
                ensure_group(self.client, self.results_stream, HEAD_GROUP)
                self._groups_ready = True
            worked = self._collect() | self._dispatch()
        except redis.RedisError as exc:
            self._groups_ready = False
            if self.broker_down is None:
                log.warning("broker unreachable: series wait in the queue", error=one_line(exc))
            self.broker_down = f"broker unreachable ({one_line(exc)}): series wait in the queue"
            return False
        if self.broker_down:
            log.info("broker reachable again")
        self.broker_down = None
        return worked

    def _read(self) -> list:
        answer = self.client.xreadgroup(HEAD_GROUP, HEAD_CONSUMER, {self.results_stream: self._read_from},
                                        count=RESULTS_PER_STEP)
        return answer[0][1] if answer else []

    def _collect(self) -> bool:
        entries = self._read()
        if not entries and self._read_from == "0":
            self._read_from = ">"  # nothing left from before a restart: new results from now on
            entries = self._read()
        if not entries:
            return False
        for entry_id, fields in entries:
            try:
                result = decode_result(fields or {})
            except (KeyError, ValueError, TypeError) as exc:
                # A message from another version, or one deleted while pending: one line, and not again.
                log.error("malformed worker result dropped", entry_id=entry_id, error=one_line(exc))
            else:
                verdict = apply_result(self.queue, result, self.destinations, self.metrics)
                if self.results:
                    self.results.count(result.worker, verdict)
            self.client.xack(self.results_stream, HEAD_GROUP, entry_id)
            self.client.xdel(self.results_stream, entry_id)
        return True

    def _dispatch(self) -> bool:
        job = self.queue.claim_next()
        if job is None:
            return False
        try:
            self.client.xadd(self.jobs_stream, encode_job(job, self.outbox_root))
        except redis.RedisError:
            self.queue.requeue(job.series_uid, "broker unreachable: waiting to hand the series to a worker")
            raise
        log.info("series handed to workers", series_uid=job.series_uid, run=job.run, instances=len(job.sources))
        return True


# --- worker hosts ---------------------------------------------------------------------------------

# KEYS[1] jobs stream; ARGV group, entry id, consumer. The job is still this consumer's: reset its idle time.
_RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""
# KEYS[1] jobs, KEYS[2] results; ARGV group, entry id, consumer, then the result's field/value pairs.
_COMPLETE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""
# ARGV group, entry id, consumer, idle ms. Handing a job back: idle as if its holder died long ago.
_RELEASE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class Taken:
    entry_id: str
    job: BrokerJob
    deliveries: int  # 1 the first time; more: earlier holders died or handed it back


class JobQueue:
    """One worker host's side of the jobs stream: take, renew, complete or hand back a job."""

    def __init__(self, client: redis.Redis, prefix: str, consumer: str, visibility_timeout_s: float):
        self.client = client
        self.jobs_stream, self.results_stream = streams(prefix)
        self.consumer = consumer
        self.visibility_ms = max(1, int(visibility_timeout_s * 1000))
        self._renew = client.register_script(_RENEW)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._group_ready = False  # as the Dispatcher's: once, and again after an error

    def take(self, block_s: float) -> Taken | None:
        """A job whose holder went silent for the visibility timeout first, else a new one (waiting up to block_s)."""
        try:
            if not self._group_ready:
                ensure_group(self.client, self.jobs_stream, WORKERS_GROUP)
                self._group_ready = True
            _, claimed, *_ = self.client.xautoclaim(self.jobs_stream, WORKERS_GROUP, self.consumer, self.visibility_ms,
                                                    start_id="0-0", count=1)
            if not claimed:
                answer = self.client.xreadgroup(WORKERS_GROUP, self.consumer, {self.jobs_stream: ">"}, count=1,
                                                block=max(1, int(block_s * 1000)))
                claimed = answer[0][1] if answer else []
        except redis.RedisError:
            self._group_ready = False
            raise
        if not claimed:
            return None
        entry_id, fields = claimed[0]
        try:
            job = decode_job(fields or {})
        except (KeyError, ValueError, TypeError) as exc:
            # Taking it again would only fail again, on every worker in turn.
            log.error("malformed job dropped", entry_id=entry_id, error=one_line(exc))
            self.client.xack(self.jobs_stream, WORKERS_GROUP, entry_id)
            self.client.xdel(self.jobs_stream, entry_id)
            return None
        pending = self.client.xpending_range(self.jobs_stream, WORKERS_GROUP, entry_id, entry_id, 1)
        return Taken(entry_id, job, pending[0]["times_delivered"] if pending else 1)

    def _owned(self, script, entry_id: str, *args) -> bool:
        return bool(script(keys=[self.jobs_stream, self.results_stream],
                           args=[WORKERS_GROUP, entry_id, self.consumer, *args]))

    def renew(self, entry_id: str) -> bool:
        """Still ours: its visibility timeout starts again. False: another worker took it over."""
        return self._owned(self._renew, entry_id)

    def complete(self, entry_id: str, result: Result) -> bool:
        """Publish the result and acknowledge the job at once, if the job is still ours."""
        flat = [item for pair in encode_result(result).items() for item in pair]
        return self._owned(self._complete, entry_id, *flat)

    def release(self, entry_id: str) -> bool:
        """Hand the job back for another worker to take now, rather than after the visibility timeout."""
        return self._owned(self._release, entry_id, self.visibility_ms)

    def report(self, result: Result) -> None:
        """A message that needs no ownership (``started``: the head ignores one for a run it no longer has)."""
        self.client.xadd(self.results_stream, encode_result(result))


class Heartbeat(threading.Thread):
    """Renews the job in hand every interval_s; sets `lost` when another worker has taken it over.
    A broker that does not answer is tried again at the next beat: only a definite "not yours" loses the job."""

    def __init__(self, jobs: JobQueue, entry_id: str, interval_s: float):
        super().__init__(name="ldct-heartbeat", daemon=True)
        self.jobs = jobs
        self.entry_id = entry_id
        self.interval_s = interval_s
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            try:
                if not self.jobs.renew(self.entry_id):
                    self.lost.set()
                    return
            except redis.RedisError as exc:
                log.warning("cannot renew the series in hand; trying again", error=one_line(exc))

    def stop(self) -> None:
        self.done.set()
        self.join()
