"""The DICOM receiver: a pynetdicom SCP for C-ECHO and C-STORE of CT Image Storage.

What a sender sees:

- Association: a caller whose AE title (and host, where one is given) is not on
  ``receive.allowed`` is rejected with A-ASSOCIATE-RJ "rejected-permanent, service-user, calling
  AE title not recognised". An empty list accepts any caller. Only CT Image Storage (plus
  Verification) is negotiated, in implicit/explicit VR little endian, JPEG lossless (.57, .70),
  JPEG-LS (.80, .81), JPEG 2000 (.90, .91) and RLE (.5); any other SOP class or transfer syntax
  gets its presentation context rejected.
- C-STORE statuses:

  ============  =============================================================================
  ``0x0000``    stored: the file is fsynced and renamed in the spool and its row committed.
                Also answered for a valid CT image the node leaves alone (localizer, not
                axial, its own derived output come back = loop guard, ...): nothing is stored,
                one log line ``instance ignored`` with the UIDs and reason, and the metric
                ``ldct_instances_ignored_total{reason}``. The original stays in PACS and is not
                ours to keep; a failure status would make a routing PACS retry normal traffic
                such as scouts for ever.
  ``0xA700``    out of resources: free space on the spool volume is below
                ``receive.min_free_bytes`` or the disk filled while writing (nothing partial is
                left). The sender should retry later. Setting ``min_free_bytes`` above the
                volume size is the supported way to simulate a full spool.
  ``0xA900``    dataset does not match SOP class: a CT image without pixel data, or with fewer
                pixel bytes than Rows × Columns × BitsAllocated says.
  ``0xC000``    cannot understand: the dataset cannot be decoded.
  ``0xC001``    cannot understand: StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID
                missing or malformed, SOPInstanceUID different from the request's, or
                SOPClassUID missing or not CT Image Storage.
  ============  =============================================================================

  Every failure status carries an ErrorComment and is logged with the UIDs known so far and the
  calling AE title, never patient names or IDs.

- Audit: when the connection of an association closes, one line ``association ended`` with the
  calling and called AE titles, the peer's address and port, ``accepted`` (and the ``reason`` when
  refused: not on the allow-list, association limit, no acceptable presentation context),
  instances stored / ignored / refused, how it ended (released, aborted, connection closed) and
  its duration in seconds. A connection that never asked for an association gets no line.

The dataset is written exactly as it arrived (``event.encoded_dataset()``, no re-encoding); only
the header is parsed to find the UIDs and to classify it.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import CTImageStorage, Verification

from .config import AllowedPeer, ReceiveSettings
from .logs import get_logger
from .observe import Metrics
from .queue import Queue
from .series import UNREADABLE, classify
from .spool import Spool, SpoolFull, is_valid_uid

log = get_logger(__name__)

TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.4.57",  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
BAD_UIDS = 0xC001

ACCEPTED = 0x00  # A-ASSOCIATE Result (PS3.8 §7.1.1.7); 0x01 / 0x02: rejected permanent / transient
# A-ASSOCIATE-RJ (PS3.8 §9.3.4): rejected-permanent, DICOM UL service-user, calling AE title not recognised.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_ERROR_COMMENT_MAX = 64  # ErrorComment is LO
# How series.classify starts its reason for a value that cannot be decoded: that is a broken
# data set to refuse, not a valid image to leave alone.


class Refused(Exception):
    """A C-STORE the node cannot take, with its DIMSE status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Inspected:
    series_uid: str
    sop_uid: str
    ignore_reason: str | None  # None: an axial CT image to spool and denoise


@dataclass
class AssociationAudit:
    """One association as its audit line tells it; the receiver's event handlers fill it in."""

    address: str
    port: int
    opened_at: float  # time.monotonic()
    calling_ae: str | None = None  # None: no association was requested on this connection
    called_ae: str = ""
    refused: str | None = None  # why the association was refused; None: accepted
    ended: str | None = None  # "released" or "aborted", from the association's events
    instances: Counter = field(default_factory=Counter)  # C-STORE outcome -> count

    def fields(self, closed_at: float) -> dict:
        """The audit line's fields: AE titles, address and counts, never anything from a data set."""
        return {
            "calling_ae": self.calling_ae, "called_ae": self.called_ae, "address": self.address, "port": self.port,
            "accepted": self.refused is None, "reason": self.refused,
            "instances_stored": self.instances["stored"], "instances_ignored": self.instances["ignored"],
            "instances_refused": self.instances["refused"],
            "ended": self.ended or "connection closed", "seconds": round(closed_at - self.opened_at, 3),
        }


