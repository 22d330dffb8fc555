"""`ldct-node serve` against real DICOM peers on loopback (issue 3).

DCMTK's storescu plays the scanner, DCMTK's storescp and Orthanc play PACS, the node runs as a
subprocess on a tiny random TSC-Net with a 1 s quiet period. What arrives at a destination is
checked against the UIDs the node must produce (deterministic: source UID + model + settings),
so "delivered once, under the same UIDs, after any crash" is an exact set comparison.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGExtended12Bit
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from ldct_node.config import load_config
from ldct_node.dicom.derive import derived_sop_uid
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.denoise_series import derivation_for, output_series_uid
from ldct_node.node.jobs import JobStore, SeriesState
from tests import peers, synthetic

pytestmark = pytest.mark.timeout(300)

NODE_AE = "LDCT_NODE"
SCANNER_AE = "STORESCU"  # DCMTK storescu's calling AE in these tests
DELIVERY_TIMEOUT_S = 120.0
# A-ASSOCIATE-RJ reason DCMTK prints for "calling AE title not recognised".
REJECTED_CALLING_AE = "Calling AE Title Not Recognized"


# --- fixtures ------------------------------------------------------------------------------------


def need(*binaries: Path) -> None:
    """Skip when a peer program is not installed."""
    for binary in binaries:
        try:
            peers.require(binary)
        except peers.PeerUnavailable as exc:
            pytest.skip(str(exc))


@pytest.fixture
def storescp(tmp_path):
    need(peers.STORESCP)
    with peers.running_storescp(tmp_path / "storescp", aet="PACS_SCP") as peer:
        yield peer


@pytest.fixture
def orthanc(tmp_path):
    need(peers.ORTHANC)
    with peers.running_orthanc(tmp_path / "orthanc", aet="ORTHANC") as peer:
        yield peer


@pytest.fixture
def make_node(tmp_path, tiny_weights):
    """make_node(destinations=[...], **table overrides) -> a Node (not started); all stopped at teardown."""
    need(peers.STORESCU, peers.ECHOSCU)
    nodes: list[peers.Node] = []

    def make(destinations=(), quiet_period_s: float = 1.0, **overrides: dict) -> peers.Node:
        tables = peers.node_tables(tmp_path / f"node{len(nodes)}" / "data", peers.free_port(), peers.free_port(),
                                   tiny_weights, NODE_AE, destinations, quiet_period_s)
        for section, values in overrides.items():
            tables[section].update(values)
        node = peers.make_node(tmp_path / f"node{len(nodes)}", tables)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


# --- helpers -------------------------------------------------------------------------------------


def write_series(folder: Path, count: int, size: int = 64, **kwargs) -> list[Path]:
    return synthetic.write_series(folder, synthetic.ct_series(count, rows=size, columns=size, **kwargs))


def expected_uids(node: peers.Node, sources: list[Path]) -> tuple[str, set[str]]:
    """The derived series UID and SOP instance UIDs the node must deliver for these axial sources."""
    cfg = load_config(node.config_path)
    engine = DenoiseEngine.from_path(cfg.model.weights, cfg.inference)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    derivation = derivation_for(engine, cfg.derive)
    series_uid = output_series_uid(headers[0].SeriesInstanceUID, engine, cfg.derive)
    return series_uid, {derived_sop_uid(h.SeriesInstanceUID, h.SOPInstanceUID, derivation, cfg.derive.uid_root) for h in headers}


def received_uids(files: list[Path]) -> list[tuple[str, str]]:
    """(SeriesInstanceUID, SOPInstanceUID) of every file a destination stored, duplicates kept."""
    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    return out


def jobs(node: peers.Node) -> dict:
    queue = JobStore(load_config(node.config_path).storage.database)
    try:
        return {row.series_uid: row for row in queue.jobs()}
    finally:
        queue.close()


def job_state(node: peers.Node, series_uid: str) -> str | None:
    row = jobs(node).get(series_uid)
    return row.state if row else None


def wait_for(ready, what: str, node: peers.Node, timeout_s: float = DELIVERY_TIMEOUT_S, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}; node log tail:\n{node.log_text()[-3000:]}")


def wait_done(node: peers.Node, source_uid: str, slices: int) -> None:
    """Until the node reports all `slices` of the series delivered: every destination answered
    every C-STORE, so storescp has finished writing each file (it answers only after the write)."""
    def done() -> bool:
        row = jobs(node).get(source_uid)
        return bool(row and row.state == SeriesState.DONE and row.slices == slices)

    wait_for(done, f"{slices} slices of the series to be delivered", node)


def assert_delivered_once(files: list[Path], series_uid: str, sop_uids: set[str]) -> None:
    got = received_uids(files)
    assert {s for s, _ in got} == {series_uid}, "the derived series arrived under more than one series UID"
    assert {u for _, u in got} == sop_uids, "derived instances arrived under UIDs other than the deterministic ones"
    assert len(got) == len(sop_uids), "an instance arrived twice"


def source_series_uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def send_ok(files: list[Path], node: peers.Node, calling_ae: str = SCANNER_AE) -> None:
    result = peers.storescu(files, node.port, node.ae_title, calling_ae)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the whole path, with both PACS --------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.slow
def test_shared_series_from_storescu_arrives_derived_at_orthanc_and_storescp(
        shared_series, make_node, orthanc, storescp):
    need(peers.DCIODVFY)
    sources = sorted(shared_series.glob("*.dcm"))
    assert len(sources) == 134
    node = make_node([orthanc.destination("orthanc"), storescp.destination("storescp")]).start()
    series_uid, sop_uids = expected_uids(node, sources)

    send_ok(sources, node)

    wait_done(node, source_series_uid(sources), 134)
    delivered = storescp.received()
    assert_delivered_once(delivered, series_uid, sop_uids)
    for path in delivered:
        errors, _ = peers.dciodvfy(path)
        assert not errors, f"{path.name}: {errors}"
    source = pydicom.dcmread(sources[0], stop_before_pixels=True)
    derive = load_config(node.config_path).derive
    source_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    assert series_uid != source.SeriesInstanceUID
    series = orthanc.series_by_uid()[series_uid]
    assert len(series["Instances"]) == 134
    referenced = set()
    for orthanc_id in series["Instances"]:
        tags = orthanc.instance_tags(orthanc_id)
        assert tags["SOPClassUID"] == CTImageStorage
        assert tags["SOPInstanceUID"] in sop_uids
        assert tags["ImageType"] == "DERIVED\\SECONDARY\\AXIAL"
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags["FrameOfReferenceUID"] == source.FrameOfReferenceUID
        assert int(tags["SeriesNumber"]) == int(source.SeriesNumber) + derive.series_number_offset
        assert tags["SeriesDescription"].endswith(derive.series_description_suffix.strip())
        assert tags["DerivationCodeSequence"][0]["CodeValue"] == "113087"
        assert tags["BurnedInAnnotation"] == "NO"
        (item,) = tags["SourceImageSequence"]
        referenced.add(item["ReferencedSOPInstanceUID"])
        assert item["PurposeOfReferenceCodeSequence"][0]["CodeValue"] == "121322"
        assert tags["ContributingEquipmentSequence"][0]["PurposeOfReferenceCodeSequence"][0]["CodeValue"] == "109103"
    assert referenced == source_sops, "every derived slice must point at its own source slice"


# --- association level ---------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.slow
def test_echoscu_is_answered_and_callers_off_the_allow_list_are_rejected(make_node, storescp):
    allowed = [{"ae_title": "ECHOSCU"}, {"ae_title": "ELSEWHERE", "host": "192.0.2.1"}]
    node = make_node([storescp.destination("pacs")], receive={"allowed": allowed}).start()

    answered = peers.echoscu(node.port, NODE_AE, "ECHOSCU")
    assert answered.returncode == 0, answered.stdout + answered.stderr

    for caller in ("INTRUDER", "ELSEWHERE"):  # unknown AE title; known AE title from the wrong address
        refused = peers.echoscu(node.port, NODE_AE, caller)
        assert refused.returncode != 0
        assert REJECTED_CALLING_AE in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    echo = node.admin("echo")
    assert echo.returncode == 0, echo.stdout + echo.stderr


# --- kill -9 at every stage ----------------------------------------------------------------------


def spooled(node: peers.Node, series_uid: str) -> int:
    folder = load_config(node.config_path).storage.spool_dir / series_uid
    return len(list(folder.glob("*.dcm"))) if folder.is_dir() else 0


@pytest.mark.peers
@pytest.mark.slow
def test_kill_during_receive_then_resend_delivers_every_instance_once(make_node, storescp, tmp_path):
    sources = write_series(tmp_path / "in", 40, size=256)
    src_uid = source_series_uid(sources)
    node = make_node([storescp.destination("pacs")]).start()
    series_uid, sop_uids = expected_uids(node, sources)

    scanner = peers.start_storescu(sources, node.port, NODE_AE, SCANNER_AE)
    wait_for(lambda: spooled(node, src_uid) >= 3, "the first instances in the spool", node, poll_s=0.005)
    node.kill()
    at_kill = spooled(node, src_uid)
    assert scanner.wait(60) != 0, "storescu must see the association die"
    assert 0 < at_kill < len(sources), "the kill must land mid-series"

    node.start()
    send_ok(sources, node)  # the scanner re-sends what was not acknowledged; here: all of it
    wait_done(node, src_uid, len(sources))
    assert_delivered_once(storescp.received(), series_uid, sop_uids)


@pytest.mark.peers
@pytest.mark.slow
def test_kill_during_denoise_then_restart_delivers_the_same_uids(make_node, storescp, tmp_path):
    sources = write_series(tmp_path / "in", 40, size=256)
    src_uid = source_series_uid(sources)
    node = make_node([storescp.destination("pacs")]).start()
    series_uid, sop_uids = expected_uids(node, sources)

    send_ok(sources, node)
    wait_for(lambda: job_state(node, src_uid) == SeriesState.DENOISING, "the worker to start denoising", node,
             poll_s=0.02)
    node.kill()
    assert not storescp.received()

    node.start()
    wait_done(node, src_uid, len(sources))
    assert_delivered_once(storescp.received(), series_uid, sop_uids)


@pytest.mark.peers
@pytest.mark.slow
def test_kill_during_send_then_restart_delivers_the_same_uids(make_node, tmp_path):
    need(peers.STORESCP)
    sources = write_series(tmp_path / "in", 4)
    # storescp sleeping 1 s after every C-STORE is a slow PACS: the kill lands with part of the series sent.
    with peers.running_storescp(tmp_path / "slow", aet="SLOW_PACS", extra_args=("--sleep-after", "1")) as peer:
        node = make_node([peer.destination("pacs")]).start()
        series_uid, sop_uids = expected_uids(node, sources)
        send_ok(sources, node)
        wait_for(lambda: len(peer.received()) >= 1, "the first derived instance at the slow PACS", node)
        assert job_state(node, source_series_uid(sources)) == SeriesState.SENDING
        node.kill()
        assert len(peer.received()) < len(sources)

        node.start()
        wait_done(node, source_series_uid(sources), len(sources))
        assert_delivered_once(peer.received(), series_uid, sop_uids)


@pytest.mark.peers
@pytest.mark.slow
def test_kill_while_streaming_then_restart_keeps_the_streamed_chunks_and_delivers_the_same_uids(
        make_node, storescp, tmp_path):
    sources = write_series(tmp_path / "in", 40, size=256)
    src_uid = source_series_uid(sources)
    node = make_node([storescp.destination("pacs")], quiet_period_s=4.0, queue={"stream": True},
                     inference={"chunk_slices": 4}).start()
    series_uid, sop_uids = expected_uids(node, sources)

    send_ok(sources, node)
    wait_for(lambda: len(storescp.received()) >= 8, "streamed chunks at PACS", node, poll_s=0.02)
    node.kill()
    assert job_state(node, src_uid) == SeriesState.RECEIVED, "the kill must land before the series closed"

    node.start()
    wait_done(node, src_uid, len(sources))
    assert_delivered_once(storescp.received(), series_uid, sop_uids)
    finished = [json.loads(line) for line in node.log_text().splitlines() if '"finishing streamed series"' in line]
    assert finished and finished[-1]["streamed"] >= 8, "the chunks recorded before the kill must be kept"


# --- destination down ----------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.slow
def test_destination_down_then_up_is_delivered_by_retries_and_down_for_good_by_queue_retry(make_node, tmp_path):
    port = peers.free_port()  # nothing listens here until storescp is started on it
    pacs = {"name": "pacs", "ae_title": "PACS_SCP", "host": peers.LOOPBACK, "port": port}
    node = make_node([pacs], send={"attempts": 3, "backoff_initial_s": 1.0, "backoff_max_s": 1.0}).start()

    lost = write_series(tmp_path / "lost", 3)
    lost_uid = source_series_uid(lost)
    send_ok(lost, node)
    wait_for(lambda: job_state(node, lost_uid) == SeriesState.FAILED, "the job to fail after its last try", node)
    reason = jobs(node)[lost_uid].reason
    assert reason and "PACS_SCP" in reason, reason

    with peers.running_storescp(tmp_path / "pacs", aet="PACS_SCP", port=port) as scp:
        retried = node.admin("queue", "retry", lost_uid)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        wait_done(node, lost_uid, len(lost))
        series_uid, sop_uids = expected_uids(node, lost)
        assert_delivered_once(scp.received(), series_uid, sop_uids)

    late = write_series(tmp_path / "late", 3)
    late_uid = source_series_uid(late)
    send_ok(late, node)

    def tried_once() -> bool:
        row = jobs(node).get(late_uid)
        return bool(row and row.deliveries and row.deliveries[0].attempts >= 1)

    wait_for(tried_once, "a failed first delivery attempt", node)
    with peers.running_storescp(tmp_path / "pacs-again", aet="PACS_SCP", port=port) as scp:
        wait_done(node, late_uid, len(late))
        series_uid, sop_uids = expected_uids(node, late)
        assert_delivered_once(scp.received(), series_uid, sop_uids)


# --- bad input -----------------------------------------------------------------------------------


def store_statuses(node: peers.Node, files: list[Path], monkeypatch) -> dict[str, int]:
    """C-STORE each file as its raw bytes (no re-encoding, so a corrupt file stays corrupt): name -> status."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(peers.LOOPBACK, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return {p.name: int(assoc.send_c_store(p).Status) for p in files}
    finally:
        assoc.release()


