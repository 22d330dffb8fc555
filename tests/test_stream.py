"""Streaming (queue.stream): a series is derived and sent chunk by chunk while it arrives; the run
that closes it keeps what streaming did, derives the rest, and a delivery sends only what is missing."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from structlog.testing import capture_logs

from ldct_node.commands.queue import format_table
from ldct_node.config import DeriveSettings, FidelitySettings, InferenceSettings, SendSettings
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.daemon import Node
from ldct_node.node.denoise_series import denoise_series, output_series_uid
from ldct_node.node.jobs import JobStore, SeriesState
from ldct_node.node.send import Sender
from ldct_node.node.spool import Spool
from ldct_node.node.stream import Streamer, StreamLedger
from ldct_node.node.worker import EngineProcessor, Worker
from tests.synthetic import ct_series
from tests.test_daemon import config as daemon_config
from tests.test_daemon import send, wait_state
from tests.test_send import Pacs

CHUNK = 2


@dataclasses.dataclass
class Setup:
    """A job store, spool and outbox with a streaming worker (tiny model, chunks of CHUNK slices)."""

    queue: JobStore
    spool: Spool
    outbox: Path
    engine: DenoiseEngine
    ledger: StreamLedger
    streamer: Streamer
    worker: Worker
    fidelity: FidelitySettings

    def arrive(self, datasets) -> list[Path]:
        """Spool and record instances as the receiver does."""
        paths = []
        for ds in datasets:
            path = self.spool.path_for(ds.SeriesInstanceUID, ds.SOPInstanceUID)
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            self.queue.add_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, path)
            paths.append(path)
        return paths

    def out_dir(self, series_uid: str) -> Path:
        return self.outbox / output_series_uid(series_uid, self.engine, DeriveSettings())

    def close(self, series_uid: str) -> SeriesState:
        """The quiet period ends and the worker runs the series."""
        assert self.queue.promote_quiet(0.0) == [series_uid]
        assert self.worker.step()
        return self.queue.series(series_uid).state


def make_setup(tmp_path: Path, weights: Path, destinations=(), fidelity=FidelitySettings(), sent=lambda: None) -> Setup:
    queue = JobStore(tmp_path / "queue.sqlite3")
    engine = DenoiseEngine.from_path(weights, InferenceSettings(device="cpu", threads=1, chunk_slices=CHUNK))
    ledger = StreamLedger(queue)
    outbox = tmp_path / "outbox"
    streamer = Streamer(ledger, engine, DeriveSettings(), fidelity, outbox, chunk_written=sent)
    worker = Worker(queue, EngineProcessor(engine, DeriveSettings(), fidelity), outbox, list(destinations), 0.05,
                    ledger=ledger, streamer=streamer)
    return Setup(queue, Spool(tmp_path / "spool"), outbox, engine, ledger, streamer, worker, fidelity)


@pytest.fixture
def setup(tmp_path, tiny_weights):
    made = make_setup(tmp_path, tiny_weights)
    yield made
    made.queue.close()


def files_in(folder: Path) -> dict[str, int]:
    """Derived file name -> inode and modification time, to tell a kept file from a rewritten one."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.dcm")}


def test_arriving_instances_are_derived_a_chunk_at_a_time_before_the_quiet_period(setup):
    series = ct_series(5, rows=32, columns=32)
    uid = series[0].SeriesInstanceUID
    setup.arrive(series)

    derived = []
    while setup.worker.step():
        derived.append(len(files_in(setup.out_dir(uid))))
    assert derived == [2, 4, 5]
    assert setup.queue.series(uid).state == SeriesState.RECEIVED


def test_queue_list_shows_how_many_slices_of_an_arriving_series_are_streamed(setup):
    series = ct_series(3, rows=32, columns=32)
    setup.arrive(series)
    assert setup.worker.step()
    row = setup.queue.series(series[0].SeriesInstanceUID)
    assert row.streamed == CHUNK
    assert f"streamed={CHUNK}" in format_table([row])


