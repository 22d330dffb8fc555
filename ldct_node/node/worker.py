"""The worker: turns each queued series into its derived series.

One thread, because the model is loaded once and one series at a time keeps the GPU (or the CPU
cores) busy. Each turn it claims the oldest queued series (``denoising``; the housekeeping
thread moves quiet series from ``received`` to ``queued``), denoises the spooled files into
``outbox/<derived SeriesInstanceUID>/`` and hands the series to the sender (``sending``), or marks
it ``done`` with "kept in outbox" when no destination is configured. Any failure of one series
(a corrupt spooled file, no axial CT image in it ...) marks only that series ``failed`` with a
one-line reason; the worker carries on with the next. One bad instance does not cost its series:
an instance that cannot be used (its pixel data does not decode, RescaleSlope 0, ...) is set aside
with its reason, one warning line each, listed in the "series denoised" line and in ``queue list``,
and the rest of the series is derived and sent. So does the HU fidelity gate: a series
whose soft-tissue HU changed beyond a ``[fidelity]`` limit is failed with that reason, its derived
files are removed and nothing is sent (``queue retry`` denoises it again). A full outbox volume
is not the series' fault: it goes back to ``queued`` with a one-line reason, the worker pauses for
``storage.disk_full_retry_s`` and tries again, so the node heals once space returns, and /healthz
says why it is degraded meanwhile. While a series is
denoised, slices done / total go to /metrics after every chunk and to the log ("denoising
progress") every few seconds.

With ``queue.stream`` the worker also streams (``ldct_node.node.stream``): when no complete series
waits, it derives a chunk of an arriving one, and the run that closes that series keeps the chunks.

A run has two halves, kept apart so that scale-out (``ldct_node.node.broker``) reuses both:
``run_series`` denoises and turns what happened into an ``Outcome`` (plain data), ``apply_outcome``
tells the job store. The local Worker calls one after the other; with a broker, worker hosts run
the first and the head node applies the second when their result message arrives.
"""

from __future__ import annotations

import errno
import shutil
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ldct_node.config import DeriveSettings, FidelitySettings
from ldct_node.durable import DATA_DIR_MODE, private_dir
from ldct_node.logs import get_logger, one_line
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.denoise_series import SeriesResult, Streamed, denoise_series, output_series_uid
from ldct_node.node.jobs import FINISHED, Job, JobStore, SeriesState
from ldct_node.node.observe import Metrics
from ldct_node.polling import PollingThread

if TYPE_CHECKING:  # stream.py builds on this module
    from ldct_node.node.stream import Streamer, StreamLedger

log = get_logger(__name__)

# A total-body series on CPU takes many minutes: often enough to show it moves, rarely enough for the journal.
PROGRESS_LOG_INTERVAL_S = 5.0

Progress = Callable[[int, int], None]  # (slices done, slices in the series)


class SeriesProcessor(Protocol):
    """What the worker needs from the denoising side (``denoise_series`` in production, a fake in tests)."""

    def output_series_uid(self, series_uid: str) -> str: ...

    def denoise(self, sources: list[Path], out_dir: Path, progress: Progress,
                prior: Streamed | None = None) -> SeriesResult:
        """prior: what streaming derived of this run into out_dir already; only processors that stream
        (EngineProcessor) are ever given one."""


class EngineProcessor:
    """denoise_series.denoise_series with the model the daemon loaded once."""

    def __init__(self, engine: DenoiseEngine, settings: DeriveSettings, fidelity: FidelitySettings):
        self.engine = engine
        self.settings = settings
        self.fidelity = fidelity

    def output_series_uid(self, series_uid: str) -> str:
        return output_series_uid(series_uid, self.engine, self.settings)

    def denoise(self, sources: list[Path], out_dir: Path, progress: Progress,
                prior: Streamed | None = None) -> SeriesResult:
        return denoise_series(sources, out_dir, self.engine, self.settings, self.fidelity, progress, prior)


