"""The receiver's acceptor: the PDUs and command sets it writes read back as DICOM says (through
pydicom and pynetdicom). Its behaviour towards callers is tested through the receiver
(test_receive, test_receive_limits, test_tls, test_node_peers)."""

from __future__ import annotations

import socket
import threading
import tracemalloc
from io import BytesIO

import pydicom
import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from ldct_node.node.acceptor import (
    ERROR_COMMENT_MAX,
    Acceptor,
    Limits,
    Negotiator,
    Stored,
    ae_titles,
    overlong_uid,
    reject_pdu,
    response,
)
from ldct_node.node.upper_layer import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    ASSOCIATE_RQ,
    C_STORE_RQ,
    COMMAND,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    LAST,
    MESSAGE_ID,
    PDU_HEADER,
    RELEASE_RQ_PDU,
    command_set,
    element,
    p_data_tf,
    read_exactly,
    read_header,
    uid_value,
    us,
    user_information,
)


def decoded(command: bytes) -> pydicom.Dataset:
    return pydicom.filereader.read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)


def test_a_c_store_response_carries_status_uids_and_an_even_error_comment():
    ds = decoded(response(C_STORE_RQ, 9, 0xA900, uid_value(CTImageStorage), uid_value("1.2.3"), "odd"))
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.CommandDataSetType, ds.Status) == (0x8001, 9, 0x0101, 0xA900)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID, ds.ErrorComment) == (CTImageStorage, "1.2.3", "odd")
    assert ds.CommandGroupLength == len(response(C_STORE_RQ, 9, 0xA900, uid_value(CTImageStorage),
                                                 uid_value("1.2.3"), "odd")) - 12


def test_an_error_comment_is_cut_to_what_lo_holds():
    ds = decoded(response(C_STORE_RQ, 1, 0xC000, comment="x" * 100))
    assert ds.ErrorComment == "x" * ERROR_COMMENT_MAX


def test_a_uid_over_64_characters_is_named():
    assert overlong_uid({AFFECTED_SOP_INSTANCE: uid_value("1." + "2" * 70)}) == ("AffectedSOPInstanceUID", 72)
    assert overlong_uid({AFFECTED_SOP_CLASS: uid_value(CTImageStorage)}) is None


def associate_rq(calling: str = "SCANNER", called: str = "LDCT_NODE") -> bytes:
    """An A-ASSOCIATE-RQ body (after the PDU header) proposing CT in explicit VR and MR, from pynetdicom."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = calling, called
    ct, mr = build_context(CTImageStorage, "1.2.840.10008.1.2.1"), build_context(MRImageStorage)
    ct.context_id, mr.context_id = 1, 3
    request.presentation_context_definition_list = [ct, mr]
    request.user_information = user_information(16384)
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(request)
    return rq.encode()[6:]


def test_the_associate_answers_decode_in_pynetdicom_and_echo_the_callers_ae_titles():
    body = associate_rq()
    negotiated = Negotiator({CTImageStorage: ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")}, 65536).negotiate(body[68:])
    assert negotiated.contexts == {1: "1.2.840.10008.1.2.1"}
    ac = A_ASSOCIATE_AC()
    ac.decode(negotiated.accept_pdu(body[:68]))
    answer = ac.to_primitive()
    assert answer.maximum_length_received == 65536
    assert [(c.context_id, c.result) for c in answer.presentation_context_definition_results_list] == [(1, 0), (3, 3)]
    assert (answer.calling_ae_title, answer.called_ae_title) == ("SCANNER", "LDCT_NODE")

    rj = A_ASSOCIATE_RJ()
    rj.decode(reject_pdu(0x01, 0x01, 0x07))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (0x01, 0x01, 0x07)


def test_the_same_proposal_from_another_caller_is_answered_from_memory_with_that_callers_titles():
    negotiator = Negotiator({CTImageStorage: ("1.2.840.10008.1.2.1",)}, 65536)
    first, second = associate_rq("CT1"), associate_rq("CT2", "OTHER")
    assert negotiator.negotiate(first[68:]) is negotiator.negotiate(second[68:])
    assert negotiator.negotiate.cache_info().hits == 1
    ac = A_ASSOCIATE_AC()
    ac.decode(negotiator.negotiate(second[68:]).accept_pdu(second[:68]))
    assert (ac.calling_ae_title, ac.called_ae_title) == ("CT2", "OTHER")
    assert ae_titles(second) == ("OTHER", "CT2")


@pytest.mark.parametrize("title", [b" " * 16, b"BAD\\TITLE".ljust(16)])
def test_an_ae_title_of_spaces_or_with_a_backslash_is_malformed(title):
    body = bytearray(associate_rq())
    body[20:36] = title
    with pytest.raises(ValueError):
        ae_titles(bytes(body))


class MemoryAtStore:
    """A Policy that lets everyone in and notes the memory traced while a data set is stored."""

    def __init__(self):
        self.traced: list[int] = []

    def requested(self, calling_ae, called_ae):
        return None

    def no_context(self):
        raise AssertionError("the CT context was proposed")

    def refused(self, refusal, **fields):
        raise AssertionError(refusal)

    def store(self, request: Stored):
        self.traced.append(tracemalloc.get_traced_memory()[0])
        return 0x0000, None


def test_a_data_set_is_held_once_not_also_as_its_pdus_while_it_is_stored():
    size, fragment = 8 << 20, 64 << 10
    data_set = bytes(size)
    ours, theirs = socket.socketpair()
    policy = MemoryAtStore()
    acceptor = Acceptor(ours, Limits(fragment + 6, 2 * size, 10.0, 10.0),
                        Negotiator({CTImageStorage: ("1.2.840.10008.1.2.1",)}, fragment + 6), policy)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        serving = threading.Thread(target=acceptor.serve)
        serving.start()
        rq = associate_rq()
        theirs.sendall(PDU_HEADER.pack(ASSOCIATE_RQ, len(rq)) + rq)
        read_exactly(theirs, read_header(theirs)[1])  # the A-ASSOCIATE-AC
        command = command_set(element(AFFECTED_SOP_CLASS, uid_value(CTImageStorage)),
                              element(COMMAND_FIELD, us(C_STORE_RQ)), element(MESSAGE_ID, us(1)),
                              element(DATA_SET_TYPE, us(0x0000)), element(AFFECTED_SOP_INSTANCE, uid_value("1.2.3")))
        theirs.sendall(p_data_tf(1, COMMAND | LAST, command))
        for at in range(0, size, fragment):
            theirs.sendall(p_data_tf(1, LAST if at + fragment >= size else 0, data_set[at:at + fragment]))
        read_exactly(theirs, read_header(theirs)[1])  # the C-STORE-RSP
        theirs.sendall(RELEASE_RQ_PDU)
        serving.join(10)
    finally:
        tracemalloc.stop()
        ours.close()
        theirs.close()
    (held,) = policy.traced
    assert size <= held - before < 1.5 * size
