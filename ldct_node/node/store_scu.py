"""The sender's C-STORE requestor: one association, files sent as they lie on disk.

pynetdicom's requestor hands every PDU between two threads that poll with 1 ms sleeps and pauses
its reactor before each request; on loopback that held the sender to about 0.3x DCMTK's storescu.
Here the caller's thread does it all on a blocking socket: the association PDUs (A-ASSOCIATE-RQ,
-AC, -RJ) are encoded and decoded by pynetdicom's PDU classes, so negotiation stays pynetdicom's;
what repeats per instance is written here (PS3.8 9.3.5 P-DATA-TF, PS3.7 9.3.1 C-STORE): the
command set, then the data set straight from the file behind its File Meta Information, in
fragments of the largest PDU the peer accepts, and the response read before the next request.

Each transfer syntax of the files is proposed in a presentation context of its own, so that every
file goes in the syntax it is written in (no decode, no re-encode) whichever the peer accepts.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from ldct_node.config import AssociationSettings

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)

# PDU types (PS3.8 9.3.1).
ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
# PDV message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
COMMAND, LAST = 0x01, 0x02
# A PDV item's overhead inside a P-DATA-TF body: item length (4), context ID, control header.
PDV_OVERHEAD = 6
_PDU_HEADER = struct.Struct(">BxL")
# Longest association-phase PDU read from a peer (an A-ASSOCIATE-AC of 128 contexts stays far below).
_ASSOCIATE_MAX = 256 * 1024
# Largest response PDU read while sending: a C-STORE-RSP command set is a few hundred bytes.
_RESPONSE_MAX = 1024 * 1024
_RELEASE_RQ = struct.pack(">BxLL", RELEASE_RQ, 4, 0)
# A-ABORT, source service-user, no reason (PS3.8 9.3.8).
_ABORT = struct.pack(">BxLBBBB", ABORT, 4, 0, 0, 0, 0)

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
_DATA_SET = 0x0000  # CommandDataSetType: a data set follows (PS3.7 E.1)
_MEDIUM = 0x0000  # Priority
# Explicit VR (File Meta Information) VRs whose length field is 4 bytes after 2 reserved ones.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class AssociationFailed(Exception):
    """No association: rejected by the peer (rejected True, with its reason) or no connection at all."""

    def __init__(self, reason: str, rejected: bool):
        super().__init__(reason)
        self.rejected = rejected


class PeerGone(Exception):
    """The association ended under a request: the peer aborted or closed it, or did not answer in time."""


@dataclass(frozen=True)
class PartTen:
    """What a C-STORE needs of a DICOM file: its UIDs, its transfer syntax and where its data set starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data_set_offset: int


@dataclass(frozen=True)
class StoreResponse:
    status: int
    error_comment: str


def _text(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii", "replace")


def read_part_ten(head: bytes) -> PartTen:
    """The File Meta Information (PS3.10 7.1, explicit VR little endian) at the start of a file's bytes;
    ValueError when it is not a DICOM file or misses one of the three UIDs."""
    if head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    at, found = 132, {}
    while at + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, at)
        if group != 0x0002:
            break
        vr = head[at + 4:at + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", head, at + 8)
            value_at = at + 12
        else:
            (length,) = struct.unpack_from("<H", head, at + 6)
            value_at = at + 8
        found[element] = head[value_at:value_at + length]
        at = value_at + length
    try:
        return PartTen(_text(found[0x0002]), _text(found[0x0003]), _text(found[0x0010]), at)
    except KeyError as missing:
        raise ValueError(f"File Meta Information lacks (0002,{missing.args[0]:04X})") from None


def _element(element: int, value: bytes) -> bytes:
    """One command element (group 0000), implicit VR little endian as PS3.7 6.3.1 requires."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1), CommandGroupLength first."""
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid)),
        _element(0x0100, struct.pack("<H", C_STORE_RQ)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", _MEDIUM)),
        _element(0x0800, struct.pack("<H", _DATA_SET)),
        _element(0x1000, _uid(sop_instance_uid)),
    ))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def command_elements(command: bytes) -> dict[int, bytes]:
    """Element number -> value of an implicit VR little endian command set (group 0000)."""
    found, at = {}, 0
    while at + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, at)
        found[element] = command[at + 8:at + 8 + length]
        at += 8 + length
    return found


