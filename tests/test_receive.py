"""The C-STORE SCP: what it stores, the status it answers for each kind of input, and who may call."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status
from structlog.testing import capture_logs

from ldct_node.config import AllowedPeer
from ldct_node.dicom.derive import MANUFACTURER
from ldct_node.dicom.series import classify
from ldct_node.node.receive import (
    PROCESSING_FAILURE,
    TRANSFER_SYNTAXES,
    Receiver,
    Refused,
    StoreFailure,
    check_codestream,
    check_pixels,
    inspect,
    is_allowed,
    part10_header,
)
from tests.requestor import rejection
from tests.synthetic import (
    broken_jpeg_ls,
    compress_jpeg_ls_lossless,
    ct_dataset,
    localizer_dataset,
    save,
    without_pixels,
)


@pytest.fixture
def node(receivers):
    """A receiver on a free loopback port over a spool and queue in tmp_path; settings changeable per test."""
    return receivers


def associate(receiver: Receiver, calling: str = "SCANNER", syntaxes=(ExplicitVRLittleEndian,)):
    """One presentation context per transfer syntax, so each is accepted or rejected on its own."""
    ae = AE(ae_title=calling)
    for syntax in syntaxes:
        ae.add_requested_context(CTImageStorage, [syntax])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", receiver.port, ae_title=receiver.settings.ae_title)


def store(receiver: Receiver, ds, calling: str = "SCANNER") -> int:
    assoc = associate(receiver, calling, (ds.file_meta.TransferSyntaxUID,))
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def store_file(receiver: Receiver, path: Path, monkeypatch, syntax: str = ExplicitVRLittleEndian) -> int:
    """Send a file's bytes as they are (no re-encoding), so broken files reach the receiver broken."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(receiver, syntaxes=(syntax,))
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def spooled_files(receiver: Receiver) -> list[Path]:
    return sorted(receiver.spool.root.rglob("*.dcm"))


def every_file(receiver: Receiver) -> list[Path]:
    """Spooled instances and anything else, e.g. a staged temporary file left behind."""
    return sorted(p for p in receiver.spool.root.rglob("*") if p.is_file())


def test_stored_instance_is_spooled_as_sent_and_queued(node):
    receiver = node()
    ds = ct_dataset(rows=16, columns=16)
    assert store(receiver, ds) == Status.SUCCESS
    (path,) = spooled_files(receiver)
    assert path == receiver.spool.path_for(ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert stored.PixelData == ds.PixelData and stored.PatientName == ds.PatientName
    assert receiver.queue.series(ds.SeriesInstanceUID).instances == 1


@pytest.mark.parametrize("sop_uid, syntax", [
    ("1.2.3.4", ExplicitVRLittleEndian),  # even-length UIDs
    ("1.2.3.45", ImplicitVRLittleEndian),  # odd: padded with NUL
    ("1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678", JPEGLosslessSV1),  # 64 characters, the longest
])
def test_part10_header_is_byte_for_byte_what_pynetdicom_writes(sop_uid, syntax):
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=CTImageStorage, sop_instance_uid=sop_uid, transfer_syntax=syntax))
    assert part10_header(CTImageStorage, sop_uid, syntax) == expected


def test_every_common_transfer_syntax_of_ct_is_accepted(node):
    receiver = node()
    assoc = associate(receiver, syntaxes=TRANSFER_SYNTAXES)
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage}
    assoc.release()
    assert accepted == set(TRANSFER_SYNTAXES)