def test_the_close_run_keeps_streamed_slices_and_derives_only_the_rest(setup, tmp_path):
    series = ct_series(5, rows=32, columns=32)
    uid = series[0].SeriesInstanceUID
    sources = setup.arrive(series[:3])
    while setup.worker.step():
        pass
    streamed = files_in(setup.out_dir(uid))
    sources += setup.arrive(series[3:])  # late: the quiet period ends before streaming takes them

    assert setup.close(uid) == SeriesState.DONE
    row = setup.queue.series(uid)
    assert row.slices == 5
    after = files_in(setup.out_dir(uid))
    assert {name: after[name] for name in streamed} == streamed, "a streamed slice was derived again"

    # The same derived series, pixel for pixel and date for date, as one run over the whole series.
    whole = denoise_series(sources, tmp_path / "whole", setup.engine, DeriveSettings(), setup.fidelity)
    for path in whole.files:
        ours = pydicom.dcmread(setup.out_dir(uid) / path.name)
        assert np.array_equal(ours.pixel_array, pydicom.dcmread(path).pixel_array)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in setup.out_dir(uid).glob("*.dcm")]
    assert len({(h.SeriesDate, h.SeriesTime) for h in headers}) == 1


def test_the_fidelity_of_a_streamed_series_is_measured_over_every_slice_once(setup, tmp_path):
    series = ct_series(5, rows=64, columns=64)
    uid = series[0].SeriesInstanceUID
    sources = setup.arrive(series[:3])
    while setup.worker.step():
        pass
    sources += setup.arrive(series[3:])
    setup.queue.promote_quiet(0.0)
    job = setup.queue.claim_next()
    prior = setup.ledger.for_close(job, setup.out_dir(uid))

    finished = denoise_series(sources, setup.out_dir(uid), setup.engine, DeriveSettings(), setup.fidelity, prior=prior)
    whole = denoise_series(sources, tmp_path / "whole", setup.engine, DeriveSettings(), setup.fidelity)
    assert finished.fidelity.soft_tissue_pixels == whole.fidelity.soft_tissue_pixels > 0
    assert finished.fidelity.as_fields(6) == whole.fidelity.as_fields(6)


def test_a_restart_keeps_recorded_chunks_and_a_missing_file_makes_the_close_run_start_afresh(setup, tmp_path):
    series = ct_series(4, rows=32, columns=32)
    uid = series[0].SeriesInstanceUID
    sources = setup.arrive(series)
    assert setup.worker.step()  # one chunk, then the process dies
    setup.queue.close()

    queue = JobStore(tmp_path / "queue.sqlite3")
    queue.recover()
    ledger = StreamLedger(queue)
    assert queue.promote_quiet(0.0, now=time.time() + 1) == [uid]
    job = queue.claim_next()
    prior = ledger.for_close(job, setup.out_dir(uid))
    assert prior is not None and len(prior.derived) == CHUNK

    next(iter(prior.derived.values())).unlink()
    assert ledger.for_close(job, setup.out_dir(uid)) is None
    assert ledger.for_close(job, setup.out_dir(uid)) is None, "the records must be gone, not only unused"
    assert sorted(job.sources) == sorted(sources)
    queue.close()


def test_chunks_derived_into_another_folder_are_not_kept(setup):
    setup.arrive(ct_series(2, rows=32, columns=32))
    assert setup.worker.step()
    setup.queue.promote_quiet(0.0)
    job = setup.queue.claim_next()
    # Other weights or settings give the series another derived series UID, hence another folder.
    assert setup.ledger.for_close(job, setup.outbox / "2.25.1") is None


def test_a_new_run_of_the_series_forgets_what_streaming_did_and_starts_a_clean_folder(setup):
    series = ct_series(3, rows=32, columns=32)
    uid = series[0].SeriesInstanceUID
    setup.arrive(series[:2])
    while setup.worker.step():
        pass
    assert setup.close(uid) == SeriesState.DONE
    stale = setup.out_dir(uid) / "stale.dcm"
    stale.write_bytes(b"from the first run")

    setup.arrive(series[2:])  # after the series finished: a new run of the whole series
    assert setup.queue.series(uid).run == 2
    assert setup.worker.step()
    assert not stale.exists()
    while setup.worker.step():
        pass
    assert len(files_in(setup.out_dir(uid))) == 3


def test_streaming_holds_once_the_slices_so_far_exceed_the_fidelity_gate(tmp_path, tiny_weights, monkeypatch):
    made = make_setup(tmp_path, tiny_weights, fidelity=FidelitySettings(max_mean_hu_change=3.0))
    denoise_hu = made.engine.denoise_hu
    monkeypatch.setattr(made.engine, "denoise_hu", lambda hu, *a, **k: denoise_hu(hu, *a, **k) + 20.0)
    series = ct_series(5, rows=64, columns=64)
    uid = series[0].SeriesInstanceUID
    made.arrive(series[:3])

    with capture_logs() as logs:
        assert made.worker.step()
    assert not made.worker.step(), "a held series must not stream further"
    assert made.ledger.unsent("pacs") == {}, "nothing of a held series may be sent while it streams"
    assert "mean soft-tissue change +20.0 HU" in made.queue.series(uid).reason
    assert [e["log_level"] for e in logs if e["event"] == "chunk derived while receiving"] == ["warning"]

    made.arrive(series[3:])
    assert made.close(uid) == SeriesState.FAILED
    assert not made.out_dir(uid).exists(), "a series failing the gate keeps no derived file"
    made.queue.close()