def rejection_reason(rj: A_ASSOCIATE) -> str:
    """pynetdicom's own A-ASSOCIATE-RJ as one line, e.g. "rejected transient: local limit exceeded"."""
    return f"{rj.result_str}: {rj.reason_str}".lower()


def is_allowed(allowed: tuple[AllowedPeer, ...], ae_title: str, host: str) -> bool:
    """The allow-list rule: empty list admits everyone; else AE title must match and host too, if given."""
    if not allowed:
        return True
    return any(p.ae_title.strip() == ae_title.strip() and p.host in ("", host) for p in allowed)


def pixel_bytes_expected(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) // 8


def check_pixels(ds: Dataset) -> None:
    """Raise Refused when the image has no pixel data, or (uncompressed) fewer bytes than its header says."""
    if "PixelData" not in ds:
        raise Refused(DATASET_MISMATCH, "CT image without pixel data")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    try:
        expected = pixel_bytes_expected(ds)
    except (AttributeError, TypeError, ValueError) as exc:
        raise Refused(DATASET_MISMATCH, f"image size attributes unusable: {exc}") from None
    if len(ds.PixelData) < expected:
        raise Refused(DATASET_MISMATCH, f"pixel data has {len(ds.PixelData)} bytes, header says {expected}")


def inspect(raw: bytes, affected_sop_uid: str, classify: Callable[[Dataset], str | None]) -> Inspected:
    """Parse an encoded instance (with file meta) enough to spool it, or raise Refused."""
    try:
        ds = pydicom.dcmread(BytesIO(raw))
        study_uid, series_uid, sop_uid, sop_class = (
            str(ds.get(name, "") or "") for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                     "SOPClassUID"))
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            if not is_valid_uid(uid):
                raise Refused(BAD_UIDS, f"{name} missing or not a valid UID")
        if sop_uid != affected_sop_uid:
            raise Refused(BAD_UIDS, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
        # A data set cut short loses its SOPClassUID; any other value contradicts the negotiated class.
        if sop_class != CTImageStorage:
            raise Refused(BAD_UIDS, "SOPClassUID missing or not CT Image Storage")
        check_pixels(ds)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types, some only when a value is read
        raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(exc).__name__}") from None
    reason = classify(ds)
    if reason is not None and reason.startswith(UNREADABLE):
        raise Refused(CANNOT_UNDERSTAND, reason)
    return Inspected(series_uid, sop_uid, reason)