def p_data_tf(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU carrying one PDV item."""
    return struct.pack(">BxLLBB", P_DATA_TF, len(fragment) + PDV_OVERHEAD, len(fragment) + 2, context_id,
                       control) + fragment


def pdv_items(body: bytes) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, data) of each PDV item of a P-DATA-TF body."""
    items, at = [], 0
    while at + PDV_OVERHEAD <= len(body):
        (length,) = struct.unpack_from(">L", body, at)
        items.append((body[at + 4], body[at + 5], body[at + 6:at + 4 + length]))
        at += 4 + length
    return items


class StoreAssociation:
    """An established association for C-STORE requests, one at a time. Not thread-safe."""

    def __init__(self, sock: socket.socket, sop_class_uid: str, contexts: dict[str, int], max_send: int,
                 settings: AssociationSettings):
        self.sock = sock
        self.sop_class_uid = sop_class_uid
        self.contexts = contexts  # accepted transfer syntax -> presentation context ID
        self.max_send = max_send  # largest PDU the peer accepts; 0: no limit
        self.settings = settings
        self._message_id = 0

    @classmethod
    def request(cls, host: str, port: int, called_ae: str, sop_class_uid: str, transfer_syntaxes: list[str],
                settings: AssociationSettings, tls: tuple[ssl.SSLContext, str] | None = None) -> StoreAssociation:
        """Connect (TLS when given: the context and the server name to check) and negotiate; raises
        AssociationFailed."""
        try:
            sock = socket.create_connection((host, port), timeout=settings.acse_timeout_s)
        except OSError as exc:
            raise AssociationFailed(f"connection failed: {exc.strerror or exc}", rejected=False) from None
        try:
            # Each command and response is a small segment that Nagle's algorithm would hold back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls[0].wrap_socket(sock, server_hostname=tls[1])
            contexts = {syntax: 2 * i + 1 for i, syntax in enumerate(transfer_syntaxes)}
            sock.sendall(_associate_rq(called_ae, sop_class_uid, contexts, settings))
            pdu_type, pdu = _read_pdu(sock, _ASSOCIATE_MAX)
        except (OSError, ssl.SSLError, PeerGone) as exc:
            sock.close()
            raise AssociationFailed(f"negotiation failed: {exc}", rejected=False) from None
        if pdu_type == ASSOCIATE_RJ:
            sock.close()
            rejection = A_ASSOCIATE_RJ()
            rejection.decode(pdu)
            raise AssociationFailed(f"{rejection.result_str}: {rejection.reason_str}".lower(), rejected=True)
        if pdu_type != ASSOCIATE_AC:
            sock.close()
            raise AssociationFailed(f"answered PDU type 0x{pdu_type:02X} to the A-ASSOCIATE-RQ", rejected=False)
        accepted = A_ASSOCIATE_AC()
        accepted.decode(pdu)
        answer = accepted.to_primitive()
        by_id = {cid: syntax for syntax, cid in contexts.items()}
        agreed = {by_id[c.context_id]: c.context_id for c in answer.presentation_context_definition_results_list
                  if c.result == 0 and c.context_id in by_id}
        return cls(sock, sop_class_uid, agreed, answer.maximum_length_received or 0, settings)

    def store(self, path: Path) -> StoreResponse:
        """C-STORE one DICOM file as it is; raises PeerGone when the association ended under it,
        ValueError when the file cannot be sent over this association."""
        data = path.read_bytes()
        meta = read_part_ten(data)
        if meta.sop_class_uid != self.sop_class_uid:
            raise ValueError(f"SOP class {meta.sop_class_uid} was not negotiated (only {self.sop_class_uid})")
        context_id = self.contexts.get(meta.transfer_syntax)
        if context_id is None:
            raise ValueError(f"the destination accepted no presentation context for {meta.transfer_syntax}")
        self._message_id = self._message_id % 0xFFFF + 1
        try:
            # network_timeout_s bounds a peer that stops reading, dimse_timeout_s one that does not answer.
            self.sock.settimeout(self.settings.network_timeout_s)
            self.sock.sendall(p_data_tf(context_id, COMMAND | LAST,
                                        c_store_rq(self._message_id, meta.sop_class_uid, meta.sop_instance_uid)))
            body = memoryview(data)[meta.data_set_offset:]
            step = self.max_send - PDV_OVERHEAD if self.max_send else max(len(body), 1)
            for at in range(0, max(len(body), 1), step):
                control = LAST if at + step >= len(body) else 0
                self.sock.sendall(p_data_tf(context_id, control, body[at:at + step]))
            self.sock.settimeout(self.settings.dimse_timeout_s)
            return self._response()
        except (OSError, ssl.SSLError) as exc:
            raise PeerGone(f"association lost ({exc})") from None

    def _response(self) -> StoreResponse:
        command = b""
        while True:
            pdu_type, pdu = _read_pdu(self.sock, _RESPONSE_MAX)
            if pdu_type != P_DATA_TF:
                raise PeerGone("the destination aborted the association" if pdu_type == ABORT
                               else f"the destination sent PDU type 0x{pdu_type:02X} instead of a C-STORE response")
            for _context, control, value in pdv_items(pdu[6:]):
                if control & COMMAND:
                    command += value
                    if control & LAST:
                        return _store_response(command, self._message_id)

    def release(self) -> None:
        """A-RELEASE, then close; a peer that does not answer within acse_timeout_s is simply left."""
        try:
            self.sock.settimeout(self.settings.acse_timeout_s)
            self.sock.sendall(_RELEASE_RQ)
            while _read_pdu(self.sock, _RESPONSE_MAX)[0] != RELEASE_RP:
                pass
        except (OSError, ssl.SSLError, PeerGone):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        try:
            self.sock.sendall(_ABORT)
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.sock.close()


def _store_response(command: bytes, message_id: int) -> StoreResponse:
    found = command_elements(command)
    field = struct.unpack("<H", found.get(0x0100, b"\0\0")[:2])[0]
    if field != C_STORE_RSP or 0x0900 not in found:
        raise PeerGone(f"the destination answered command 0x{field:04X} instead of a C-STORE response")
    responded = struct.unpack("<H", found.get(0x0120, b"\0\0")[:2])[0]
    if responded != message_id:
        raise PeerGone(f"the destination answered message {responded}, not {message_id}")
    return StoreResponse(struct.unpack("<H", found[0x0900][:2])[0], _text(found.get(0x0902, b"")))


def _associate_rq(called_ae: str, sop_class_uid: str, contexts: dict[str, int], settings: AssociationSettings) -> bytes:
    """The A-ASSOCIATE-RQ PDU: one presentation context per transfer syntax, our PDU limit and implementation."""
    request = A_ASSOCIATE()
    request.application_context_name = APPLICATION_CONTEXT
    request.calling_ae_title = settings.ae_title
    request.called_ae_title = called_ae
    proposed = []
    for syntax, context_id in contexts.items():
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = sop_class_uid
        context.transfer_syntax = [syntax]
        proposed.append(context)
    request.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = settings.max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    request.user_information = [max_length, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise PeerGone("the destination closed the connection")
        got += n
    return bytes(buffer)


def _read_pdu(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    """(type, whole PDU) of the next PDU; PeerGone for one longer than limit or a closed connection."""
    try:
        header = _read_exactly(sock, _PDU_HEADER.size)
    except TimeoutError:
        raise PeerGone("no answer within the timeout") from None
    pdu_type, length = _PDU_HEADER.unpack(header)
    if length > limit:
        raise PeerGone(f"PDU type 0x{pdu_type:02X} of {length} bytes, over the {limit} accepted")
    try:
        return pdu_type, header + _read_exactly(sock, length)
    except TimeoutError:
        raise PeerGone("no answer within the timeout") from None
