"""The one place a pynetdicom AE is set up from the node's settings, for the receiver (acceptor) and
echo (requestor), so that PDU size and timeouts mean the same on every path; the sender's own
C-STORE requestor (``ldct_node.node.store_scu``) reads the same AssociationSettings."""

from __future__ import annotations

import socket

from pynetdicom import AE

from ldct_node.config import AssociationSettings


def configure_ae(settings: AssociationSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    # pynetdicom's default connection timeout (None) waits for ever on a peer that accepts TCP and stays silent.
    ae.connection_timeout = settings.acse_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    return ae


def disable_nagle(event) -> None:
    """EVT_CONN_OPEN handler. pynetdicom leaves Nagle's algorithm on, which holds each small DIMSE
    command or response back by up to ~40 ms: for a C-STORE per slice that is most of the time."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