def test_other_sop_classes_and_syntaxes_are_not_negotiated(node):
    receiver = node()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=receiver.settings.ae_title)
    assert not assoc.is_established  # pynetdicom aborts when no context is left
    # PS3.8 presentation context results: 3 abstract syntax not supported, 4 transfer syntaxes not supported
    assert {(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts} == {
        (MRImageStorage, 3), (CTImageStorage, 4)}


def test_c_echo_answers_success(node):
    assoc = associate(node())
    assert int(assoc.send_c_echo().Status) == Status.SUCCESS
    assoc.release()


def test_caller_off_the_allow_list_is_rejected_as_calling_ae_not_recognised(node):
    receiver = node(allowed=(AllowedPeer("SCANNER"),))
    assert rejection(receiver.port, "INTRUDER", receiver.settings.ae_title) == (0x01, 0x01, 0x03)
    allowed = associate(receiver, calling="SCANNER")
    assert allowed.is_established
    allowed.release()


@pytest.mark.parametrize(("allowed", "ae", "host", "ok"), [
    ((), "ANY", "10.0.0.1", True),
    ((AllowedPeer("CT1"),), "CT1", "10.0.0.1", True),
    ((AllowedPeer("CT1"),), "CT2", "10.0.0.1", False),
    ((AllowedPeer("CT1", "10.0.0.1"),), "CT1 ", "10.0.0.1", True),
    ((AllowedPeer("CT1", "10.0.0.1"),), "CT1", "10.0.0.2", False),
])
def test_allow_list_matches_ae_title_and_host_when_given(allowed, ae, host, ok):
    assert is_allowed(allowed, ae, host) is ok


def test_full_spool_answers_out_of_resources_and_stores_nothing(node):
    receiver = node(min_free_bytes=1 << 60)
    assert store(receiver, ct_dataset(rows=16, columns=16)) == StoreFailure.OUT_OF_RESOURCES
    assert spooled_files(receiver) == []
    assert receiver.queue.depth()["received"] == 0


def test_ct_without_pixel_data_does_not_match_its_sop_class(node):
    receiver = node()
    assert store(receiver, without_pixels(rows=16, columns=16)) == StoreFailure.DATASET_MISMATCH
    assert spooled_files(receiver) == []


def test_missing_series_uid_cannot_be_understood(node):
    receiver = node()
    ds = ct_dataset(rows=16, columns=16)
    del ds.SeriesInstanceUID
    assert store(receiver, ds) == StoreFailure.BAD_UIDS


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom on the broken values
def test_corrupt_dataset_cannot_be_understood_and_the_node_keeps_serving(node, tmp_path, monkeypatch):
    receiver = node()
    path = save(ct_dataset(rows=16, columns=16), tmp_path / "bad.dcm")
    data = bytearray(path.read_bytes())
    at = data.index(b"\x08\x00\x16\x00", 200)  # SOPClassUID element of the data set: break its length
    data[at + 6:at + 8] = (0xFFF0).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    assert store_file(receiver, path, monkeypatch) in (StoreFailure.CANNOT_UNDERSTAND, StoreFailure.BAD_UIDS)
    assert store(receiver, ct_dataset(rows=16, columns=16)) == Status.SUCCESS


def test_a_fault_of_the_node_is_a_processing_failure_for_that_instance_and_the_association_goes_on(node, monkeypatch):
    receiver = node()
    assoc = associate(receiver)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(receiver.queue, "add_instance", lambda *a, **k: 1 / 0)
            with capture_logs() as logs:
                assert int(assoc.send_c_store(ct_dataset(rows=16, columns=16)).Status) == PROCESSING_FAILURE
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["instance not stored"]
        assert int(assoc.send_c_store(ct_dataset(rows=16, columns=16)).Status) == Status.SUCCESS
    finally:
        assoc.release()


def test_a_fault_of_the_node_in_one_connection_is_one_error_line_and_the_port_keeps_serving(node, monkeypatch):
    receiver = node()
    with monkeypatch.context() as patch, capture_logs() as logs:
        patch.setattr("ldct_node.node.receive.Acceptor.serve", lambda self: 1 / 0)
        assert not associate(receiver).is_established
        deadline = time.monotonic() + 5
        while not any(e["event"] == "connection failed" for e in logs) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [e["reason"] for e in logs if e["event"] == "connection failed"] == ["ZeroDivisionError: division by zero"]
    assert receiver.admission.pending == 0, "the connection's place is given back"
    assert store(receiver, ct_dataset(rows=16, columns=16)) == Status.SUCCESS


def test_localizer_is_answered_success_but_not_spooled(node):
    receiver = node()
    assert store(receiver, localizer_dataset(rows=16, columns=16)) == Status.SUCCESS
    assert every_file(receiver) == []


def test_own_derived_output_routed_back_is_answered_success_and_not_spooled(node):
    receiver = node()
    ds = ct_dataset(rows=16, columns=16)
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    ds.ContributingEquipmentSequence = [item]
    assert store(receiver, ds) == Status.SUCCESS
    assert spooled_files(receiver) == []
    assert receiver.queue.depth()["received"] == 0


def test_every_outcome_is_counted_with_its_reason_or_status(node):
    receiver = node()
    store(receiver, ct_dataset(rows=16, columns=16))
    store(receiver, localizer_dataset(rows=16, columns=16))
    store(receiver, without_pixels(rows=16, columns=16))
    registry = receiver.metrics.registry
    assert registry.get_sample_value("ldct_instances_received_total") == 1
    assert registry.get_sample_value("ldct_instances_ignored_total", {"reason": "localizer"}) == 1
    assert registry.get_sample_value("ldct_instances_refused_total", {"status": "0xA900"}) == 1


def test_compressed_instance_is_spooled_without_reencoding(node, tmp_path, monkeypatch):
    receiver = node()
    ds = ct_dataset(rows=16, columns=16)
    ds.compress(RLELossless)
    sent = save(ds, tmp_path / "rle.dcm")
    assert store_file(receiver, sent, monkeypatch, RLELossless) == Status.SUCCESS
    (path,) = spooled_files(receiver)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert stored.PixelData == ds.PixelData


def test_truncated_native_pixel_data_does_not_match():
    ds = ct_dataset(rows=16, columns=16)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(Refused) as err:
        check_pixels(ds)
    assert err.value.status == StoreFailure.DATASET_MISMATCH


def test_inspect_refuses_a_sop_uid_that_differs_from_the_request():
    ds = ct_dataset(rows=16, columns=16)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)  # as it comes over the network: no preamble, no File Meta
    with pytest.raises(Refused) as err:
        inspect(buf.getvalue(), ExplicitVRLittleEndian, "1.2.3", classify)
    assert err.value.status == StoreFailure.BAD_UIDS
    assert inspect(buf.getvalue(), ExplicitVRLittleEndian, ds.SOPInstanceUID, classify).ignored is None


