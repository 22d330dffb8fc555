"""The one place a pynetdicom AE is set up from the node's settings (for ``echo``), so that PDU size
and timeouts mean what they mean to the node's own acceptor (``ldct_node.node.acceptor``, receive)
and requestor (``ldct_node.node.store_scu``, send), which read the same AssociationSettings."""

from __future__ import annotations

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
