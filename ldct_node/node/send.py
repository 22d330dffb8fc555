"""The sender: C-STORE a derived series to one destination over one association.

``send_series`` is one delivery attempt; the ``Sender`` thread runs the attempts the queue says
are due and records each outcome (``JobStore.delivered`` / ``JobStore.delivery_failed``), which applies
the exponential back-off (``send.backoff_initial_s`` doubling up to ``send.backoff_max_s``) and
fails the delivery with the last reason once it has been pending for ``send.give_up_after_s``
(or after ``send.attempts`` tries when that is set). Every C-STORE response
status is checked: success and warnings (0xB000, 0xB006, 0xB007: stored with remarks) count as
stored; anything else fails the attempt, and the whole series is sent again on the next one
(the derived UIDs are fixed, so the destination sees replacements, never copies). With streaming
(ldct_node.node.stream) the sender also C-STOREs each chunk as it is derived, and the delivery that
follows the series' close sends each destination only what it has not stored yet.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.status import Status

from ldct_node.config import Destination, SendSettings
from ldct_node.logs import get_logger
from ldct_node.node.association import configure_ae
from ldct_node.node.jobs import FINISHED, DueDelivery, JobStore, RetryPolicy, SeriesState
from ldct_node.node.observe import Metrics
from ldct_node.node.store_scu import AssociationFailed, StoreAssociation
from ldct_node.node.tls import client_context
from ldct_node.node.upper_layer import PeerGone
from ldct_node.polling import PollingThread

if TYPE_CHECKING:  # stream.py builds on the worker, which the sender need not load
    from ldct_node.node.stream import StreamLedger

log = get_logger(__name__)


class StoreWarning(IntEnum):
    """C-STORE warning statuses (PS3.4 B.2.3): the destination stored the instance, with a remark."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


WARNING_STATUSES = frozenset(StoreWarning)


class SendError(Exception):
    """One delivery attempt failed; the message is the one-line reason recorded in the queue."""


@dataclass(frozen=True)
class SendResult:
    sent: int
    warnings: int
    seconds: float


def failure_reason(exc: Exception) -> str:
    """The one-line reason of a failed attempt: a SendError says it already, anything else by its type."""
    return str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"


def status_stored(status: int) -> bool:
    """A C-STORE response status that means the destination has the instance."""
    return status == Status.SUCCESS or status in WARNING_STATUSES


def retry_policy(settings: SendSettings) -> RetryPolicy:
    return RetryPolicy(settings.backoff_initial_s, settings.backoff_max_s, settings.give_up_after_s, settings.attempts)