def status_dataset(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return rsp


def reason_label(reason: str) -> str:
    """A bounded metric label from a classify reason: the part before any parenthesised detail."""
    return reason.split(" (")[0]


class Receiver:
    """The SCP. ``start()`` listens in background threads; ``stop()`` closes the port."""

    def __init__(
        self,
        settings: ReceiveSettings,
        spool: Spool,
        queue: Queue,
        classify: Callable[[Dataset], str | None] = classify,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.spool = spool
        self.queue = queue
        self.classify = classify
        self.metrics = metrics
        self._server = None
        self._audits: dict[Association, AssociationAudit] = {}
        self._audits_lock = threading.Lock()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, lambda event: self._ended(event.assoc, "released")),
            (evt.EVT_ABORTED, lambda event: self._ended(event.assoc, "aborted")),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self._make_ae().start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        log.info("receiver listening", ae_title=self.settings.ae_title, host=self.settings.host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.settings.port

    @property
    def is_running(self) -> bool:
        return self._server is not None and self._server.socket is not None and self._server.socket.fileno() >= 0

    def store(self, found: Inspected, raw: bytes) -> None:
        """Spool the instance and record it: after this returns it is safe to answer success."""
        with self.spool.series_lock(found.series_uid):
            try:
                spooled = self.spool.write_instance(found.series_uid, found.sop_uid, raw)
            except SpoolFull as exc:
                raise Refused(OUT_OF_RESOURCES, exc.strerror or "spool full") from None
            except OSError as exc:
                raise Refused(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}") from None
            try:
                self.queue.add_instance(found.series_uid, found.sop_uid, spooled.path)
            except sqlite3.Error as exc:
                # The file is safe in the spool and is re-indexed at the next start; the sender retries.
                raise Refused(OUT_OF_RESOURCES, f"queue database unavailable: {exc}") from None

    def _audit(self, assoc: Association) -> AssociationAudit | None:
        with self._audits_lock:
            return self._audits.get(assoc)

    def _on_connection(self, event) -> None:
        if self.settings.tcp_nodelay:
            # pynetdicom leaves Nagle on; with small DIMSE responses it stalls each C-STORE by ~40 ms.
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = event.address
        with self._audits_lock:
            self._audits[event.assoc] = AssociationAudit(host, port, time.monotonic())

    def _on_requested(self, event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title
        audit = self._audit(event.assoc)
        audit.calling_ae, audit.called_ae = calling.strip(), requestor.primitive.called_ae_title.strip()
        if not is_allowed(self.settings.allowed, calling, requestor.address):
            audit.refused = "calling AE title not on receive.allowed"
            event.assoc.acse.send_reject(*_REJECT_CALLING_AE)
            # As pynetdicom's own rejections do: wait until the DUL has sent the A-ASSOCIATE-RJ,
            # otherwise the socket is closed under it and the caller only sees an abort.
            event.assoc.kill()

    def _on_accepted(self, event) -> None:
        if not event.assoc.accepted_contexts:
            # pynetdicom answers A-ASSOCIATE-AC with every context rejected, then aborts: refused in effect.
            self._audit(event.assoc).refused = "no presentation context accepted (SOP class or transfer syntax)"

    def _ended(self, assoc: Association, how: str) -> None:
        audit = self._audit(assoc)
        if audit is not None:  # a peer's abort can reach the association after its connection closed
            audit.ended = how

    def _on_connection_closed(self, event) -> None:
        with self._audits_lock:
            audit = self._audits.pop(event.assoc, None)
        if audit is None or audit.calling_ae is None:
            return
        # The connection closes in the DUL's thread, which can run ahead of the association's thread
        # and so fire before its EVT_REJECTED / EVT_ABORTED: hence the A-ASSOCIATE-RJ pynetdicom stores
        # before sending it, and a peer's A-ABORT still queued for the association's thread.
        answer = event.assoc.acceptor.primitive
        if audit.refused is None and answer is not None and answer.result != ACCEPTED:
            audit.refused = rejection_reason(answer)
        if audit.ended is None and event.assoc.acse.is_aborted():
            audit.ended = "aborted"
        (log.info if audit.refused is None else log.warning)("association ended", **audit.fields(time.monotonic()))

    def _on_store(self, event):
        calling = event.assoc.requestor.ae_title.strip()
        affected = str(event.request.AffectedSOPInstanceUID)
        audit = self._audit(event.assoc)
        # A peer that aborts just after sending leaves its last C-STORE to be handled after the audit line.
        counted = audit.instances if audit is not None else Counter()
        try:
            if not self.spool.has_room():
                raise Refused(OUT_OF_RESOURCES, f"spool has less than {self.spool.min_free_bytes} bytes free")
            raw = event.encoded_dataset(include_meta=True)
            found = inspect(raw, affected, self.classify)
            if found.ignore_reason is not None:
                log.info("instance ignored", reason=found.ignore_reason, calling_ae=calling,
                         series_uid=found.series_uid, sop_uid=found.sop_uid)
                counted["ignored"] += 1
                if self.metrics:
                    self.metrics.ignored.labels(reason_label(found.ignore_reason)).inc()
                return SUCCESS
            self.store(found, raw)
        except Refused as exc:
            log.warning("instance refused", status=f"0x{exc.status:04X}", reason=exc.reason, calling_ae=calling,
                        sop_uid=affected)
            counted["refused"] += 1
            if self.metrics:
                self.metrics.refused.labels(f"0x{exc.status:04X}").inc()
            return status_dataset(exc.status, exc.reason)
        counted["stored"] += 1
        if self.metrics:
            self.metrics.received.inc()
        return SUCCESS

