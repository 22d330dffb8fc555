"""The per-series HU fidelity gate: each measure on its own, then the worker and `ldct-node denoise` acting on it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from ldct_node.cli import main
from ldct_node.config import Config, ConfigError, DeriveSettings, FidelitySettings, InferenceSettings, validate
from ldct_node.dicom.fidelity import (
    HISTOGRAM_BIN_HU,
    FidelityAccumulator,
    FidelitySummary,
    fidelity_violation,
    lowpass_change,
    mean_hu_change,
    noise_sd,
    percentile_from_histogram,
    robust_sd,
    soft_tissue_mask,
    uniform_tissue,
)
from ldct_node.net.inference import DenoiseEngine
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import LoadedModel, ModelCard, save_weights
from ldct_node.node.jobs import JobStore, SeriesState
from ldct_node.node.observe import Metrics
from ldct_node.node.worker import EngineProcessor, Worker
from tests import synthetic

SIZE = 64
SPACING = (0.7, 0.7)
OFFSET_HU = 20.0
SCALING_SPAN_HU = 4096.0  # the card's input scaling: one unit is 4096 HU


def flat(sd: float, size: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(40.0, sd, size=(size, size))


@pytest.mark.parametrize("sd", [5.0, 25.0, 80.0])
def test_noise_sd_recovers_the_sd_of_synthetic_noise_within_10_percent(sd):
    image = flat(sd)
    mask = soft_tissue_mask(image, None, -1000.0, 1000.0)
    estimate = noise_sd(image, uniform_tissue(image, mask))
    assert estimate == pytest.approx(sd, rel=0.10)


def test_uniform_tissue_avoids_edges_between_tissues():
    image = flat(10.0)
    image[:, 128:] += 150.0  # a step inside the soft-tissue range
    mask = soft_tissue_mask(image, None, -100.0, 300.0)
    uniform = uniform_tissue(image, mask)
    assert uniform.any() and not uniform[:, 126:131].any()  # where the local mean ramps
    assert noise_sd(image, uniform) == pytest.approx(10.0, rel=0.10)


def test_noise_sd_needs_enough_pixels():
    image = flat(10.0, size=32)
    assert noise_sd(image, np.zeros(image.shape, bool)) is None


def test_robust_sd_ignores_a_few_outliers():
    values = np.random.default_rng(1).normal(0.0, 10.0, 10000)
    values[:50] = 3000.0  # calcifications, contrast in a vessel
    assert robust_sd(values) == pytest.approx(10.0, rel=0.05)


def test_mask_keeps_soft_tissue_and_excludes_padding_its_border_air_and_bone():
    hu = np.full((40, 40), 40.0)
    hu[:, :8] = -1000.0  # air
    hu[:, 32:] = 1200.0  # bone
    keep = np.zeros(hu.shape, bool)
    keep[:6, 10:30] = True  # padding that happens to carry a soft-tissue value
    mask = soft_tissue_mask(hu, keep, -100.0, 200.0)
    assert mask[20, 20]
    assert not mask[keep].any()
    assert not mask[:, :8].any() and not mask[:, 32:].any()
    assert not mask[6:8, 10:30].any()  # eroded away from the padding's edge
    assert not mask[0].any() and not mask[-1].any()  # nor the image border


def test_mean_change_of_a_constant_offset_is_exact():
    before = synthetic.phantom_hu(SIZE, SIZE).round()
    mask = soft_tissue_mask(before, before <= -1500, -100.0, 200.0)
    assert mean_hu_change(before, before + 7.25, mask) == 7.25
    assert mean_hu_change(before, before, np.zeros(before.shape, bool)) is None


def test_a_perfect_denoiser_of_noisy_fat_and_muscle_reads_no_change_with_the_default_range():
    truth = np.full((256, 256), -100.0)  # fat
    truth[:, 128:] = 50.0  # muscle
    noisy = truth + np.random.default_rng(2).normal(0.0, 60.0, truth.shape)  # very low dose
    s = FidelitySettings()
    mask = soft_tissue_mask(noisy, None, s.soft_tissue_min_hu, s.soft_tissue_max_hu)
    assert mask[:, :120].sum() > 20000  # all the fat, not just its pixels with positive noise
    assert abs(mean_hu_change(noisy, truth, mask)) < 0.2


def test_a_bound_on_a_tissues_own_hu_would_fake_a_change():
    truth = np.full((256, 256), -100.0)
    noisy = truth + np.random.default_rng(2).normal(0.0, 60.0, truth.shape)
    mask = soft_tissue_mask(noisy, None, -100.0, 200.0)
    assert mean_hu_change(noisy, truth, mask) < -1.0  # why soft_tissue_min_hu is -150


def test_lowpass_of_a_constant_offset_equals_it():
    before = synthetic.phantom_hu(SIZE, SIZE)
    mask = soft_tissue_mask(before, before <= -1500, -100.0, 200.0)
    values = lowpass_change(before, before - 5.0, mask, SPACING, 6.0)
    assert values.shape == (int(mask.sum()),)
    np.testing.assert_allclose(values, 5.0, rtol=1e-9)


def test_lowpass_removes_zero_mean_noise_but_keeps_shading():
    before = flat(20.0, size=128)
    mask = np.ones(before.shape, bool)
    denoised = np.full(before.shape, 40.0)
    assert np.percentile(lowpass_change(before, denoised, mask, SPACING, 6.0), 95) < 3.0
    shaded = denoised + np.linspace(0.0, 30.0, 128)[None, :]
    assert np.percentile(lowpass_change(before, shaded, mask, SPACING, 6.0), 95) > 20.0


def test_percentile_from_histogram_reads_the_bin_that_reaches_it():
    counts = np.zeros(100, dtype=np.int64)
    counts[10], counts[50] = 94, 6
    assert percentile_from_histogram(counts, 0.5, 95.0) == pytest.approx(25.25)
    assert percentile_from_histogram(counts, 0.5, 90.0) == pytest.approx(5.25)
    assert percentile_from_histogram(np.zeros(10), 0.5, 95.0) is None


def test_accumulating_slices_gives_the_series_summary():
    acc = FidelityAccumulator(FidelitySettings())
    for seed in range(3):
        before = synthetic.phantom_hu(SIZE, SIZE, seed=seed).round()
        acc.add(before, before + OFFSET_HU, before <= -1500, SPACING)
    summary = acc.summary()
    assert summary.mean_hu_change == OFFSET_HU
    assert summary.lowpass_p95_hu == pytest.approx(OFFSET_HU, abs=HISTOGRAM_BIN_HU / 2 + 1e-9)
    assert summary.noise_sd_before == pytest.approx(20.0, rel=0.10)  # phantom_hu's noise
    assert summary.noise_sd_after == pytest.approx(summary.noise_sd_before)


def test_a_series_without_soft_tissue_or_pixel_spacing_has_no_measures():
    acc = FidelityAccumulator(FidelitySettings())
    air = np.full((SIZE, SIZE), -1000.0)
    acc.add(air, air + 50.0, None, SPACING)
    assert acc.summary() == FidelitySummary(None, None, None, None, 0)
    tissue = synthetic.phantom_hu(SIZE, SIZE)
    acc.add(tissue, tissue, tissue <= -1500, None)
    assert acc.summary().lowpass_p95_hu is None and acc.summary().mean_hu_change == 0.0


@pytest.mark.parametrize(
    "summary, settings, reason",
    [
        (FidelitySummary(20, 8, -5.2, 1, 1), FidelitySettings(),
         "HU fidelity: mean soft-tissue change -5.2 HU exceeds the 3.0 HU limit"),
        (FidelitySummary(20, 8, 0.4, 16.3, 1), FidelitySettings(),
         "HU fidelity: low-pass soft-tissue change 16.3 HU (95th percentile) exceeds the 15.0 HU limit"),
        (FidelitySummary(20, 8, 2.9, 14.9, 1), FidelitySettings(), None),
        (FidelitySummary(20, 8, -5.2, 16.3, 1), FidelitySettings(max_mean_hu_change=0, max_lowpass_change_hu=0), None),
        (FidelitySummary(None, None, None, None, 0), FidelitySettings(), None),
    ],
)
def test_violation_names_the_limit_in_one_line(summary, settings, reason):
    assert fidelity_violation(summary, settings) == reason


@pytest.mark.parametrize("key, value", [("max_mean_hu_change", -1.0), ("max_lowpass_change_hu", -1.0),
                                        ("soft_tissue_min_hu", 300.0), ("lowpass_sigma_mm", 0.0)])
def test_bad_fidelity_settings_are_one_line_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"fidelity.{key}"):
        validate(Config(fidelity=FidelitySettings(**{key: value})))


def test_metrics_show_the_last_series_a_histogram_and_the_gate_counter():
    metrics = Metrics()
    metrics.series_fidelity(FidelitySummary(30.0, 9.0, 21.0, 20.0, 100), failed=True)
    metrics.series_fidelity(FidelitySummary(None, None, 0.5, None, 100), failed=False)
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples["ldct_series_fidelity_failed_total"] == 1
    assert samples["ldct_last_series_mean_hu_change"] == 0.5
    assert math.isnan(samples["ldct_last_series_noise_sd_before_hu"])
    assert samples["ldct_series_mean_hu_change_count"] == 2
    assert samples["ldct_series_noise_sd_after_hu_count"] == 1


# --- the gate in the node and in `ldct-node denoise` -----------------------------------------


class AddHU(torch.nn.Module):
    """The middle slice plus a constant: a model that shifts every tissue by `hu`."""

    def __init__(self, hu: float):
        super().__init__()
        self.delta = hu / SCALING_SPAN_HU

    def forward(self, x):
        mid = x.shape[1] // 2
        return x[:, mid : mid + 1] + self.delta


def processor(model: torch.nn.Module) -> EngineProcessor:
    card = ModelCard(name="t", version="0", architecture="tscnet", settings={"in_slices": 1})
    engine = DenoiseEngine(LoadedModel(model, card, path=None), InferenceSettings(device="cpu", threads=1))
    return EngineProcessor(engine, DeriveSettings(), FidelitySettings())


def queued_series(tmp_path: Path, count: int = 3) -> tuple[JobStore, str]:
    datasets = synthetic.ct_series(count, rows=SIZE, columns=SIZE)
    series_uid = datasets[0].SeriesInstanceUID
    queue = JobStore(tmp_path / "q.sqlite3")
    for path, ds in zip(synthetic.write_series(tmp_path / "spool" / series_uid, datasets), datasets):
        queue.add_instance(series_uid, ds.SOPInstanceUID, path, now=0)
    queue.promote_quiet(0, now=1)
    return queue, series_uid


def test_worker_fails_a_series_whose_model_adds_20_hu_and_sends_nothing(tmp_path):
    queue, series_uid = queued_series(tmp_path)
    metrics = Metrics()
    worker = Worker(queue, processor(AddHU(OFFSET_HU)), tmp_path / "outbox", ["pacs"], 0.05, metrics)
    with capture_logs() as logs:
        assert worker.step()
    row = queue.series(series_uid)
    assert row.state == SeriesState.FAILED
    assert row.reason.startswith("HU fidelity: mean soft-tissue change +20.0 HU exceeds the 3.0 HU limit (not sent)")
    assert "\n" not in row.reason
    assert not row.deliveries
    assert not any((tmp_path / "outbox").iterdir())  # the derived files are gone: nothing can be sent later
    assert metrics.fidelity_failed._value.get() == 1
    (finished,) = [e for e in logs if e["event"] == "series finished"]
    assert finished["mean_hu_change"] == pytest.approx(OFFSET_HU, abs=0.01)
    queue.close()


def test_worker_passes_the_identity_model_and_logs_the_measures(tmp_path):
    queue, series_uid = queued_series(tmp_path)
    worker = Worker(queue, processor(AddHU(0.0)), tmp_path / "outbox", [], 0.05, Metrics())
    with capture_logs() as logs:
        assert worker.step()
    assert queue.series(series_uid).state == SeriesState.DONE
    (denoised,) = [e for e in logs if e["event"] == "series denoised"]
    assert denoised["mean_hu_change"] == 0.0 and denoised["lowpass_p95_hu"] <= HISTOGRAM_BIN_HU
    assert denoised["noise_sd_before"] == pytest.approx(20.0, rel=0.15)  # phantom_hu's noise, 3 small slices
    assert denoised["noise_sd_after"] == denoised["noise_sd_before"]
    queue.close()


def offset_weights(path: Path, hu: float) -> Path:
    """Tiny TSC-Net weights that add `hu` everywhere: zero head weights, the offset in its bias."""
    settings = TSCNetConfig(width=4, num_dems=2)
    net = TSCNet(settings)
    torch.nn.init.constant_(net.head.bias, hu / SCALING_SPAN_HU)
    card = ModelCard(name="offset", version="0", architecture="tscnet", settings=settings.to_dict())
    return save_weights(net, card, path)


def test_offline_denoise_reports_a_shifted_series_as_failed_and_removes_its_output(tmp_path, capsys):
    synthetic.write_series(tmp_path / "in", synthetic.ct_series(2, rows=SIZE, columns=SIZE))
    weights = offset_weights(tmp_path / "w" / "offset", OFFSET_HU)
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", str(weights),
                 "--no-progress"]) == 1
    out = capsys.readouterr().out
    (failed,) = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert "HU fidelity: mean soft-tissue change +20.0 HU exceeds the 3.0 HU limit (output removed;" in failed
    assert not any((tmp_path / "out").iterdir())


def test_offline_denoise_prints_the_measures_and_a_disabled_gate_writes_the_series(tmp_path, capsys):
    synthetic.write_series(tmp_path / "in", synthetic.ct_series(2, rows=SIZE, columns=SIZE))
    weights = offset_weights(tmp_path / "w" / "offset", OFFSET_HU)
    config = tmp_path / "c.toml"
    config.write_text("[fidelity]\nmax_mean_hu_change = 0.0\nmax_lowpass_change_hu = 0.0\n")
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", str(weights),
                 "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"noise SD \d+\.\d -> \d+\.\d HU, mean soft-tissue change \+20.0 HU, low-pass p95 20.0 HU", out)
    (folder,) = (tmp_path / "out").iterdir()
    assert len(list(folder.iterdir())) == 2
