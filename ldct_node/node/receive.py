"""The DICOM receiver: a pynetdicom SCP for C-ECHO and C-STORE of CT Image Storage.

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
    command has a UID over 64 characters is aborted by pynetdicom; the node logs ``request refused``.
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

import functools
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
from typing import Callable, Iterator, NamedTuple

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.status import Status
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from ldct_node.config import AllowedPeer, ReceiveSettings
from ldct_node.dicom.pixels import decode_problem
from ldct_node.dicom.series import (
    BAD_UID,
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
from ldct_node.node.association import configure_ae, disable_nagle
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


ACCEPTED = 0x00  # A-ASSOCIATE Result (PS3.8 §7.1.1.7); 0x01 / 0x02: rejected permanent / transient
# A-ASSOCIATE-RJ (PS3.8 §9.3.4) as (result, source, reason): rejected-permanent, DICOM UL service-user,
# calling / called AE title not recognised; rejected-transient, service-provider (presentation), local
# limit exceeded: the caller may try again later.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
_REJECT_LIMIT = (0x02, 0x03, 0x02)

P_DATA_TF = 0x04
_PDU_TYPES = range(0x01, 0x08)
# Largest A-ASSOCIATE-RQ (or release / abort PDU) read: 128 presentation contexts, each with ten
# 64-character transfer syntaxes, plus user identity, stay under 128 KiB.
ASSOCIATE_RQ_MAX = 256 * 1024
_LAST_FRAGMENT = 0x02  # PDV message control header bit 1 (PS3.8 §E.2)
_UID_MAX = 64
_ARTIM_GRACE_S = 1.0
_ERROR_COMMENT_MAX = 64  # ErrorComment is LO
# Most bytes one socket read asks for: what has arrived (up to this) comes in one call, so memory
# still grows only with the bytes a peer actually sends.
_RECV_CHUNK = 1_048_576
# pynetdicom binds its standard handlers to these on every association: they format each PDU and
# DIMSE message for its own logger at info/debug level, which nothing shows (the node logs through
# structlog; stdlib logging stays at its WARNING default), at 0.2-0.3 ms per C-STORE on the DUL thread.
_PYNETDICOM_LOGGING_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


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


class Refusal(NamedTuple):
    """Why the node refuses or cuts a connection: the metric's label and a one-line reason."""

    label: str
    reason: str


def pdv_fragments(body: bytes) -> Iterator[tuple[int, int]]:
    """(message control header, data length) of each PDV item of a P-DATA-TF body; stops at a broken item."""
    at = 0
    while at + 6 <= len(body):
        (length,) = struct.unpack_from(">L", body, at)
        if length < 2 or at + 4 + length > len(body):
            return
        yield body[at + 5], length - 2
        at += 4 + length


class PduGuard:
    """Follows one connection's PDUs as pynetdicom's DUL reads them, ``recv(6)`` for a header and then
    ``recv(length)`` for its body, and says when to refuse: before a body longer than the node accepts is
    read, or when a DIMSE message (pynetdicom assembles it in memory) grows past ``max_instance`` bytes."""

    def __init__(self, max_pdu: int, max_instance: int):
        self.max_pdu = max_pdu
        self.max_instance = max_instance
        self._body_of: int | None = None  # the PDU type whose body is read next
        self._message = 0  # bytes so far of the command or data set being assembled

    def check(self, nr_bytes: int) -> Refusal | None:
        """Before a read of nr_bytes."""
        if self._body_of is None:
            return None
        limit = self.max_pdu if self._body_of == P_DATA_TF else ASSOCIATE_RQ_MAX
        if nr_bytes <= limit:
            return None
        return Refusal("pdu_too_long",
                       f"PDU type 0x{self._body_of:02X} says {nr_bytes} bytes, over the {limit} accepted")

    def read(self, data: bytes) -> Refusal | None:
        """After a read."""
        if self._body_of is None:
            # After a short or unknown header the DUL ends the connection without reading a body.
            if len(data) == 6 and data[0] in _PDU_TYPES:
                self._body_of = data[0]
            return None
        pdu_type, self._body_of = self._body_of, None
        if pdu_type != P_DATA_TF:
            return None
        for control, length in pdv_fragments(data):
            self._message += length
            if self._message > self.max_instance:
                return Refusal("instance_too_large",
                               f"DIMSE message over receive.max_instance_bytes ({self.max_instance})")
            if control & _LAST_FRAGMENT:
                self._message = 0
        return None


