"""The DICOM receiver: an SCP for C-ECHO and C-STORE of CT Image Storage (the protocol in
``ldct_node.node.acceptor``, the decisions here).

What a sender sees:

- Association: a request to another called AE title than ``receive.ae_title`` is rejected with
  A-ASSOCIATE-RJ "rejected-permanent, service-user, called AE title not recognised"; a caller whose
  AE title (and host, where one is given) is not on ``receive.allowed`` with "... calling AE title
  not recognised". An empty list accepts any caller. Only CT Image Storage (plus
  Verification) is negotiated, in implicit/explicit VR little endian, JPEG lossless (.57, .70),
  JPEG-LS (.80, .81), JPEG 2000 (.90, .91) and RLE (.5); any other SOP class or transfer syntax
  gets its presentation context rejected.
- Limits, so that whoever reaches the port cannot exhaust memory or lock allowed callers out:

  * A PDU is refused (A-ABORT, connection closed) after its 6-byte header when its length is over
    ``receive.max_pdu`` (P-DATA-TF, the maximum we offer) or 256 KiB (``ASSOCIATE_RQ_MAX``, any other);
    an association whose C-STORE data set grows past ``receive.max_instance_bytes`` is aborted too.
  * A connection must complete its A-ASSOCIATE-RQ within ``receive.acse_timeout_s`` of connecting,
    however slowly it trickles; an association silent for ``receive.network_timeout_s`` (between
    PDUs or inside one) is dropped.
  * Connections that have not been let in yet (``receive.max_pending_connections``, and
    ``max_pending_per_address`` from one address; beyond them a new connection is closed at once) and
    associations let in (``receive.max_associations``, ``max_associations_per_caller`` per calling AE
    title and address; beyond them "rejected-transient, local limit exceeded") are counted apart.
  * Each refusal is one warning line and ``ldct_connections_refused_total{reason}``. A request whose
    command has a UID over 64 characters is aborted; the node logs ``request refused``.
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
  ``0xA900``    dataset does not match SOP class (series.image_problem, pixels.HEADER_RULES): a CT
                image without pixel data; uncompressed pixel data of another length than
                Rows × Columns × BitsAllocated / 8; RescaleSlope 0/NaN/infinite; colour
                (SamplesPerPixel ≠ 1); more than one frame; BitsStored > BitsAllocated; Rows or
                Columns 0.
  ``0xC000``    cannot understand: the dataset cannot be decoded, an element's VR bytes are no
                DICOM VR, or compressed pixel data of an instance to keep does not decode.
  ``0xC001``    cannot understand: StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID
                missing or malformed (a component with a leading zero included), SOPInstanceUID
                different from the request's, or SOPClassUID missing or not CT Image Storage.
  ``0x0110``    processing failure: a fault of the node itself while storing (logged as an
                error, "instance not stored"); the association goes on.
  ============  =============================================================================

  Every failure status carries an ErrorComment and is logged with the UIDs known so far and the
  calling AE title, never patient names or IDs.

- Audit: when the connection of an association closes, one line ``association ended`` with the
  calling and called AE titles, the peer's address and port, ``accepted`` (and the ``reason`` when
  refused: called AE title, not on the allow-list, association limits, no acceptable presentation
  context), instances stored / ignored / refused, how it ended (released, aborted, connection
  closed) and its duration in seconds. A connection that never asked for an association gets no line.

The dataset is written exactly as it arrived (behind the File Meta header ``part10_header`` writes, no re-encoding); only
the header is parsed to find the UIDs and to classify and check it; pixel data is decoded only when
compressed and kept (uncompressed pixel data: its length is checked, never decoded).
"""

from __future__ import annotations

import socket
import sqlite3
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from io import BytesIO
from typing import Callable

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.sop_class import CTImageStorage, Verification

from ldct_node.config import AllowedPeer, ReceiveSettings
from ldct_node.dicom.pixels import decode_problem
from ldct_node.dicom.series import (
    BAD_UID,
    HEADER_DEFER_BYTES,
    MISMATCH,
    UNDECODABLE,
    Verdict,
    VerdictKind,
    classify,
    image_problem,
    is_compressed,
    uid_problem,
)
from ldct_node.logs import get_logger
from ldct_node.node.acceptor import Acceptor, Limits, Negotiator, Refusal, Stored
from ldct_node.node.jobs import JobStore
from ldct_node.node.observe import Metrics
from ldct_node.node.spool import Spool, SpoolFull, Staged
from ldct_node.node.tls import server_context

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


