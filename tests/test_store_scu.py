"""The sender's own C-STORE requestor: its encodings agree with pydicom's and pynetdicom's, and it
behaves towards real acceptors (pynetdicom SCPs here; DCMTK and Orthanc in test_node_peers) as
PS3.7 and PS3.8 require."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage

from ldct_node.config import Destination, SendSettings
from ldct_node.node.send import SendError, send_series
from ldct_node.node.store_scu import c_store_rq, read_part_ten
from ldct_node.node.upper_layer import COMMAND, LAST, command_elements, p_data_tf, pdv_items
from tests.synthetic import ct_series, save

SETTINGS = SendSettings(acse_timeout_s=5, dimse_timeout_s=5, network_timeout_s=5)


def test_the_c_store_command_reads_back_as_pydicom_decodes_it():
    command = c_store_rq(7, CTImageStorage, "1.2.3.4")
    ds = pydicom.filereader.read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(command) - 12
    assert (ds.AffectedSOPClassUID, ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType,
            ds.AffectedSOPInstanceUID) == (CTImageStorage, 0x0001, 7, 0, 0x0000, "1.2.3.4")
    assert command_elements(command)[0x1000] == b"1.2.3.4\0", "odd-length UIDs are padded with NUL"


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_the_file_meta_and_data_set_offset_agree_with_pydicom_and_pynetdicom(tmp_path, syntax):
    ds = ct_series(1, rows=16, columns=16)[0]
    ds.file_meta.TransferSyntaxUID = syntax
    path = save(ds, tmp_path / "a.dcm")
    found = read_part_ten(path.read_bytes())
    meta, offset = split_dataset(path)
    assert (found.sop_class_uid, found.sop_instance_uid, found.transfer_syntax, found.data_set_offset) == (
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, syntax, offset)


def test_a_file_that_is_not_part_ten_is_refused():
    with pytest.raises(ValueError, match="DICM"):
        read_part_ten(b"\0" * 200)


def test_a_p_data_pdu_decodes_in_pynetdicom_as_written():
    pdu = p_data_tf(3, COMMAND | LAST, b"\x01\x02\x03\x04")
    decoded = P_DATA_TF()
    decoded.decode(pdu)
    assert decoded.presentation_data_value_items[0].presentation_context_id == 3
    assert decoded.presentation_data_value_items[0].presentation_data_value == bytes([COMMAND | LAST]) + b"\x01\x02\x03\x04"
    assert pdv_items(pdu[6:]) == [(3, COMMAND | LAST, b"\x01\x02\x03\x04")]


class Acceptor:
    """A pynetdicom SCP that keeps every data set it is sent, with a chosen PDU limit and syntaxes."""

    def __init__(self, max_pdu: int = 16382, syntaxes=(ImplicitVRLittleEndian, ExplicitVRLittleEndian),
                 on_store=None, called_ae: str | None = None):
        self.datasets: list[pydicom.Dataset] = []
        ae = AE(ae_title="SCP")
        ae.maximum_pdu_size = max_pdu
        ae.require_called_aet = called_ae is not None
        ae.add_supported_context(CTImageStorage, list(syntaxes))
        self.on_store = on_store or (lambda event: 0x0000)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.destination = Destination("scp", called_ae or "SCP", "127.0.0.1", self.server.server_address[1])

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.datasets.append(ds)
        return self.on_store(event)

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def acceptors():
    made: list[Acceptor] = []

    def make(**kwargs) -> Acceptor:
        made.append(Acceptor(**kwargs))
        return made[-1]

    yield make
    for acceptor in made:
        acceptor.stop()


def series_files(tmp_path: Path, count: int = 3, size: int = 64, syntax=ExplicitVRLittleEndian) -> list[Path]:
    paths = []
    for i, ds in enumerate(ct_series(count, rows=size, columns=size)):
        ds.file_meta.TransferSyntaxUID = syntax
        paths.append(save(ds, tmp_path / f"{i}.dcm"))
    return paths


def test_a_data_set_split_over_many_small_pdus_arrives_whole(acceptors, tmp_path):
    scp = acceptors(max_pdu=4096)  # a 64 x 64 slice of 8 kB and its header take four PDUs or more
    files = series_files(tmp_path)
    assert send_series(files, scp.destination, SETTINGS).sent == 3
    for path, got in zip(files, scp.datasets):
        sent = pydicom.dcmread(path)
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        assert np.array_equal(got.pixel_array, sent.pixel_array)


def test_each_file_goes_in_its_own_transfer_syntax(acceptors, tmp_path):
    scp = acceptors()
    files = series_files(tmp_path / "a", 1, syntax=ImplicitVRLittleEndian)
    files += series_files(tmp_path / "b", 1, syntax=ExplicitVRLittleEndian)
    assert send_series(files, scp.destination, SETTINGS).sent == 2
    assert [ds.SOPInstanceUID for ds in scp.datasets] == [pydicom.dcmread(p).SOPInstanceUID for p in files]


def test_a_transfer_syntax_the_destination_refuses_fails_the_attempt_and_names_it(acceptors, tmp_path):
    scp = acceptors(syntaxes=(ExplicitVRLittleEndian,))
    with pytest.raises(SendError, match=f"accepted no presentation context for {ImplicitVRLittleEndian}"):
        send_series(series_files(tmp_path, syntax=ImplicitVRLittleEndian), scp.destination, SETTINGS)


def test_a_rejected_association_says_so_with_the_destinations_reason(acceptors, tmp_path):
    scp = acceptors(called_ae="RIGHT")
    wrong = dataclasses.replace(scp.destination, ae_title="WRONG")
    with pytest.raises(SendError, match=r"rejected the association: rejected \(permanent\): called ae title not recognised"):
        send_series(series_files(tmp_path), wrong, SETTINGS)


def test_warning_statuses_count_as_stored_and_are_counted(acceptors, tmp_path):
    scp = acceptors(on_store=lambda event: 0xB000)
    result = send_series(series_files(tmp_path), scp.destination, SETTINGS)
    assert (result.sent, result.warnings) == (3, 3)


def test_a_destination_that_aborts_mid_series_fails_the_attempt_with_what_was_stored_so_far(acceptors, tmp_path):
    def abort_second(event):
        if len(scp.datasets) == 2:
            event.assoc.abort()
        return 0x0000

    scp = acceptors(on_store=abort_second)
    stored: list[Path] = []
    files = series_files(tmp_path)
    with pytest.raises(SendError, match=f"no C-STORE response for {files[1].stem}"):
        send_series(files, scp.destination, SETTINGS, stored=stored)
    assert stored == files[:1]
