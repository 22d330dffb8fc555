"""pynetdicom as the tests' association requestor, for the answers that are rejections.

pynetdicom 3's requestor loses a rejection that comes back before its ACSE thread has checked that
the connection is up: its reactor has already handled the A-ASSOCIATE-RJ and closed the socket, so
the ACSE thread finds no connection and reports the association aborted, not rejected. Against the
node on loopback that happened about once in 60 rejections. The PDU itself is always decoded and
announced (EVT_PDU_RECV) first, so the rejection is read from it.
"""

from __future__ import annotations

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification


def rejection(port: int, calling: str, called: str) -> tuple[int, int, int] | None:
    """The (result, source, reason) of the A-ASSOCIATE-RJ answering a Verification association
    from calling to called; None when it was not rejected (an association let in is released)."""
    rejections: list[A_ASSOCIATE_RJ] = []

    def received(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_PDU_RECV, received)])
    if assoc.is_established:
        assoc.release()
    if not rejections:
        return None
    (pdu,) = rejections
    return pdu.result, pdu.source, pdu.reason_diagnostic