def corrupt_copy(source: Path, target: Path) -> Path:
    """source with an element length in its header pointing far past the end of the file."""
    data = bytearray(source.read_bytes())
    tag = b"\x08\x00\x60\x00CS"  # (0008,0060) Modality, explicit VR
    at = data.index(tag)
    data[at + 6:at + 8] = (0xFFF0).to_bytes(2, "little")
    target.write_bytes(bytes(data))
    return target


@pytest.mark.peers
@pytest.mark.slow
def test_bad_input_gets_the_right_status_or_is_skipped_and_the_node_keeps_serving(
        make_node, storescp, tmp_path, monkeypatch):
    node = make_node([storescp.destination("pacs")]).start()
    folder = tmp_path / "bad"

    no_pixels = synthetic.save(synthetic.without_pixels(), folder / "no-pixels.dcm")
    corrupt = corrupt_copy(synthetic.save(synthetic.ct_dataset(), folder / "good.dcm"), folder / "corrupt.dcm")
    statuses = store_statuses(node, [no_pixels, corrupt], monkeypatch)
    assert statuses["no-pixels.dcm"] == 0xA900  # dataset does not match SOP class
    assert 0xA900 <= statuses["corrupt.dcm"] <= 0xCFFF, hex(statuses["corrupt.dcm"])

    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [JPEGExtended12Bit])
    assoc = ae.associate(peers.LOOPBACK, node.port, ae_title=node.ae_title)
    rejected = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
    if assoc.is_established:
        assoc.release()
    assert (MRImageStorage, ExplicitVRLittleEndian) in rejected  # not a CT image
    assert (CTImageStorage, JPEGExtended12Bit) in rejected  # unsupported transfer syntax

    # A series with a scout in it and one slice sent twice: the scout is skipped, the copy replaces.
    study = {"study_uid": pydicom.uid.generate_uid(), "series_uid": pydicom.uid.generate_uid(),
             "frame_of_reference_uid": pydicom.uid.generate_uid()}
    axial = synthetic.write_series(folder / "series", synthetic.ct_series(4, **study))
    scout = synthetic.save(synthetic.localizer_dataset(**study), folder / "series" / "scout.dcm")
    send_ok([scout, *axial, axial[0]], node)

    wait_done(node, study["series_uid"], len(axial))
    series_uid, sop_uids = expected_uids(node, axial)
    assert_delivered_once(storescp.received(), series_uid, sop_uids)
    assert "localizer" in node.log_text()
    assert peers.echoscu(node.port, NODE_AE).returncode == 0
    assert node.process.poll() is None