class StoreFailure(IntEnum):
    """The C-STORE failure statuses the receiver answers (PS3.4 B.2.3; the table above says when)."""

    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    BAD_UIDS = 0xC001  # in the cannot-understand range: an identifying UID, SOP class or instance


SUPPORTED = {CTImageStorage: TRANSFER_SYNTAXES, Verification: ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")}
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.2.1.4: the node failed, not the instance
# A-ASSOCIATE-RJ (PS3.8 §9.3.4) as (result, source, reason): rejected-permanent, DICOM UL service-user,
# calling / called AE title not recognised; rejected-transient, service-provider (presentation), local
# limit exceeded: the caller may try again later.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
_REJECT_LIMIT = (0x02, 0x03, 0x02)
# Connections the kernel holds until the accepting thread takes them.
_BACKLOG = 128
_ACCEPT_RETRY_S = 0.1


class Refused(Exception):
    """A C-STORE the node cannot take, with its DIMSE status and a one-line reason."""

    def __init__(self, status: StoreFailure, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Inspected:
    series_uid: str
    sop_uid: str
    ignored: Verdict | None  # None: an axial CT image to spool and denoise


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


@dataclass(eq=False)
class Slot:
    """One TCP connection's place in the Admission: pending until let in as caller (calling AE, address)."""

    address: str
    caller: tuple[str, str] | None = None
    requested: threading.Event = field(default_factory=threading.Event)  # its A-ASSOCIATE-RQ has arrived


def _drop(counter: Counter, key) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class Admission:
    """Counts connections still negotiating and associations let in apart, so that callers who never
    pass the AE title checks cannot take the places of those who do. Thread-safe."""

    def __init__(self, settings: ReceiveSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._pending: Counter = Counter()  # address -> connections not let in (yet)
        self._callers: Counter = Counter()  # (calling AE, address) -> associations let in

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    @property
    def associated(self) -> int:
        return sum(self._callers.values())

    def connect(self, address: str) -> Slot | Refusal:
        s = self.settings
        with self._lock:
            if self.pending >= s.max_pending_connections:
                return Refusal("unassociated_limit", "connections without an association at "
                                                     f"receive.max_pending_connections ({s.max_pending_connections})")
            if self._pending[address] >= s.max_pending_per_address:
                return Refusal("unassociated_limit", "connections without an association from this address at "
                                                     f"receive.max_pending_per_address ({s.max_pending_per_address})")
            self._pending[address] += 1
        return Slot(address)

    def admit(self, slot: Slot, calling_ae: str) -> Refusal | None:
        s = self.settings
        caller = (calling_ae, slot.address)
        with self._lock:
            if self.associated >= s.max_associations:
                return Refusal("association_limit",
                               f"association limit reached (receive.max_associations = {s.max_associations})")
            if self._callers[caller] >= s.max_associations_per_caller:
                limit = s.max_associations_per_caller
                return Refusal("caller_limit",
                               f"association limit per caller reached (receive.max_associations_per_caller = {limit})")
            _drop(self._pending, slot.address)
            self._callers[caller] += 1
            slot.caller = caller
        return None

    def disconnect(self, slot: Slot) -> None:
        with self._lock:
            if slot.caller is None:
                _drop(self._pending, slot.address)
            else:
                _drop(self._callers, slot.caller)


def is_allowed(allowed: tuple[AllowedPeer, ...], ae_title: str, host: str) -> bool:
    """The allow-list rule: empty list admits everyone; else AE title must match and host too, if given."""
    if not allowed:
        return True
    return any(p.ae_title.strip() == ae_title.strip() and p.host in ("", host) for p in allowed)


# The failure status for each kind of series.Problem.
PROBLEM_STATUS = {
    MISMATCH: StoreFailure.DATASET_MISMATCH,
    UNDECODABLE: StoreFailure.CANNOT_UNDERSTAND,
    BAD_UID: StoreFailure.BAD_UIDS,
}


def check_pixels(ds: Dataset) -> None:
    """Raise Refused when the image's header makes it unusable (series.image_problem: no pixel data,
    uncompressed pixel data of another length than Rows x Columns x BitsAllocated/8, RescaleSlope
    0/NaN, colour, multi-frame, BitsStored > BitsAllocated, Rows or Columns 0, VR bytes, UIDs).
    Never decodes pixel data: check_codestream does, for the compressed instances the node keeps."""
    problem = image_problem(ds)
    if problem is not None:
        raise Refused(PROBLEM_STATUS[problem.kind], problem.reason)


def check_codestream(ds: Dataset) -> None:
    """Raise Refused (0xC000) when compressed pixel data does not decode to the image its header
    describes. Uncompressed pixel data is not decoded: its length is checked, and decoding it would
    only cost time."""
    if is_compressed(ds):
        problem = decode_problem(ds)
        if problem is not None:
            raise Refused(StoreFailure.CANNOT_UNDERSTAND, problem)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in explicit VR little endian (PS3.5 7.1.2); OB has the long header."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    # A UID that is not ASCII is refused by inspect (uid_problem) before anything is stored.
    data = value.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1) for a received data set: the bytes
    pynetdicom's ``Event.encoded_dataset()`` puts in front (pinned by a test), written directly
    instead of through a pydicom Dataset, which cost about a fifth of the receiver's CPU per instance."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def read_data_set(data_set: bytes, transfer_syntax: str) -> FileDataset:
    """A received data set as pydicom would read its spooled file, without parsing the File Meta the
    node itself writes in front (a tenth of the receiver's CPU) and without copying out values over
    HEADER_DEFER_BYTES (pixel data: only its length is checked, or it is decoded from the buffer)."""
    syntax = UID(transfer_syntax)
    buffer = BytesIO(data_set)
    # Every negotiated syntax is little endian (TRANSFER_SYNTAXES).
    found = read_dataset(buffer, syntax.is_implicit_VR, True, defer_size=HEADER_DEFER_BYTES)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(buffer, found, file_meta=meta, is_implicit_VR=syntax.is_implicit_VR, is_little_endian=True)
    ds.set_original_encoding(syntax.is_implicit_VR, True, found._character_set)
    return ds


def inspect(data_set: bytes, transfer_syntax: str, affected_sop_uid: str,
            classify: Callable[[Dataset], Verdict | None]) -> Inspected:
    """Parse a received data set enough to spool it, or raise Refused."""
    try:
        ds = read_data_set(data_set, transfer_syntax)
        study_uid, series_uid, sop_uid, sop_class = (
            str(ds.get(name, "") or "") for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                     "SOPClassUID"))
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            found = uid_problem(uid)
            if found:
                raise Refused(StoreFailure.BAD_UIDS, f"{name} {found}")
        if sop_uid != affected_sop_uid:
            raise Refused(StoreFailure.BAD_UIDS, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
        # A data set cut short loses its SOPClassUID; any other value contradicts the negotiated class.
        if sop_class != CTImageStorage:
            raise Refused(StoreFailure.BAD_UIDS, "SOPClassUID missing or not CT Image Storage")
        check_pixels(ds)
        verdict = classify(ds)
        if verdict is not None and verdict.kind is VerdictKind.UNREADABLE:
            # A value that cannot be decoded: a broken data set to refuse, not a valid image to leave alone.
            raise Refused(StoreFailure.CANNOT_UNDERSTAND, verdict.reason)
        if verdict is None:
            # Only what is kept is decoded: a scout or other image left alone costs no decode.
            check_codestream(ds)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types, some only when a value is read
        raise Refused(StoreFailure.CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(exc).__name__}") from None
    return Inspected(series_uid, sop_uid, verdict)


class Receiver:
    """The SCP. ``start()`` listens in a background thread, one more per connection; ``stop()`` closes the port."""

    def __init__(
        self,
        settings: ReceiveSettings,
        spool: Spool,
        queue: JobStore,
        classify: Callable[[Dataset], Verdict | None] = classify,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.spool = spool
        self.queue = queue
        self.classify = classify
        self.metrics = metrics
        self.admission = Admission(settings)
        association = settings.association
        self.limits = Limits(association.max_pdu, settings.max_instance_bytes, association.acse_timeout_s,
                             association.network_timeout_s)
        self.negotiator = Negotiator(SUPPORTED, association.max_pdu)
        self._listener: socket.socket | None = None
        # Built here, so that an unusable certificate or key stops the node at start (ConfigError).
        self._ssl_context = server_context(settings.tls) if settings.tls else None

    def start(self) -> None:
        self._listener = socket.create_server((self.settings.host, self.settings.port), backlog=_BACKLOG)
        threading.Thread(target=self._accept, args=(self._listener,), name="ldct-receiver", daemon=True).start()
        log.info("receiver listening", ae_title=self.settings.ae_title, host=self.settings.host, port=self.port,
                 tls=self.settings.tls is not None,
                 client_certificates=self.settings.tls is not None and self.settings.tls.ca_file is not None)

    def stop(self) -> None:
        """Close the port; associations under way finish in their own threads."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the listening thread
            except OSError:
                pass
            listener.close()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else self.settings.port

    @property
    def is_running(self) -> bool:
        return self._listener is not None and self._listener.fileno() >= 0

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if self._listener is not listener:
                    return  # stopped
                # Out of file descriptors or memory: the caller's TCP stack retries; we must not spin.
                log.warning("cannot accept a connection", error=str(exc))
                time.sleep(_ACCEPT_RETRY_S)
                continue
            # Each connection's thread lives as long as it: stop() must not wait for them.
            threading.Thread(target=self._connection, args=(sock, address), name="ldct-association",
                             daemon=True).start()

    def _connection(self, sock: socket.socket, address: tuple) -> None:
        """One TCP connection, from accept to close, inside the Admission."""
        slot = self.admission.connect(address[0])
        try:
            if isinstance(slot, Refusal):
                log.warning("connection refused", reason=slot.reason, address=address[0], port=address[1])
                self._count(slot.label)
                return
            try:
                self._associate(sock, address, slot)
            except Exception as exc:  # noqa: BLE001 - a fault of ours ends this connection, never the receiver
                log.error("connection failed", reason=f"{type(exc).__name__}: {exc}", address=address[0],
                          port=address[1])
            finally:
                self.admission.disconnect(slot)
        finally:
            sock.close()

    def _associate(self, sock: socket.socket, address: tuple, slot: Slot) -> None:
        if self.settings.tcp_nodelay:
            # Each C-STORE response is a small segment that Nagle's algorithm would hold back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl_context is not None:
            sock = self._ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            if not self._handshake(sock, slot):
                return
        audit = AssociationAudit(address[0], address[1], time.monotonic())
        ended = Acceptor(sock, self.limits, self.negotiator, Association(self, slot, audit)).serve()
        if audit.calling_ae is None:
            return  # no association was asked for (a port probe): no audit line
        audit.ended = ended
        (log.info if audit.refused is None else log.warning)("association ended", **audit.fields(time.monotonic()))

    def _count(self, label: str) -> None:
        if self.metrics:
            self.metrics.connections_refused.labels(label).inc()

    def _handshake(self, sock: ssl.SSLSocket, slot: Slot) -> bool:
        """The TLS handshake of a new connection, within receive.acse_timeout_s; False: refused, logged, counted."""
        sock.settimeout(self.settings.acse_timeout_s)
        try:
            sock.do_handshake()
            return True
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__  # e.g. CERTIFICATE_VERIFY_FAILED, TimeoutError
            refusal = Refusal("tls_handshake", f"TLS handshake failed: {reason}")
        log.warning("connection refused", reason=refusal.reason, address=slot.address)
        self._count(refusal.label)
        return False

    def association_refusal(self, slot: Slot, calling: str, called: str) -> tuple[Refusal, tuple] | None:
        """Why not to let this A-ASSOCIATE-RQ in, with its A-ASSOCIATE-RJ (result, source, reason); None: let in."""
        if called != self.settings.ae_title.strip():
            return Refusal("called_ae_title", "called AE title is not receive.ae_title"), _REJECT_CALLED_AE
        if not is_allowed(self.settings.allowed, calling, slot.address):
            return Refusal("calling_ae_title", "calling AE title not on receive.allowed"), _REJECT_CALLING_AE
        refusal = self.admission.admit(slot, calling)
        return None if refusal is None else (refusal, _REJECT_LIMIT)

    def store(self, found: Inspected, staged: Staged) -> None:
        """Put the staged instance in its place and record it: after this returns it is safe to answer success."""
        try:
            # Before the series lock, so that the fsyncs of associations sending one series overlap.
            self.spool.settle(staged)
            with self.spool.series_lock(found.series_uid):
                spooled = self.spool.commit(staged, found.series_uid, found.sop_uid)
                try:
                    self.queue.add_instance(found.series_uid, found.sop_uid, spooled.path)
                except sqlite3.Error as exc:
                    # The file is safe in the spool and is re-indexed at the next start; the sender retries.
                    raise Refused(StoreFailure.OUT_OF_RESOURCES, f"queue database unavailable: {exc}") from None
        except SpoolFull as exc:
            raise Refused(StoreFailure.OUT_OF_RESOURCES, exc.strerror or "spool full") from None
        except OSError as exc:
            raise Refused(StoreFailure.OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}") from None

    def take(self, request: Stored) -> str:
        """Inspect and spool one C-STORE's instance; its outcome for the audit ("stored", "ignored"), or
        Refused with the failure status and reason."""
        if not self.spool.has_room():
            raise Refused(StoreFailure.OUT_OF_RESOURCES, f"spool has less than {self.spool.min_free_bytes} bytes free")
        header = part10_header(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax)
        # Written before it is parsed, so that the disk writes it back while inspect (about 1 ms of
        # CPU) runs: about 0.7 ms less per instance. What inspect refuses or ignores is discarded and
        # answered as before, as if never written.
        staged = self.spool.stage(header, request.data_set)
        try:
            found = inspect(request.data_set, request.transfer_syntax, request.sop_instance_uid, self.classify)
            if found.ignored is None:
                self.store(found, staged)
        finally:
            self.spool.discard(staged)
        if found.ignored is not None:
            log.info("instance ignored", reason=found.ignored.reason, calling_ae=request.calling_ae,
                     series_uid=found.series_uid, sop_uid=found.sop_uid)
            if self.metrics:
                self.metrics.ignored.labels(found.ignored.label).inc()
            return "ignored"
        if self.metrics:
            self.metrics.received.inc()
        return "stored"


class Association:
    """The receiver's decisions for one connection's association (acceptor.Policy), with its audit."""

    def __init__(self, receiver: Receiver, slot: Slot, audit: AssociationAudit):
        self.receiver = receiver
        self.slot = slot
        self.audit = audit

    def requested(self, calling_ae: str, called_ae: str) -> tuple[int, int, int] | None:
        self.audit.calling_ae, self.audit.called_ae = calling_ae, called_ae
        refused = self.receiver.association_refusal(self.slot, calling_ae, called_ae)
        if refused is None:
            return None
        refusal, rejection = refused
        self.audit.refused = refusal.reason
        self.receiver._count(refusal.label)
        return rejection

    def no_context(self) -> None:
        self.audit.refused = "no presentation context accepted (SOP class or transfer syntax)"

    def refused(self, refusal: Refusal, **fields) -> None:
        event = {"negotiation_timeout": "connection closed", "uid_too_long": "request refused"}.get(
            refusal.label, "connection aborted")
        log.warning(event, reason=refusal.reason, address=self.slot.address, calling_ae=self.audit.calling_ae,
                    **fields)
        self.receiver._count(refusal.label)

    def store(self, request: Stored) -> tuple[int, str | None]:
        try:
            outcome = self.receiver.take(request)
        except Refused as exc:
            log.warning("instance refused", status=f"0x{exc.status:04X}", reason=exc.reason,
                        calling_ae=request.calling_ae, sop_uid=request.sop_instance_uid)
            self.audit.instances["refused"] += 1
            if self.receiver.metrics:
                self.receiver.metrics.refused.labels(f"0x{exc.status:04X}").inc()
            return exc.status, exc.reason
        except Exception as exc:  # noqa: BLE001 - a fault of ours must cost one instance, not the association
            log.error("instance not stored", reason=f"{type(exc).__name__}: {exc}", calling_ae=request.calling_ae,
                      sop_uid=request.sop_instance_uid)
            self.audit.instances["refused"] += 1
            return PROCESSING_FAILURE, "the node could not store the instance"
        self.audit.instances[outcome] += 1
        return SUCCESS, None
