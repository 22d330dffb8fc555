"""Progress of the series being denoised: (done, total) per chunk from the processor, in /metrics at
every chunk and in the log every few seconds."""

from __future__ import annotations

from structlog.testing import capture_logs

from ldct_node.config import DeriveSettings, FidelitySettings, InferenceSettings
from ldct_node.logs import get_logger
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.denoise_series import slice_counter
from ldct_node.node.jobs import JobStore, SeriesState
from ldct_node.node.observe import Metrics
from ldct_node.node.worker import EngineProcessor, SeriesProgress, Worker
from tests import synthetic
from tests.test_daemon import FakeProcessor


def gauges(metrics: Metrics) -> tuple[float, float]:
    registry = metrics.registry
    return (registry.get_sample_value("ldct_denoising_series_slices_done"),
            registry.get_sample_value("ldct_denoising_series_slices"))


def test_slice_counter_reports_the_total_at_once_then_the_running_sum():
    reports = []
    add = slice_counter(5, lambda done, total: reports.append((done, total)))
    add(2)
    add(3)
    assert reports == [(0, 5), (2, 5), (5, 5)]


def test_the_engine_processor_reports_progress_chunk_by_chunk(tmp_path, tiny_weights):
    datasets = synthetic.ct_series(3, rows=16, columns=16)
    sources = synthetic.write_series(tmp_path / "in", datasets)
    engine = DenoiseEngine.from_path(tiny_weights, InferenceSettings(device="cpu", threads=1, chunk_slices=2))
    reports = []
    processor = EngineProcessor(engine, DeriveSettings(), FidelitySettings())
    processor.denoise(sources, tmp_path / "out", lambda *report: reports.append(report))
    assert reports == [(0, 3), (2, 3), (3, 3)]


def test_progress_goes_to_metrics_every_chunk_and_to_the_log_at_most_every_interval():
    now = [100.0]
    metrics = Metrics()
    progress = SeriesProgress(get_logger("test").bind(series_uid="1.1"), metrics, interval_s=5, clock=lambda: now[0])
    with capture_logs() as logs:
        for done, at in ((64, 102.0), (128, 105.0), (192, 106.0), (256, 110.0)):
            now[0] = at
            progress(done, 300)
    assert gauges(metrics) == (256, 300)
    lines = [(e["slices_done"], e["slices_total"], e["series_uid"]) for e in logs if e["event"] == "denoising progress"]
    assert lines == [(128, 300, "1.1"), (256, 300, "1.1")]


def test_worker_feeds_the_gauges_while_denoising_and_zeroes_them_after(tmp_path):
    queue = JobStore(tmp_path / "q.sqlite3")
    for sop in ("1.1.1", "1.1.2"):
        path = tmp_path / "spool" / "1.1" / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        queue.add_instance("1.1", sop, path, now=0)
    queue.promote_quiet(0, now=1)
    metrics = Metrics()
    seen = []

    class Watched(FakeProcessor):
        def denoise(self, sources, out_dir, progress):
            result = super().denoise(sources, out_dir, progress)
            seen.append(gauges(metrics))
            return result

    assert Worker(queue, Watched(), tmp_path / "outbox", [], 0.05, metrics).step()
    assert queue.series("1.1").state == SeriesState.DONE
    assert seen == [(2, 2)] and gauges(metrics) == (0, 0)
    queue.close()
