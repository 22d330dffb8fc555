"""The DICOM upper layer and DIMSE pieces both of the node's own association ends share: the
sender's requestor (``store_scu``) and the receiver's acceptor (``acceptor``).

Association PDUs (A-ASSOCIATE-RQ, -AC, -RJ) are encoded and decoded by pynetdicom's PDU classes;
what is here is what repeats for every instance: P-DATA-TF framing (PS3.8 9.3.5, E.2), command
sets in implicit VR little endian (PS3.7 6.3.1, E.1) and reading whole PDUs from a socket under a
size limit and a deadline.
"""

from __future__ import annotations

import socket
import struct
import time

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(0x01, 0x08)
PDU_HEADER = struct.Struct(">BxL")
# PDV message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
COMMAND, LAST = 0x01, 0x02
# A PDV item's overhead inside a P-DATA-TF body: item length (4), context ID, control header.
PDV_OVERHEAD = 6
RELEASE_RQ_PDU = struct.pack(">BxLL", RELEASE_RQ, 4, 0)
RELEASE_RP_PDU = struct.pack(">BxLL", RELEASE_RP, 4, 0)

# Command fields (PS3.7 E.1) and the command data set type that says no data set follows.
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
# Command elements (group 0000) by element number.
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, RESPONDED_TO = 0x0002, 0x0100, 0x0110, 0x0120
PRIORITY, DATA_SET_TYPE, STATUS, ERROR_COMMENT, AFFECTED_SOP_INSTANCE = 0x0700, 0x0800, 0x0900, 0x0902, 0x1000


def user_information(max_pdu: int) -> list:
    """The user information items both ends send: the largest PDU we accept and our implementation."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    return [max_length, implementation, version]


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 service-user, 2 service-provider (with a reason)."""
    return struct.pack(">BxLBBBB", ABORT, 4, 0, 0, source, reason)


def element(number: int, value: bytes) -> bytes:
    """One command element (group 0000), implicit VR little endian."""
    return struct.pack("<HHL", 0x0000, number, len(value)) + value


def uid_value(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_set(*elements: bytes) -> bytes:
    """The elements (in tag order) behind their CommandGroupLength."""
    body = b"".join(elements)
    return element(0x0000, struct.pack("<L", len(body))) + body


def command_elements(command: bytes) -> dict[int, bytes]:
    """Element number -> value of an implicit VR little endian command set (group 0000)."""
    found, at = {}, 0
    while at + 8 <= len(command):
        _group, number, length = struct.unpack_from("<HHL", command, at)
        found[number] = command[at + 8:at + 8 + length]
        at += 8 + length
    return found


def us_of(found: dict[int, bytes], number: int, default: int = 0) -> int:
    value = found.get(number)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else default


def text_of(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii", "replace")


def p_data_tf(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU carrying one PDV item."""
    return struct.pack(">BxLLBB", P_DATA_TF, len(fragment) + PDV_OVERHEAD, len(fragment) + 2, context_id,
                       control) + fragment


def pdv_items(body: bytes | memoryview) -> list[tuple[int, int, memoryview]]:
    """(context ID, control header, data) of each PDV item of a P-DATA-TF body; ValueError for a
    broken item (a length that is too short or runs past the body)."""
    view, items, at = memoryview(body), [], 0
    while at < len(view):
        if at + PDV_OVERHEAD > len(view):
            raise ValueError("PDV item cut short")
        (length,) = struct.unpack_from(">L", view, at)
        if length < 2 or at + 4 + length > len(view):
            raise ValueError(f"PDV item length {length} does not fit the PDU")
        items.append((view[at + 4], view[at + 5], view[at + 6:at + 4 + length]))
        at += 4 + length
    return items


class PeerGone(Exception):
    """The other end aborted or closed the connection, or did not send in time."""


class PeerClosed(PeerGone):
    """The other end closed the connection."""


class TimedOut(PeerGone):
    """Nothing (or not all) arrived in time."""


def read_exactly(sock: socket.socket, count: int, deadline: float | None = None) -> bytearray:
    """count bytes; PeerGone when the connection closes first. deadline (time.monotonic()): the
    whole read must finish by then, however slowly the bytes trickle in."""
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    try:
        while got < count:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            n = sock.recv_into(view[got:])
            if n == 0:
                raise PeerClosed("the connection was closed")
            got += n
    except TimeoutError:
        raise TimedOut("nothing arrived in time") from None
    return buffer


def read_header(sock: socket.socket, deadline: float | None = None) -> tuple[int, int]:
    """(type, length) of the next PDU."""
    return PDU_HEADER.unpack(read_exactly(sock, PDU_HEADER.size, deadline))