# A-ABORT (PS3.8 §9.3.8): source DICOM UL service-provider, reason invalid PDU parameter value.
_A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket of one accepted connection, with a PduGuard on what its DUL reads.

    DUL._read_pdu_data reads a PDU's 6-byte header, then asks recv() for as many bytes as the header's
    length field says (up to 4 GiB) and buffers them all before anything can look at them: recv() is
    the only place where a PDU can be refused in time. pynetdicom 3.0 creates the AssociationSocket
    inside RequestHandler._create_association with no way to choose its class, hence the re-classing
    in Receiver._attach.
    """

    guard: PduGuard
    on_refused: Callable[[Association, Refusal], None]

    def recv(self, nr_bytes: int) -> bytearray:
        refusal = self.guard.check(nr_bytes)
        if refusal is None:
            data = self._read(nr_bytes)
            refusal = self.guard.read(data)
            if refusal is None:
                return data
        try:
            self.socket.sendall(_A_ABORT)
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer may be gone already; the connection ends either way
        self.on_refused(self.assoc, refusal)
        # What recv() returns when the peer closes: the DUL takes the PDU as cut short and ends (Evt17).
        return bytearray()

    def _read(self, nr_bytes: int) -> bytearray:
        """What AssociationSocket.recv returns (nr_bytes, fewer only when the peer closes), in reads of up
        to _RECV_CHUNK instead of its 4 KiB ones: about 130 recv() calls less per 0.5 MB instance."""
        data = bytearray()
        while len(data) < nr_bytes:
            chunk = self.socket.recv(min(nr_bytes - len(data), _RECV_CHUNK))
            if not chunk:
                break
            data += chunk
        return data


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


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, but with the TLS handshake left to the connection's own thread.

    pynetdicom wraps an accepted socket in get_request, in the one thread that accepts connections,
    with a blocking handshake: one caller that connects and says nothing would stop every other from
    being accepted. Here the socket is only wrapped; GuardedRequestHandler shakes hands under the
    Admission and within receive.acse_timeout_s.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler of one TCP connection, in a thread of its own, inside the node's Admission.

    AE.make_server takes a request handler class; this is where a connection can be refused before
    pynetdicom starts its association's threads, and the one thread that sees the connection from
    accept to its end, so its place in the Admission is given back exactly once.
    """

    def __init__(self, request, client_address, server, *, receiver: Receiver):
        self.receiver = receiver
        self.assoc: Association | None = None
        self.slot: Slot | None = None
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        slot = self.receiver.admission.connect(self.client_address[0])
        if isinstance(slot, Refusal):
            self.receiver._refused_at_connect(self.client_address, slot)
            return  # socketserver closes the socket
        self.slot = slot
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self.receiver._handshake(self.request, slot):
                return
            # Bounds a read stopped inside a PDU, which pynetdicom's idle timer cannot interrupt.
            self.request.settimeout(self.receiver.settings.network_timeout_s)
            super().handle()  # creates the association (below) and starts its threads
            self.receiver._await_request(self.assoc, slot, self.request)
            self.assoc.join()
        finally:
            self.receiver._release(self.assoc, slot)

    def _create_association(self) -> Association:
        self.assoc = super()._create_association()
        self.receiver._attach(self.assoc, self.slot)
        return self.assoc


def overlong_uid(command: Dataset) -> tuple[str, int] | None:
    """(keyword, length) of the first UID in a DIMSE command set longer than DICOM's 64 characters."""
    for elem in command:
        if elem.VR == "UI" and len(str(elem.value or "")) > _UID_MAX:
            return elem.keyword, len(str(elem.value))
    return None


def rejection_reason(rj: A_ASSOCIATE) -> str:
    """pynetdicom's own A-ASSOCIATE-RJ as one line, e.g. "rejected transient: local limit exceeded"."""
    return f"{rj.result_str}: {rj.reason_str}".lower()


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
    pynetdicom's ``Event.encoded_dataset()`` puts in front, written directly instead of through a
    pydicom Dataset, which cost about a fifth of the receiver's CPU per instance."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def inspect(raw: bytes, affected_sop_uid: str, classify: Callable[[Dataset], Verdict | None]) -> Inspected:
    """Parse an encoded instance (with file meta) enough to spool it, or raise Refused."""
    try:
        ds = pydicom.dcmread(BytesIO(raw))
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