def test_a_slice_that_cannot_be_read_is_set_aside_once(setup):
    series = ct_series(3, rows=32, columns=32)
    uid = series[0].SeriesInstanceUID
    paths = setup.arrive(series)
    paths[1].write_bytes(b"not DICOM at all")
    while setup.worker.step():
        pass
    assert setup.close(uid) == SeriesState.DONE
    row = setup.queue.series(uid)
    assert row.slices == 2
    assert [item["sop_uid"] for item in row.set_aside] == [series[1].SOPInstanceUID]


def test_the_sender_streams_chunks_and_the_delivery_sends_only_the_rest(tmp_path, tiny_weights):
    pacs = Pacs()
    made = make_setup(tmp_path, tiny_weights, destinations=["pacs"])
    sender = Sender(made.queue, SendSettings(destinations=(pacs.destination,)), 0.05, ledger=made.ledger)
    try:
        series = ct_series(5, rows=32, columns=32)
        uid = series[0].SeriesInstanceUID
        made.arrive(series[:3])
        while made.worker.step():
            pass
        assert sender.step()
        assert len(pacs.stored) == 3 and made.queue.series(uid).state == SeriesState.RECEIVED
        assert not sender.step(), "a streamed chunk is sent once"

        made.arrive(series[3:])
        assert made.close(uid) == SeriesState.SENDING
        with capture_logs() as logs:
            assert sender.step()
        assert made.queue.series(uid).state == SeriesState.DONE
        assert sorted(pacs.stored) == sorted(p.stem for p in made.out_dir(uid).glob("*.dcm"))
        delivered = next(e for e in logs if e["event"] == "series delivered")
        assert (delivered["instances"], delivered["streamed_before"]) == (2, 3)
        assert made.queue.series(uid).deliveries[0].sent == 5
    finally:
        pacs.stop()
        made.queue.close()


def test_a_refused_chunk_pauses_streaming_to_that_destination_and_the_delivery_sends_it(tmp_path, tiny_weights):
    pacs = Pacs(status=0xA700)
    made = make_setup(tmp_path, tiny_weights, destinations=["pacs"])
    sender = Sender(made.queue, SendSettings(destinations=(pacs.destination,), backoff_initial_s=60), 0.05,
                    ledger=made.ledger)
    try:
        series = ct_series(4, rows=32, columns=32)
        uid = series[0].SeriesInstanceUID
        made.arrive(series[:2])
        assert made.worker.step()
        with capture_logs() as logs:
            sender.step()
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["streamed chunk not sent"]
        made.arrive(series[2:])
        while made.worker.step():
            pass
        pacs.stored.clear()
        assert sender.step() is False, "streaming to the destination is paused after the refusal"

        pacs.status = 0x0000
        assert made.close(uid) == SeriesState.SENDING
        sender.step()
        assert made.queue.series(uid).state == SeriesState.DONE
        assert len(pacs.stored) == 4
    finally:
        pacs.stop()
        made.queue.close()


def test_a_streaming_node_delivers_the_series_before_its_quiet_period_ends(tmp_path, tiny_weights):
    pacs = Pacs()
    cfg = daemon_config(tmp_path, tiny_weights, [pacs.destination])
    cfg = dataclasses.replace(cfg, queue=dataclasses.replace(cfg.queue, quiet_period_s=5.0, stream=True))
    node = Node(cfg)
    node.start()
    try:
        series = ct_series(6, rows=32, columns=32)
        uid = series[0].SeriesInstanceUID
        sent_at = time.monotonic()
        assert send(node, series) == [0] * 6

        deadline = sent_at + cfg.queue.quiet_period_s
        while len(pacs.stored) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pacs.stored) == 6, "every derived instance must reach PACS within the quiet period"
        assert node.queue.series(uid).state == SeriesState.RECEIVED

        row = wait_state(node.queue, uid, SeriesState.DONE)
        assert row.slices == 6 and len(pacs.stored) == 6, "the delivery after the close must send nothing again"
    finally:
        node.stop()
        pacs.stop()
