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

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
)
from pynetdicom.presentation import PresentationContext

from ldct_node.config import AssociationSettings
from ldct_node.node.upper_layer import (
    ABORT,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    ERROR_COMMENT,
    LAST,
    MESSAGE_ID,
    P_DATA_TF,
    PDU_HEADER,
    PDV_OVERHEAD,
    PRIORITY,
    RELEASE_RP,
    RELEASE_RQ_PDU,
    RESPONDED_TO,
    STATUS,
    PeerGone,
    abort_pdu,
    command_elements,
    command_set,
    element,
    p_data_tf,
    pdv_items,
    read_exactly,
    read_header,
    text_of,
    uid_value,
    us,
    us_of,
    user_information,
)

# Longest association-phase PDU read from a peer (an A-ASSOCIATE-AC of 128 contexts stays far below).
_ASSOCIATE_MAX = 256 * 1024
# Largest PDU read while sending: a C-STORE-RSP command set is a few hundred bytes.
_RESPONSE_MAX = 1024 * 1024
_MEDIUM = 0x0000  # Priority
_DATA_SET = 0x0000  # CommandDataSetType: a data set follows
# Explicit VR (File Meta Information) VRs whose length field is 4 bytes after 2 reserved ones.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class AssociationFailed(Exception):
    """No association: rejected by the peer (rejected True, with its reason) or no connection at all."""

    def __init__(self, reason: str, rejected: bool):
        super().__init__(reason)
        self.rejected = rejected


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


def read_part_ten(head: bytes) -> PartTen:
    """The File Meta Information (PS3.10 7.1, explicit VR little endian) at the start of a file's bytes;
    ValueError when it is not a DICOM file or misses one of the three UIDs."""
    if head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    at, found = 132, {}
    while at + 8 <= len(head):
        group, number = struct.unpack_from("<HH", head, at)
        if group != 0x0002:
            break
        vr = head[at + 4:at + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", head, at + 8)
            value_at = at + 12
        else:
            (length,) = struct.unpack_from("<H", head, at + 6)
            value_at = at + 8
        found[number] = head[value_at:value_at + length]
        at = value_at + length
    try:
        return PartTen(text_of(found[0x0002]), text_of(found[0x0003]), text_of(found[0x0010]), at)
    except KeyError as missing:
        raise ValueError(f"File Meta Information lacks (0002,{missing.args[0]:04X})") from None


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1)."""
    return command_set(
        element(AFFECTED_SOP_CLASS, uid_value(sop_class_uid)),
        element(COMMAND_FIELD, us(C_STORE_RQ)),
        element(MESSAGE_ID, us(message_id)),
        element(PRIORITY, us(_MEDIUM)),
        element(DATA_SET_TYPE, us(_DATA_SET)),
        element(AFFECTED_SOP_INSTANCE, uid_value(sop_instance_uid)),
    )


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
            for _context, control, value in pdv_items(pdu[PDU_HEADER.size:]):
                if control & COMMAND:
                    command += value
                    if control & LAST:
                        return _store_response(command, self._message_id)

    def release(self) -> None:
        """A-RELEASE, then close; a peer that does not answer within acse_timeout_s is simply left."""
        try:
            self.sock.settimeout(self.settings.acse_timeout_s)
            self.sock.sendall(RELEASE_RQ_PDU)
            while _read_pdu(self.sock, _RESPONSE_MAX)[0] != RELEASE_RP:
                pass
        except (OSError, ssl.SSLError, PeerGone):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        try:
            self.sock.sendall(abort_pdu())
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.sock.close()


def _store_response(command: bytes, message_id: int) -> StoreResponse:
    found = command_elements(command)
    field = us_of(found, COMMAND_FIELD)
    if field != C_STORE_RSP or STATUS not in found:
        raise PeerGone(f"the destination answered command 0x{field:04X} instead of a C-STORE response")
    if us_of(found, RESPONDED_TO) != message_id:
        raise PeerGone(f"the destination answered message {us_of(found, RESPONDED_TO)}, not {message_id}")
    return StoreResponse(us_of(found, STATUS), text_of(found.get(ERROR_COMMENT, b"")))


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
    request.user_information = user_information(settings.max_pdu)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def _read_pdu(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    """(type, whole PDU) of the next PDU; PeerGone for one longer than limit or a closed connection."""
    pdu_type, length = read_header(sock)
    if length > limit:
        raise PeerGone(f"PDU type 0x{pdu_type:02X} of {length} bytes, over the {limit} accepted")
    return pdu_type, PDU_HEADER.pack(pdu_type, length) + bytes(read_exactly(sock, length))
