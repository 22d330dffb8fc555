"""What a caller can make the receiver hold: memory per PDU and per instance, connection slots, time.

The hostile callers here speak the DICOM upper layer by hand over a raw socket on loopback, since a
real SCU will not send a PDU longer than it says or stop in the middle of one. Every wait is bounded.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import CTImageStorage, Verification
from structlog.testing import capture_logs

from ldct_node.node.acceptor import ASSOCIATE_RQ_MAX
from ldct_node.node.receive import Receiver
from ldct_node.node.upper_layer import PeerClosed, TimedOut, pdv_items, read_exactly
from tests.requestor import rejection

pytestmark = pytest.mark.timeout(30)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 0x01, 0x02, 0x03, 0x04, 0x07
MiB = 1 << 20


@pytest.fixture
def node(receivers):
    return receivers


def refusals(receiver: Receiver, reason: str) -> float:
    return receiver.metrics.registry.get_sample_value("ldct_connections_refused_total", {"reason": reason}) or 0


def wait_for(condition, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- the DICOM upper layer by hand (PS3.8 §9.3) ---

def item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(calling: str = "SCANNER", called: str = "LDCT_NODE", abstract: str = Verification,
                 syntax: str = ImplicitVRLittleEndian, max_pdu: int = 16384) -> bytes:
    context = bytes([1, 0, 0, 0]) + item(0x30, abstract.encode()) + item(0x40, syntax.encode())
    user = item(0x51, struct.pack(">L", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9.9999")
    return pdu(A_ASSOCIATE_RQ, struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
               + bytes(32) + item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context) + item(0x50, user))


def pdv(data: bytes, control: int, context_id: int = 1) -> bytes:
    """One presentation data value item; control bit 0: command, bit 1: last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def read_pdu(sock: socket.socket, seconds: float = 5) -> tuple[int, bytes] | None:
    """The next PDU from the node, or None when it closed the connection; fails the test on a timeout."""
    sock.settimeout(seconds)
    header = sock.recv(6, socket.MSG_WAITALL)
    if len(header) < 6:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, sock.recv(length, socket.MSG_WAITALL)


