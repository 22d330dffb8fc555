from ldct_node.config import ReceiveSettings, SendSettings
from ldct_node.node.association import configure_ae


def test_receive_and_send_settings_give_the_same_association_type_with_their_own_values():
    receive = ReceiveSettings(ae_title="RX", max_pdu=65536, acse_timeout_s=3, dimse_timeout_s=4, network_timeout_s=5)
    send = SendSettings(ae_title="TX", max_pdu=0, acse_timeout_s=6, dimse_timeout_s=7, network_timeout_s=8)
    assert type(receive.association) is type(send.association)
    assert (receive.association.ae_title, receive.association.max_pdu, receive.association.network_timeout_s) == ("RX", 65536, 5)
    assert (send.association.ae_title, send.association.max_pdu, send.association.acse_timeout_s) == ("TX", 0, 6)


def test_configure_ae_applies_pdu_size_and_every_timeout():
    ae = configure_ae(SendSettings(ae_title="TX", max_pdu=262144, acse_timeout_s=6, dimse_timeout_s=7,
                                   network_timeout_s=8).association)
    assert ae.ae_title == "TX"
    assert ae.maximum_pdu_size == 262144
    # A requestor waits no longer for TCP and TLS than for the A-ASSOCIATE answer.
    assert (ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (6, 6, 7, 8)
