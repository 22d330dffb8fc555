"""The sender: one association per series, every response status checked, back-off and give-up."""

from __future__ import annotations

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from ldct_node.config import Destination, SendSettings
from ldct_node.node.jobs import DeliveryState, JobStore, SeriesState
from ldct_node.node.observe import Metrics
from ldct_node.node.send import Sender, SendError, echo, send_series, status_stored
from tests.peers import free_port
from tests.synthetic import ct_series, write_series

SETTINGS = SendSettings(attempts=2, backoff_initial_s=5.0, backoff_max_s=5.0, acse_timeout_s=5, dimse_timeout_s=5,
                        network_timeout_s=5)


class Pacs:
    """An in-process C-STORE SCP that answers `status` and remembers what it stored, per association."""

    def __init__(self, status: int = 0x0000, port: int = 0):
        self.status = status
        self.stored: list[str] = []
        self.associations = 0
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_ECHO, lambda e: 0)])
        self.destination = Destination("pacs", "PACS", "127.0.0.1", self.server.server_address[1])

    def _accepted(self, event):
        self.associations += 1

    def _store(self, event):
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def pacs():
    peers = []

    def make(status: int = 0x0000) -> Pacs:
        peers.append(Pacs(status))
        return peers[-1]

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture
def outbox(tmp_path):
    folder = tmp_path / "outbox" / "9.9"
    write_series(folder, ct_series(3, rows=16, columns=16), names=[f"{i}.dcm" for i in range(3)])
    return folder


@pytest.mark.parametrize(("status", "stored"), [(0x0000, True), (0xB000, True), (0xB007, True), (0xA700, False),
                                                (0xC000, False), (0x0001, False)])
def test_success_and_warning_statuses_count_as_stored(status, stored):
    assert status_stored(status) is stored


def test_whole_series_goes_over_one_association(pacs, outbox):
    peer = pacs()
    result = send_series(sorted(outbox.glob("*.dcm")), peer.destination, SETTINGS)
    assert (result.sent, result.warnings, len(peer.stored), peer.associations) == (3, 0, 3, 1)


def test_failure_status_stops_the_attempt_with_status_in_the_reason(pacs, outbox):
    peer = pacs(status=0xA700)
    with pytest.raises(SendError, match="0xA700"):
        send_series(sorted(outbox.glob("*.dcm")), peer.destination, SETTINGS)
    assert len(peer.stored) == 1


def test_unreachable_destination_is_a_send_error(outbox):
    down = Destination("down", "DOWN", "127.0.0.1", free_port())
    with pytest.raises(SendError, match="could not be reached"):
        send_series(sorted(outbox.glob("*.dcm")), down, SETTINGS)


def queue_with_sending_series(tmp_path, outbox) -> JobStore:
    queue = JobStore(tmp_path / "q.sqlite3")
    queue.add_instance("1.2.3", "1.2.3.1", tmp_path / "x.dcm")
    queue.promote_quiet(0)
    queue.claim_next()
    queue.denoised("1.2.3", "9.9", outbox, 3, 0, 1.0, ["pacs"])
    return queue


def test_sender_delivers_due_series_and_marks_it_done(pacs, outbox, tmp_path):
    peer = pacs()
    queue = queue_with_sending_series(tmp_path, outbox)
    metrics = Metrics()
    sender = Sender(queue, SendSettings(destinations=(peer.destination,)), 0.1, metrics)
    (due,) = queue.due_deliveries()
    assert sender.deliver(due) == SeriesState.DONE
    assert queue.series("1.2.3").deliveries[0].sent == 3
    assert metrics.registry.get_sample_value("ldct_series_done_total") == 1
    queue.close()


def test_sender_backs_off_then_fails_the_series_with_the_reason(pacs, outbox, tmp_path):
    peer = pacs(status=0xC000)
    queue = queue_with_sending_series(tmp_path, outbox)
    settings = SendSettings(destinations=(peer.destination,), attempts=2, backoff_initial_s=60.0, backoff_max_s=60.0)
    sender = Sender(queue, settings, 0.1)
    (due,) = queue.due_deliveries()
    assert sender.deliver(due) == SeriesState.SENDING
    assert queue.series("1.2.3").deliveries[0].state == DeliveryState.PENDING
    assert queue.due_deliveries() == []  # backing off
    (due,) = queue.due_deliveries(now=due.attempts + 1e12)
    assert sender.deliver(due) == SeriesState.FAILED
    assert "0xC000" in queue.series("1.2.3").reason
    queue.close()


def test_a_series_missing_outputs_is_not_delivered_in_part(pacs, outbox, tmp_path):
    peer = pacs()
    queue = queue_with_sending_series(tmp_path, outbox)
    next(outbox.glob("*.dcm")).unlink()
    sender = Sender(queue, SendSettings(destinations=(peer.destination,), attempts=1), 0.1)
    (due,) = queue.due_deliveries()
    assert sender.deliver(due) == SeriesState.FAILED
    assert "holds 2 of 3 derived instances" in queue.series("1.2.3").reason
    assert peer.stored == []
    queue.close()


def test_destination_removed_from_config_fails_the_attempt_with_a_clear_reason(outbox, tmp_path):
    queue = queue_with_sending_series(tmp_path, outbox)
    sender = Sender(queue, SendSettings(attempts=1), 0.1)
    (due,) = queue.due_deliveries()
    assert sender.deliver(due) == SeriesState.FAILED
    assert "no longer in send.destinations" in queue.series("1.2.3").reason
    queue.close()


def test_echo_reports_success_or_no_association(pacs):
    assert echo(pacs().destination, SETTINGS) == 0x0000
    assert echo(Destination("down", "DOWN", "127.0.0.1", free_port()), SETTINGS) is None