def closed_by_node(sock: socket.socket, seconds: float = 5) -> bool:
    """True once the node has closed the connection (after an A-ABORT or not); False if it stays open."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def raw_associate(receiver: Receiver, calling: str = "SCANNER", abstract: str = Verification) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
    sock.sendall(associate_rq(calling, receiver.settings.ae_title, abstract))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC
    return sock


def flood(sock: socket.socket, nbytes: int) -> int:
    """Send up to nbytes of zeros; how many went out before the node closed the connection."""
    sent, chunk = 0, bytes(64 * 1024)
    sock.settimeout(5)
    try:
        while sent < nbytes:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def sender(receiver: Receiver, calling: str = "SCANNER"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", receiver.port, ae_title=receiver.settings.ae_title)


# --- item 1: memory ---

def test_an_associate_request_claiming_4_gib_is_aborted_after_its_header_alone(node):
    receiver = node()
    sock = socket.create_connection(("127.0.0.1", receiver.port))
    sock.sendall(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 0xFFFFFFFF))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == A_ABORT
    # Loopback buffers take a few MB; past them, a node that read only the header has stopped reading.
    assert flood(sock, 32 * MiB) < 32 * MiB
    assert closed_by_node(sock)
    assert wait_for(lambda: refusals(receiver, "pdu_too_long") == 1)


def test_an_associate_request_over_the_sane_bound_is_refused_and_one_under_it_accepted(node):
    receiver = node()
    sock = socket.create_connection(("127.0.0.1", receiver.port))
    sock.sendall(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, ASSOCIATE_RQ_MAX + 1))
    assert read_pdu(sock)[0] == A_ABORT
    sock.close()
    assoc = sender(receiver)
    assert assoc.is_established
    assoc.release()


def test_a_p_data_pdu_longer_than_the_negotiated_maximum_is_aborted_after_its_header(node):
    receiver = node(max_pdu=MiB)
    sock = raw_associate(receiver)
    sock.sendall(struct.pack(">BBL", P_DATA_TF, 0, 0xFFFFFFF0))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == A_ABORT
    assert flood(sock, 32 * MiB) < 32 * MiB
    assert closed_by_node(sock)
    assert wait_for(lambda: refusals(receiver, "pdu_too_long") == 1)


def test_an_instance_larger_than_max_instance_bytes_is_aborted_in_pdus_of_allowed_size(node):
    receiver = node(max_pdu=65536, max_instance_bytes=MiB)
    sock = raw_associate(receiver, abstract=CTImageStorage)
    fragment = pdu(P_DATA_TF, pdv(bytes(65536 - 6), control=0x00))  # data set, not the last fragment
    sock.settimeout(5)
    sent = 0
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        while sent < 64 * MiB:
            sock.sendall(fragment)
            sent += len(fragment)
    assert sent < 16 * MiB
    assert wait_for(lambda: refusals(receiver, "instance_too_large") == 1)


def test_pdv_items_are_walked_from_a_p_data_body_and_a_broken_one_is_refused():
    body = pdv(b"abc", 0x03) + pdv(b"defgh", 0x00, context_id=3)
    assert [(cid, control, bytes(data)) for cid, control, data in pdv_items(body)] == [
        (1, 0x03, b"abc"), (3, 0x00, b"defgh")]
    with pytest.raises(ValueError):
        pdv_items(body[:-1])


def test_a_read_returns_the_whole_length_sent_in_parts_and_says_when_the_peer_closed_or_the_time_ran_out():
    ours, peer = socket.socketpair()
    try:
        peer.sendall(b"a" * 100_000)
        later = threading.Timer(0.05, peer.sendall, (b"b" * 50_000,))
        later.start()
        assert read_exactly(ours, 150_000) == b"a" * 100_000 + b"b" * 50_000
        later.join()
        peer.sendall(b"c" * 10)
        with pytest.raises(TimedOut):
            read_exactly(ours, 100, deadline=time.monotonic() + 0.1)
        peer.close()
        with pytest.raises(PeerClosed):
            read_exactly(ours, 100)
    finally:
        ours.close()


# --- item 2: slots and time ---

def test_silent_half_requests_do_not_take_the_slots_of_allowed_callers(node):
    receiver = node(max_associations=2)
    idle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(8)]
    for sock in idle:
        sock.sendall(associate_rq()[:26])
    time.sleep(0.3)
    held = [sender(receiver) for _ in range(2)]
    assert all(a.is_established for a in held)
    for assoc in held:
        assoc.release()


def test_a_connection_that_does_not_finish_its_request_in_time_is_closed(node):
    receiver = node(acse_timeout_s=1.0)
    sock = socket.create_connection(("127.0.0.1", receiver.port))
    sock.sendall(associate_rq()[:26])
    started = time.monotonic()
    assert closed_by_node(sock, seconds=5)
    assert time.monotonic() - started < 3
    assert wait_for(lambda: refusals(receiver, "negotiation_timeout") == 1)


def test_a_request_trickled_byte_by_byte_is_cut_at_the_deadline_not_per_byte(node):
    receiver = node(acse_timeout_s=1.0)
    sock = socket.create_connection(("127.0.0.1", receiver.port))
    sock.sendall(associate_rq()[:6])
    started = time.monotonic()
    try:
        for byte in associate_rq()[6:]:
            sock.send(bytes([byte]))
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert time.monotonic() - started < 3


def test_an_associated_caller_silent_in_the_middle_of_a_pdu_is_dropped_after_the_idle_timeout(node):
    receiver = node(network_timeout_s=1.0)
    sock = raw_associate(receiver)
    sock.sendall(struct.pack(">BBL", P_DATA_TF, 0, 100) + bytes(10))
    started = time.monotonic()
    assert closed_by_node(sock, seconds=5)
    assert time.monotonic() - started < 3
    assert sender(receiver, "NEXT").is_established


def test_sixteen_simultaneous_senders_are_all_let_in_by_default(node):
    receiver = node()
    results, barrier = [], threading.Barrier(16)

    def one(i: int) -> None:
        assoc = sender(receiver, "SCANNER")
        results.append(assoc.is_established)
        barrier.wait(timeout=10)  # all 16 held at once
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [True] * 16


def test_a_caller_over_its_own_limit_is_refused_while_other_callers_get_in(node):
    receiver = node(max_associations_per_caller=2)
    with capture_logs() as logs:
        held = [sender(receiver, "SCANNER") for _ in range(2)]
        third = rejection(receiver.port, "SCANNER", receiver.settings.ae_title)
        other = sender(receiver, "OTHER")
        assert wait_for(lambda: any(e["event"] == "association ended" for e in logs))
    assert all(a.is_established for a in held) and other.is_established
    assert third == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    (line,) = [e for e in logs if e["event"] == "association ended"]
    assert line["reason"].startswith("association limit per caller")
    assert wait_for(lambda: refusals(receiver, "caller_limit") == 1)
    for assoc in (*held, other):
        assoc.release()


def test_the_association_limit_counts_only_callers_let_in(node):
    receiver = node(max_associations=1)
    held = sender(receiver, "FIRST")
    assert held.is_established
    assert rejection(receiver.port, "SECOND", receiver.settings.ae_title) == (0x02, 0x03, 0x02)
    assert wait_for(lambda: refusals(receiver, "association_limit") == 1)
    held.release()
    assert wait_for(lambda: (a := sender(receiver, "THIRD")).is_established and (a.release() or True))


def test_a_called_ae_title_that_is_not_ours_is_rejected_as_not_recognised(node):
    receiver = node()
    assert rejection(receiver.port, "SCANNER", "SOMEONE_ELSE") == (0x01, 0x01, 0x07)
    assert wait_for(lambda: refusals(receiver, "called_ae_title") == 1)


def test_unassociated_connections_from_one_address_are_capped(node):
    receiver = node(max_pending_per_address=2)
    idle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(2)]
    assert wait_for(lambda: receiver.admission.pending == 2)
    extra = socket.create_connection(("127.0.0.1", receiver.port))
    assert closed_by_node(extra, seconds=3)
    assert wait_for(lambda: refusals(receiver, "unassociated_limit") == 1)
    for sock in idle:
        sock.close()


# --- item 6: a request UID over 64 characters ---

def c_store_rq(sop_instance_uid: str) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = CTImageStorage
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance_uid
    body = encode(cmd, True, True)
    cmd.CommandGroupLength = len(body)
    return encode(cmd, True, True)


@pytest.mark.filterwarnings("ignore:The value length .* exceeds the maximum length of 64:UserWarning")
def test_a_request_uid_over_64_characters_is_logged_when_pynetdicom_aborts(node):
    receiver = node()
    long_uid = "1.2." + "3" * 70
    with capture_logs() as logs:
        sock = raw_associate(receiver, abstract=CTImageStorage)
        sock.sendall(pdu(P_DATA_TF, pdv(c_store_rq(long_uid), 0x03)) + pdu(P_DATA_TF, pdv(b"\0" * 8, 0x02)))
        assert closed_by_node(sock)
        assert wait_for(lambda: any(e["event"] == "request refused" for e in logs))
    (line,) = [e for e in logs if e["event"] == "request refused"]
    assert line["element"] == "AffectedSOPInstanceUID" and line["length"] == len(long_uid)
    assert line["calling_ae"] == "SCANNER" and long_uid not in str(line)
    assert wait_for(lambda: refusals(receiver, "uid_too_long") == 1)


def test_a_command_other_than_store_or_echo_is_answered_unrecognised_and_the_association_goes_on(node):
    receiver = node()
    sock = raw_associate(receiver)
    find = Dataset()
    find.AffectedSOPClassUID = Verification
    find.CommandField = 0x0020  # C-FIND-RQ
    find.MessageID = 5
    find.CommandDataSetType = 0x0101
    find.CommandGroupLength = len(encode(find, True, True))
    sock.sendall(pdu(P_DATA_TF, pdv(encode(find, True, True), 0x03)))
    pdu_type, body = read_pdu(sock)
    (_context, control, command), = pdv_items(body)
    answer = decode(BytesIO(bytes(command)), True, True)
    assert (pdu_type, control, answer.CommandField, answer.MessageIDBeingRespondedTo, answer.Status) == (
        P_DATA_TF, 0x03, 0x8020, 5, 0x0211)
    sock.sendall(pdu(0x05, bytes(4)))  # A-RELEASE-RQ
    assert read_pdu(sock)[0] == 0x06
    sock.close()


@pytest.mark.parametrize(("name", "message"), [
    ("a PDV of a context that was never accepted", lambda: pdu(P_DATA_TF, pdv(b"\0" * 8, 0x03, context_id=9))),
    ("a data set before any command", lambda: pdu(P_DATA_TF, pdv(b"\0" * 8, 0x02))),
    ("a PDV item longer than its PDU", lambda: pdu(P_DATA_TF, struct.pack(">LBB", 100, 1, 0x03) + b"\0" * 8)),
    ("a second A-ASSOCIATE-RQ", lambda: associate_rq()),
])
def test_a_pdu_out_of_protocol_is_answered_with_an_abort_and_the_connection_closed(node, name, message):
    receiver = node()
    sock = raw_associate(receiver)
    sock.sendall(message())
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == A_ABORT, name
    assert closed_by_node(sock)
    assoc = sender(receiver)
    assert assoc.is_established, "the port keeps serving"
    assoc.release()