class SeriesProgress:
    """Reports the series being denoised: every chunk to /metrics, at most every interval_s to the log."""

    def __init__(self, log, metrics: Metrics | None, interval_s: float = PROGRESS_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        # "denoising series" has just been logged: the first progress line is due one interval later.
        self.logged_at = clock()

    def __call__(self, done: int, total: int) -> None:
        if self.metrics:
            self.metrics.series_progress(done, total)
        now = self.clock()
        if now - self.logged_at >= self.interval_s:
            self.logged_at = now
            self.log.info("denoising progress", slices_done=done, slices_total=total)


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT behind exc, however a library re-raised it; None for any other failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def reset_dir(path: Path) -> None:
    """An empty directory: files of an earlier run with other inputs must not be sent with this one."""
    shutil.rmtree(path, ignore_errors=True)
    private_dir(path.parent)
    path.mkdir(mode=DATA_DIR_MODE)
    # Exact whatever the umask; its derived files then get no more access than it (durable.default_mode).
    path.chmod(DATA_DIR_MODE)


class OutcomeKind(StrEnum):
    """What a run of the processor came to, before the job store is told."""

    DERIVED = "derived"  # the derived series is in the outbox: send it (or keep it, with no destination)
    DONE = "done"  # nothing to derive, and nothing lost (an empty series)
    FAILED = "failed"
    NO_SPACE = "no_space"  # the outbox volume is full: not the series' fault, it waits in the queue


@dataclass(frozen=True)
class Outcome:
    """One run of one series, as the local worker or a broker worker host found it; plain data, so it
    travels as a broker message. log_fields: what the "series denoised"/"series finished" lines add."""

    verdict: OutcomeKind
    reason: str | None = None
    derived_series_uid: str | None = None
    out_dir: str | None = None
    slices: int = 0
    skipped: int = 0
    seconds: float = 0.0
    set_aside: tuple[tuple[str, str], ...] = ()
    log_fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "set_aside": [list(item) for item in self.set_aside]}

    @classmethod
    def from_dict(cls, data: dict) -> Outcome:
        return cls(**{**data, "verdict": OutcomeKind(data["verdict"]),
                      "set_aside": tuple((uid, reason) for uid, reason in data.get("set_aside", ()))})


def run_series(processor: SeriesProcessor, sources: list[Path], out_dir: Path,
               metrics: Metrics | None, bound, progress: Progress | None = None,
               prior: Streamed | None = None) -> Outcome:
    """Denoise one series into out_dir and say what came of it; never raises for a fault of the series.
    progress: as SeriesProgress, which is the default; a broker worker's may raise to abandon the run.
    prior: what streaming derived of this run into out_dir already, kept as it is."""
    progress = progress or SeriesProgress(bound, metrics)
    try:
        if not sources:
            raise FileNotFoundError("no spooled instance of the series is left on disk")
        if prior is None:
            reset_dir(out_dir)
            result = processor.denoise(sources, out_dir, progress)
        else:
            result = processor.denoise(sources, out_dir, progress, prior)
    except Exception as exc:  # noqa: BLE001 - one bad series must not stop the node
        full = disk_full(exc)
        if full is None:
            return Outcome(OutcomeKind.FAILED, one_line(exc))
        # A partial output only holds space that the next try (of any series) needs.
        shutil.rmtree(out_dir, ignore_errors=True)
        return Outcome(OutcomeKind.NO_SPACE, f"outbox volume full ({full.strerror or 'no space left'})")
    finally:
        if metrics:
            metrics.series_progress(0, 0)  # no series in progress: a stale total would look stuck
    # Spooled files are named <SOP Instance UID>.dcm; every one the receiver kept was meant to be used.
    set_aside = tuple((skipped.path.stem, skipped.reason) for skipped in result.skipped)
    for sop_uid, reason in set_aside:
        bound.warning("instance set aside", sop_uid=sop_uid, reason=reason)
    shown = {"set_aside": [f"{uid}: {reason}" for uid, reason in set_aside]} if set_aside else {}
    if not result.files:
        # Every instance set aside means the sender was answered success for a series that will
        # never reach PACS: failed, so the operator sees it, not done.
        return Outcome(OutcomeKind.FAILED if set_aside else OutcomeKind.DONE,
                       f"nothing to denoise ({len(result.skipped)} instances set aside)", set_aside=set_aside,
                       log_fields=shown)
    # Processors other than EngineProcessor (tests' fakes) may not measure fidelity.
    fidelity, failure = getattr(result, "fidelity", None), getattr(result, "fidelity_failure", None)
    measures = fidelity.as_fields() if fidelity is not None else {}
    if metrics:
        metrics.series_seconds.observe(result.seconds)
        if fidelity is not None:
            metrics.series_fidelity(fidelity, failed=failure is not None)
    if failure:
        shutil.rmtree(out_dir, ignore_errors=True)
        return Outcome(OutcomeKind.FAILED, f"{failure} (not sent)", log_fields=measures)
    return Outcome(OutcomeKind.DERIVED, derived_series_uid=result.derived_series_uid, out_dir=str(out_dir),
                   slices=len(result.files), skipped=len(result.skipped), seconds=result.seconds,
                   set_aside=set_aside, log_fields={**measures, **shown})