def tls_args(destination: Destination, context: ssl.SSLContext | None = None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's (context, server name) for a destination with [tls], None for plain TCP."""
    if destination.tls is None:
        return None
    return (context or client_context(destination.tls, f"send.destinations[{destination.name}].tls"), destination.host)


def _unreachable(destination: Destination, failed: AssociationFailed) -> str:
    what = "rejected the association" if failed.rejected else "could not be reached or aborted"
    if destination.tls is not None and not failed.rejected:
        what += (" (TLS: or the handshake failed: check that it speaks TLS, that its certificate is signed by"
                 " tls.ca_file and names the host, and whether it wants a client certificate)")
    return f"{destination.ae_title}@{destination.host}:{destination.port} {what}: {failed}"


def transfer_syntaxes_of(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        if str(meta.TransferSyntaxUID) not in found:
            found.append(str(meta.TransferSyntaxUID))
    return found


def send_series(files: list[Path], destination: Destination, settings: SendSettings,
                context: ssl.SSLContext | None = None, stored: list[Path] | None = None) -> SendResult:
    """C-STORE every file over one association (TLS when the destination has [tls]; context: its
    prepared client context); raise SendError with the first problem. stored, when given, gets each
    file the destination stored, also when a later one fails."""
    if not files:
        raise SendError("no derived instances to send")
    started = time.monotonic()
    # Files of one series share a transfer syntax; reading every meta guards against a mixed outbox.
    try:
        assoc = StoreAssociation.request(destination.host, destination.port, destination.ae_title, CTImageStorage,
                                         transfer_syntaxes_of(files), settings.association,
                                         tls_args(destination, context))
    except AssociationFailed as exc:
        raise SendError(_unreachable(destination, exc)) from None
    sent = warnings = 0
    lost = False
    try:
        for path in files:
            try:
                rsp = assoc.store(path)
            except PeerGone as exc:
                lost = True
                raise SendError(f"no C-STORE response for {path.stem} ({exc})") from None
            except (OSError, ValueError) as exc:
                raise SendError(f"cannot send {path}: {exc}") from None
            if not status_stored(rsp.status):
                raise SendError(f"C-STORE of {path.stem} answered 0x{rsp.status:04X} {rsp.error_comment}".strip())
            warnings += rsp.status != Status.SUCCESS
            sent += 1
            if stored is not None:
                stored.append(path)
    finally:
        # A refused instance leaves the association sound: released as usual; a lost one is cut.
        (assoc.abort if lost else assoc.release)()
    return SendResult(sent, warnings, time.monotonic() - started)


def echo(destination: Destination, settings: SendSettings) -> int | None:
    """C-ECHO a destination: its status, or None when no association could be made."""
    ae = configure_ae(settings.association)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls_args(destination))
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp and "Status" in rsp else None
    finally:
        assoc.release()


class Sender(PollingThread):
    """Runs due deliveries one at a time, until stopped."""

    def __init__(self, queue: JobStore, settings: SendSettings, poll_interval_s: float, metrics: Metrics | None = None,
                 ledger: StreamLedger | None = None):
        """ledger: streaming's records: chunks to send while their series arrives, and what a
        delivery need not send again."""
        super().__init__("ldct-sender", poll_interval_s)
        self.queue = queue
        self.settings = settings
        self.metrics = metrics
        self._destinations = {d.name: d for d in settings.destinations}
        # Built once, here: an unusable certificate, key or CA file stops the node at start (ConfigError).
        self._contexts = {d.name: tls_args(d)[0] for d in settings.destinations if d.tls is not None}
        self.ledger = ledger
        # Destination -> time.monotonic() before which no chunk is streamed to it after a failure.
        self._stream_paused_until: dict[str, float] = {}

    def step(self) -> bool:
        """Every delivery due now and every streamed chunk not sent, unless stopped in between.
        False when there was nothing to send."""
        due = self.queue.due_deliveries()
        for delivery in due:
            if self.stopping.is_set():
                break
            self.deliver(delivery)
        streamed = self.stream() if self.ledger else False
        return bool(due) or streamed

    def stream(self) -> bool:
        """Send each destination the chunks streaming derived that it has not stored, one association
        per series. A failure only pauses streaming to that destination for send.backoff_initial_s:
        the delivery when the series closes sends whatever is still missing, with its retries."""
        worked = False
        for name, destination in self._destinations.items():
            if time.monotonic() < self._stream_paused_until.get(name, 0.0):
                continue
            for series_uid, files in self.ledger.unsent(name).items():
                if self.stopping.is_set():
                    return worked
                worked = True
                if not self._stream_chunk(series_uid, files, destination):
                    self._stream_paused_until[name] = time.monotonic() + self.settings.backoff_initial_s
                    break
        return worked

    def _stream_chunk(self, series_uid: str, files: list[Path], destination: Destination) -> bool:
        stored: list[Path] = []
        bound = log.bind(series_uid=series_uid, destination=destination.name)
        try:
            result = send_series(files, destination, self.settings, self._contexts.get(destination.name), stored)
        except Exception as exc:  # noqa: BLE001 - as in deliver: the attempt fails, the thread goes on
            bound.warning("streamed chunk not sent", reason=failure_reason(exc), stored=len(stored), instances=len(files),
                          paused_s=self.settings.backoff_initial_s)
            return False
        finally:
            self.ledger.sent(series_uid, destination.name, stored)
        bound.info("streamed chunk sent", instances=result.sent, warnings=result.warnings,
                   seconds=round(result.seconds, 3))
        return True

    def deliver(self, delivery: DueDelivery) -> SeriesState:
        """One attempt for one (series, destination); returns the series state afterwards."""
        destination = self._destinations.get(delivery.destination)
        files = sorted(delivery.outbox.glob("*.dcm"))
        bound = log.bind(series_uid=delivery.series_uid, derived_series_uid=delivery.derived_series_uid,
                         destination=delivery.destination, attempt=delivery.attempts + 1)
        try:
            if destination is None:
                raise SendError(f"destination {delivery.destination!r} is no longer in send.destinations")
            if len(files) != delivery.slices:
                # Never deliver part of a series as if it were whole; a retry after the final
                # failure denoises it again.
                raise SendError(f"outbox {delivery.outbox} holds {len(files)} of {delivery.slices} derived instances")
            already = self.ledger.sent_to(delivery.series_uid, delivery.destination) if self.ledger else set()
            rest = [path for path in files if path not in already]
            result = (send_series(rest, destination, self.settings, self._contexts.get(destination.name))
                      if rest else SendResult(0, 0, 0.0))
        except Exception as exc:  # noqa: BLE001 - a network stack error must fail the attempt, not the thread
            return self._failed(delivery, failure_reason(exc), bound)
        streamed = {"streamed_before": len(files) - len(rest)} if len(rest) < len(files) else {}
        bound.info("series delivered", instances=result.sent, warnings=result.warnings,
                   seconds=round(result.seconds, 3), **streamed)
        return self._settled(self.queue.delivered(delivery.series_uid, delivery.destination, len(files)))

    def _failed(self, delivery: DueDelivery, reason: str, bound) -> SeriesState:
        outcome = self.queue.delivery_failed(delivery.series_uid, delivery.destination, reason,
                                             retry_policy(self.settings))
        retry = {} if outcome.gave_up else {"next_attempt_in_s": round(outcome.next_attempt_at - time.time(), 1)}
        (bound.error if outcome.gave_up else bound.warning)(
            "delivery attempt failed", reason=reason, gave_up=outcome.gave_up, **retry)
        if self.metrics and not outcome.gave_up:
            self.metrics.send_retries.inc()
        return self._settled(outcome.series_state)

    def _settled(self, state: SeriesState) -> SeriesState:
        """The series state after an attempt; counted when the series left `sending` as done or failed."""
        if self.metrics and state in FINISHED:
            self.metrics.series_finished(state)
        return state