def status_dataset(status: StoreFailure, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return rsp


class Receiver:
    """The SCP. ``start()`` listens in background threads; ``stop()`` closes the port."""

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
        self._server = None
        self.admission = Admission(settings)
        self._audits: dict[Association, AssociationAudit] = {}
        self._slots: dict[Association, Slot] = {}
        self._audits_lock = threading.Lock()
        self._handlers: frozenset[Callable] = frozenset()  # the event handlers start() binds
        # Built here, so that an unusable certificate or key stops the node at start (ConfigError).
        self._ssl_context = server_context(settings.tls) if settings.tls else None

    def _make_ae(self) -> AE:
        s = self.settings
        ae = configure_ae(s.association)
        # The Admission decides; pynetdicom's own count (every acceptor thread alive, let in or not)
        # cannot exceed this, so its limit never refuses an allowed caller.
        ae.maximum_associations = s.max_associations + s.max_pending_connections
        # _await_request cuts a slow A-ASSOCIATE-RQ at acse_timeout_s; pynetdicom's own ARTIM a second
        # later is only a backstop (it is checked between reads, not during one).
        ae.acse_timeout = s.acse_timeout_s + _ARTIM_GRACE_S
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
            (evt.EVT_DIMSE_RECV, self._on_dimse),
            (evt.EVT_C_ECHO, lambda event: Status.SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._handlers = frozenset(handler for _, handler in handlers)
        ae = self._make_ae()
        server = ae.make_server(
            (self.settings.host, self.settings.port), evt_handlers=handlers, server_class=TlsAssociationServer,
            ssl_context=self._ssl_context,
            request_handler=functools.partial(GuardedRequestHandler, receiver=self),
        )
        # Each handler thread lives as long as its connection: stop() must not wait for them.
        server.daemon_threads = True
        # As AE.start_server(block=False) does, which cannot take a request handler; shutdown() removes it.
        ae._servers.append(server)
        threading.Thread(target=make_target(server.serve_forever), name="ldct-receiver", daemon=True).start()
        self._server = server
        log.info("receiver listening", ae_title=self.settings.ae_title, host=self.settings.host, port=self.port,
                 tls=self.settings.tls is not None,
                 client_certificates=self.settings.tls is not None and self.settings.tls.ca_file is not None)

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

    def store(self, found: Inspected, staged: Staged) -> None:
        """Put the staged instance in its place and record it: after this returns it is safe to answer success."""
        with self.spool.series_lock(found.series_uid):
            try:
                spooled = self.spool.commit(staged, found.series_uid, found.sop_uid)
            except SpoolFull as exc:
                raise Refused(StoreFailure.OUT_OF_RESOURCES, exc.strerror or "spool full") from None
            except OSError as exc:
                raise Refused(StoreFailure.OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}") from None
            try:
                self.queue.add_instance(found.series_uid, found.sop_uid, spooled.path)
            except sqlite3.Error as exc:
                # The file is safe in the spool and is re-indexed at the next start; the sender retries.
                raise Refused(StoreFailure.OUT_OF_RESOURCES, f"queue database unavailable: {exc}") from None

    def _audit(self, assoc: Association) -> AssociationAudit | None:
        with self._audits_lock:
            return self._audits.get(assoc)

    def _on_connection(self, event) -> None:
        if self.settings.tcp_nodelay:
            disable_nagle(event)
        host, port = event.address
        with self._audits_lock:
            self._audits[event.assoc] = AssociationAudit(host, port, time.monotonic())

    def _count(self, label: str) -> None:
        if self.metrics:
            self.metrics.connections_refused.labels(label).inc()

    def _attach(self, assoc: Association, slot: Slot) -> None:
        """Put a new association's socket under a PduGuard, leave it only the node's own event handlers
        on pynetdicom's logging events and remember its place in the Admission."""
        sock = assoc.dul.socket
        sock.__class__ = GuardedSocket  # see GuardedSocket: pynetdicom has no hook for the class
        sock.guard = PduGuard(self.settings.max_pdu, self.settings.max_instance_bytes)
        sock.on_refused = self._pdu_refused
        for event in _PYNETDICOM_LOGGING_EVENTS:
            for handler, _ in list(assoc.get_handlers(event)):
                if handler not in self._handlers:
                    assoc.unbind(event, handler)
        with self._audits_lock:
            self._slots[assoc] = slot

    def _release(self, assoc: Association | None, slot: Slot) -> None:
        self.admission.disconnect(slot)
        with self._audits_lock:
            self._slots.pop(assoc, None)

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

    def _refused_at_connect(self, address: tuple, refusal: Refusal) -> None:
        log.warning("connection refused", reason=refusal.reason, address=address[0], port=address[1])
        self._count(refusal.label)

    def _await_request(self, assoc: Association, slot: Slot, sock: socket.socket) -> None:
        """The negotiation deadline, kept from outside the DUL: pynetdicom checks its ARTIM timer only
        between reads, so an A-ASSOCIATE-RQ stopped or trickling inside its PDU would hold the
        connection (and pynetdicom's association count) for ever."""
        if slot.requested.wait(self.settings.acse_timeout_s):
            return
        if self._audit(assoc) is None:  # EVT_CONN_CLOSE came first: the peer left (a port probe)
            return
        refusal = Refusal("negotiation_timeout", f"no A-ASSOCIATE-RQ within receive.acse_timeout_s "
                                                 f"({self.settings.acse_timeout_s} s)")
        log.warning("connection closed", reason=refusal.reason, address=slot.address)
        self._count(refusal.label)
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the DUL's recv(), which then ends the connection
        except OSError:
            pass

    def _pdu_refused(self, assoc: Association, refusal: Refusal) -> None:
        audit = self._audit(assoc)
        log.warning("connection aborted", reason=refusal.reason, address=assoc.requestor.address,
                    calling_ae=audit.calling_ae if audit else None)
        self._count(refusal.label)

    def _association_refusal(self, slot: Slot, calling: str, called: str) -> tuple[Refusal, tuple] | None:
        """Why not to let this A-ASSOCIATE-RQ in, with its A-ASSOCIATE-RJ (result, source, reason); None: let in."""
        if called != self.settings.ae_title.strip():
            return Refusal("called_ae_title", "called AE title is not receive.ae_title"), _REJECT_CALLED_AE
        if not is_allowed(self.settings.allowed, calling, slot.address):
            return Refusal("calling_ae_title", "calling AE title not on receive.allowed"), _REJECT_CALLING_AE
        refusal = self.admission.admit(slot, calling)
        return None if refusal is None else (refusal, _REJECT_LIMIT)

    def _on_requested(self, event) -> None:
        primitive = event.assoc.requestor.primitive
        audit = self._audit(event.assoc)
        audit.calling_ae, audit.called_ae = primitive.calling_ae_title.strip(), primitive.called_ae_title.strip()
        with self._audits_lock:
            slot = self._slots[event.assoc]
        slot.requested.set()
        refused = self._association_refusal(slot, audit.calling_ae, audit.called_ae)
        if refused is not None:
            refusal, rj = refused
            audit.refused = refusal.reason
            self._count(refusal.label)
            event.assoc.acse.send_reject(*rj)
            # As pynetdicom's own rejections do: wait until the DUL has sent the A-ASSOCIATE-RJ,
            # otherwise the socket is closed under it and the caller only sees an abort.
            event.assoc.kill()

    def _on_dimse(self, event) -> None:
        # pynetdicom aborts such a request in its DUL thread and logs only to its own (silent) logger.
        found = overlong_uid(event.message.command_set)
        if found is not None:
            audit = self._audit(event.assoc)
            log.warning("request refused", reason=f"UID over {_UID_MAX} characters: the association is aborted",
                        element=found[0], length=found[1], address=event.assoc.requestor.address,
                        calling_ae=audit.calling_ae if audit else None)
            self._count("uid_too_long")

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
                raise Refused(StoreFailure.OUT_OF_RESOURCES,
                              f"spool has less than {self.spool.min_free_bytes} bytes free")
            header = part10_header(str(event.request.AffectedSOPClassUID), affected, str(event.context.transfer_syntax))
            raw = header + event.encoded_dataset(include_meta=False)
            # Written before it is parsed, so that the disk writes it back while inspect (about 1.2 ms of
            # CPU) runs: about 0.7 ms less per instance. What inspect refuses or ignores is discarded and
            # answered as before, as if never written.
            staged = self.spool.stage(raw)
            try:
                found = inspect(raw, affected, self.classify)
                if found.ignored is None:
                    self.store(found, staged)
            finally:
                self.spool.discard(staged)
            if found.ignored is not None:
                log.info("instance ignored", reason=found.ignored.reason, calling_ae=calling,
                         series_uid=found.series_uid, sop_uid=found.sop_uid)
                counted["ignored"] += 1
                if self.metrics:
                    self.metrics.ignored.labels(found.ignored.label).inc()
                return Status.SUCCESS
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
        return Status.SUCCESS