def apply_outcome(queue: JobStore, series_uid: str, outcome: Outcome, destinations: list[str],
                  metrics: Metrics | None, bound) -> SeriesState:
    """Tell the job store how the current run of series_uid ended; returns the series state afterwards.
    A full outbox is not applied here: the caller decides when the series is tried again."""
    if outcome.verdict == OutcomeKind.DERIVED:
        state = queue.denoised(series_uid, outcome.derived_series_uid, Path(outcome.out_dir), outcome.slices,
                               outcome.skipped, outcome.seconds, destinations, set_aside=list(outcome.set_aside))
        # With no destination the outbox is where the operator collects the series: the line says where.
        kept = {} if destinations else {"outbox": outcome.out_dir}
        bound.info("series denoised", derived_series_uid=outcome.derived_series_uid, slices=outcome.slices,
                   skipped=outcome.skipped, seconds=round(outcome.seconds, 3), state=state, **kept, **outcome.log_fields)
    else:
        state = SeriesState(outcome.verdict)
        (bound.error if state == SeriesState.FAILED else bound.info)(
            "series finished", state=state, reason=outcome.reason, **outcome.log_fields)
        state = queue.finish(series_uid, state, outcome.reason, set_aside=list(outcome.set_aside))
    # A run that ended here counts as done or failed; one reopened by new instances counts when that run ends.
    if metrics and state in FINISHED:
        metrics.series_finished(state)
    return state


class Worker(PollingThread):
    def __init__(
        self,
        queue: JobStore,
        processor: SeriesProcessor,
        outbox_root: Path,
        destinations: list[str],
        poll_interval_s: float,
        metrics: Metrics | None = None,
        disk_full_retry_s: float = 60.0,
        ledger: StreamLedger | None = None,
        streamer: Streamer | None = None,
    ):
        """ledger: streaming's records, so that a series streaming began is finished, not redone;
        streamer: derives chunks of arriving series whenever no complete series waits (queue.stream)."""
        super().__init__("ldct-worker", poll_interval_s)
        self.queue = queue
        self.processor = processor
        self.outbox_root = outbox_root
        self.destinations = destinations
        self.metrics = metrics
        self.disk_full_retry_s = disk_full_retry_s
        self.ledger = ledger
        self.streamer = streamer
        # The one-line reason while the outbox volume is full (for /healthz); None when writing works.
        self.waiting_for_space: str | None = None
        self._retry_at = 0.0

    @property
    def degraded(self) -> tuple[str, ...]:
        """Why the node cannot do its work now, one line each (for /healthz)."""
        return (self.waiting_for_space,) if self.waiting_for_space else ()

    def step(self) -> bool:
        """One turn: process one queued series. False when there was nothing to do (or the disk is full)."""
        if self.waiting_for_space and time.monotonic() < self._retry_at:
            return False
        job = self.queue.claim_next()
        if job is None:
            return self.streamer.step() if self.streamer else False
        self.process(job)
        return True

    def process(self, job: Job) -> SeriesState:
        bound = log.bind(series_uid=job.series_uid, run=job.run, instances=len(job.sources))
        bound.info("denoising series")
        out_dir = self.outbox_root / self.processor.output_series_uid(job.series_uid)
        prior = self.ledger.for_close(job, out_dir) if self.ledger else None
        if prior is not None:
            bound.info("finishing streamed series", streamed=len(prior.derived), set_aside=len(prior.set_aside))
        outcome = run_series(self.processor, job.sources, out_dir, self.metrics, bound, prior=prior)
        if outcome.verdict == OutcomeKind.NO_SPACE:
            return self._wait_for_space(job, outcome.reason, bound)
        self.waiting_for_space = None
        return apply_outcome(self.queue, job.series_uid, outcome, self.destinations, self.metrics, bound)

    def _wait_for_space(self, job: Job, full: str, bound) -> SeriesState:
        reason = f"{full}: waiting, trying again every {self.disk_full_retry_s:g} s"
        self.waiting_for_space = reason
        self._retry_at = time.monotonic() + self.disk_full_retry_s
        bound.warning("series waits for disk space", reason=reason)
        return self.queue.requeue(job.series_uid, reason)