def test_the_association_offers_the_configured_pdu_limit(node):
    receiver = node(max_pdu=65536)
    assoc = associate(receiver)
    try:
        assert assoc.acceptor.maximum_length == 65536
    finally:
        assoc.release()


def audit_lines(logs: list[dict], count: int = 1) -> list[dict]:
    """The "association ended" lines once `count` are there: each is written when its connection closes,
    in the receiver's threads, a moment after the caller's release or abort returns."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [e for e in logs if e["event"] == "association ended"]
        if len(lines) >= count:
            return lines
        time.sleep(0.01)
    pytest.fail(f"{count} audit lines expected, got {lines}")


def test_each_association_ends_with_one_audit_line_of_who_what_and_how_long(node):
    receiver = node()
    first, second = ct_dataset(rows=16, columns=16), ct_dataset(rows=16, columns=16)
    with capture_logs() as logs:
        assoc = associate(receiver, calling="SCANNER")
        for ds in (first, second, localizer_dataset(rows=16, columns=16), without_pixels(rows=16, columns=16)):
            assoc.send_c_store(ds)
        assoc.release()
        (line,) = audit_lines(logs)
    assert (line["calling_ae"], line["called_ae"], line["address"], line["accepted"], line["reason"]) == (
        "SCANNER", receiver.settings.ae_title, "127.0.0.1", True, None)
    assert (line["instances_stored"], line["instances_ignored"], line["instances_refused"]) == (2, 1, 1)
    assert line["ended"] == "released" and line["port"] > 0 and 0 <= line["seconds"] < 10
    assert line["log_level"] == "info"
    text = str(line)
    assert str(first.PatientName) not in text and first.PatientID not in text


def test_a_caller_off_the_allow_list_gets_a_refused_audit_line_and_no_other(node):
    receiver = node(allowed=(AllowedPeer("SCANNER"),))
    with capture_logs() as logs:
        assert rejection(receiver.port, "INTRUDER", receiver.settings.ae_title) == (0x01, 0x01, 0x03)
        (line,) = audit_lines(logs)
    assert (line["calling_ae"], line["accepted"], line["reason"]) == (
        "INTRUDER", False, "calling AE title not on receive.allowed")
    assert line["log_level"] == "warning" and line["instances_stored"] == 0
    assert [e["event"] for e in logs] == ["association ended"]


def test_an_association_over_the_limit_is_audited_as_refused_with_the_setting_to_raise(node):
    receiver = node(max_associations=1)
    with capture_logs() as logs:
        held = associate(receiver, calling="FIRST")
        assert rejection(receiver.port, "SECOND", receiver.settings.ae_title) == (0x02, 0x03, 0x02)
        (line,) = audit_lines(logs)
        held.release()
        audit_lines(logs, 2)
    assert (line["calling_ae"], line["accepted"], line["reason"]) == (
        "SECOND", False, "association limit reached (receive.max_associations = 1)")


def test_an_association_without_an_acceptable_context_is_audited_as_refused(node):
    receiver = node()
    ae = AE(ae_title="MRI")
    ae.add_requested_context(MRImageStorage)
    with capture_logs() as logs:
        assert not ae.associate("127.0.0.1", receiver.port, ae_title=receiver.settings.ae_title).is_established
        (line,) = audit_lines(logs)
    assert (line["calling_ae"], line["accepted"], line["ended"]) == ("MRI", False, "aborted")
    assert line["reason"].startswith("no presentation context accepted")


def test_an_association_the_caller_aborts_is_audited_as_aborted(node):
    receiver = node()
    with capture_logs() as logs:
        assoc = associate(receiver)
        assert int(assoc.send_c_store(ct_dataset(rows=16, columns=16)).Status) == Status.SUCCESS
        assoc.abort()
        (line,) = audit_lines(logs)
    assert (line["accepted"], line["instances_stored"], line["ended"]) == (True, 1, "aborted")


def test_a_connection_that_never_asks_for_an_association_is_not_audited(node):
    receiver = node()
    with capture_logs() as logs:
        socket.create_connection(("127.0.0.1", receiver.port)).close()
        assoc = associate(receiver)  # audited, and closed after the bare connection
        assoc.release()
        audit_lines(logs)
        time.sleep(0.2)
    assert len([e for e in logs if e["event"] == "association ended"]) == 1


# --- one bad slice is refused at receive, never answered success and lost later --------------------


def broken(change):
    ds = ct_dataset(rows=16, columns=16)
    change(ds)
    return ds


def multi_frame(ds):
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(("change", "status", "comment"), [
    (lambda ds: setattr(ds, "RescaleSlope", "0"), StoreFailure.DATASET_MISMATCH, "RescaleSlope is 0"),
    (lambda ds: setattr(ds, "RescaleSlope", "NaN"), StoreFailure.DATASET_MISMATCH, "RescaleSlope is nan"),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData * 2), StoreFailure.DATASET_MISMATCH, "pixel data has 1024 bytes"),
    (lambda ds: setattr(ds, "SamplesPerPixel", 3), StoreFailure.DATASET_MISMATCH, "SamplesPerPixel is 3"),
    (multi_frame, StoreFailure.DATASET_MISMATCH, "NumberOfFrames is 2"),
    (lambda ds: setattr(ds, "BitsStored", 17), StoreFailure.DATASET_MISMATCH, "BitsStored 17 does not fit"),
    (lambda ds: setattr(ds, "Rows", 0), StoreFailure.DATASET_MISMATCH, "image of 0 x 16 pixels"),
    (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.840.0123.4"), StoreFailure.BAD_UIDS,
     "SeriesInstanceUID has a component"),
])
def test_an_unusable_slice_is_refused_with_its_status_and_nothing_is_spooled(node, change, status, comment):
    receiver = node()
    ds = broken(change)
    assoc = associate(receiver)
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert (int(rsp.Status), str(rsp.ErrorComment)[:len(comment)]) == (status, comment)
    assert every_file(receiver) == [] and receiver.queue.depth()["received"] == 0
    assert store(receiver, ct_dataset(rows=16, columns=16)) == Status.SUCCESS  # the association's next slice is taken


def test_a_corrupt_jpeg_ls_codestream_cannot_be_understood(node, tmp_path, monkeypatch):
    receiver = node()
    good = save(ct_dataset(rows=16, columns=16), tmp_path / "good.dcm")
    sent = broken_jpeg_ls(good, tmp_path / "broken.dcm")
    assert store_file(receiver, sent, monkeypatch, JPEGLSLossless) == StoreFailure.CANNOT_UNDERSTAND
    assert spooled_files(receiver) == []
    assert store_file(receiver, compress_jpeg_ls_lossless(good, tmp_path / "ok.dcm"), monkeypatch,
                      JPEGLSLossless) == Status.SUCCESS


def test_vr_bytes_that_are_no_dicom_vr_cannot_be_understood(node, tmp_path, monkeypatch):
    receiver = node()
    path = save(ct_dataset(rows=16, columns=16), tmp_path / "vr.dcm")
    data = bytearray(path.read_bytes())
    at = data.index(b"\x08\x00\x60\x00CS", 132)  # Modality: a value the receiver itself never reads
    data[at + 4:at + 6] = b"ZZ"
    path.write_bytes(bytes(data))
    assert store_file(receiver, path, monkeypatch) == StoreFailure.CANNOT_UNDERSTAND
    assert spooled_files(receiver) == []


def test_uncompressed_pixel_data_is_not_decoded_at_receive(node, monkeypatch):
    receiver = node()
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda ds: pytest.fail("native pixels decoded")))
    assert store(receiver, ct_dataset(rows=16, columns=16)) == Status.SUCCESS


def test_a_scout_left_alone_is_not_decoded(node, tmp_path, monkeypatch):
    receiver = node()
    scout = localizer_dataset(rows=16, columns=16)
    sent = broken_jpeg_ls(save(scout, tmp_path / "scout.dcm"), tmp_path / "scout-jls.dcm")
    assert store_file(receiver, sent, monkeypatch, JPEGLSLossless) == Status.SUCCESS
    assert spooled_files(receiver) == []


def test_check_codestream_leaves_native_pixel_data_alone_and_decodes_compressed(tmp_path):
    good = save(ct_dataset(rows=16, columns=16), tmp_path / "good.dcm")
    check_codestream(pydicom.dcmread(good))
    check_codestream(pydicom.dcmread(compress_jpeg_ls_lossless(good, tmp_path / "ok.dcm")))
    with pytest.raises(Refused) as err:
        check_codestream(pydicom.dcmread(broken_jpeg_ls(good, tmp_path / "bad.dcm")))
    assert err.value.status == StoreFailure.CANNOT_UNDERSTAND