@pytest.mark.peers
@pytest.mark.slow
def test_full_spool_answers_out_of_resources_and_loses_nothing(make_node, storescp, tmp_path, monkeypatch):
    sources = write_series(tmp_path / "in", 3)
    src_uid = source_series_uid(sources)
    # More free bytes required than any disk has: the supported way to simulate a full spool.
    node = make_node([storescp.destination("pacs")], receive={"min_free_bytes": 1 << 60}).start()

    statuses = store_statuses(node, sources, monkeypatch)
    assert set(statuses.values()) == {0xA700}, statuses
    assert node.health()[0] == 503
    assert spooled(node, src_uid) == 0 and src_uid not in jobs(node)
    node.stop()

    # Space is back: the sender's retry is taken and delivered in full.
    node.config_path.write_text(node.config_path.read_text().replace(f"min_free_bytes = {1 << 60}", "min_free_bytes = 0"))
    node.start()
    send_ok(sources, node)
    wait_done(node, src_uid, len(sources))
    series_uid, sop_uids = expected_uids(node, sources)
    assert_delivered_once(storescp.received(), series_uid, sop_uids)


# --- systemd -------------------------------------------------------------------------------------

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat, which configparser cannot take)."""
    directives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_systemd_unit_runs_serve_as_notify_service_with_watchdog_state_directory_and_hardening():
    unit = unit_directives(SYSTEMD / "ldct-node.service")
    assert unit["Type"] == ["notify"]
    assert float(unit["WatchdogSec"][0]) > 0
    assert unit["ExecStart"][0].split()[1:] == ["serve", "--config", "/etc/ldct-node/ldct-node.toml"]
    assert unit["User"] == unit["Group"] == ["ldct-node"]
    assert unit["StateDirectory"] == ["ldct-node"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["CapabilityBoundingSet"] == [""]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("PrivateDevices", "yes")):
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


@pytest.mark.peers
def test_systemd_unit_passes_systemd_analyze_verify():
    analyze = Path("/usr/bin/systemd-analyze")
    need(analyze)
    result = subprocess.run([str(analyze), "verify", str(SYSTEMD / "ldct-node.service")],
                            capture_output=True, text=True, timeout=60)
    # The ExecStart binary exists only where the package is installed as the README says.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "/opt/ldct-node/bin/ldct-node" not in line]
    assert not complaints, complaints


def test_example_configuration_loads_and_shows_every_setting():
    path = SYSTEMD / "ldct-node.example.toml"
    cfg = load_config(path)
    assert cfg.storage.data_dir == Path("/var/lib/ldct-node")  # the admin commands must find the service's queue
    text = path.read_text()
    sections = dict(re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S))
    for section in dataclasses.fields(cfg):
        assert section.name in sections, f"[{section.name}] missing"
        for setting in dataclasses.fields(getattr(cfg, section.name)):
            shown = re.search(rf"^#? ?{setting.name} =", sections[section.name], flags=re.M)
            assert shown, f"{section.name}.{setting.name} is not in the example"


@pytest.mark.peers
@pytest.mark.slow
def test_serve_tells_systemd_it_is_ready_and_feeds_the_watchdog(make_node, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(peers.START_TIMEOUT_S)
    node = make_node()
    node.extra_env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    try:
        node.start()
        messages = [notify.recv(4096).decode() for _ in range(3)]
    finally:
        notify.close()
    assert "READY=1" in messages[0].splitlines()
    assert all("WATCHDOG=1" in m.splitlines() for m in messages[1:]), messages
