"""HU metrics: each is computed over the range it names, with the stated peak and window."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ldct_train.metrics import (
    HU_FULL,
    HU_SOFT_TISSUE,
    METRIC_LABELS,
    normalise_to_range,
    psnr,
    rmse,
    slice_metrics,
    ssim,
)


@pytest.fixture
def phantom() -> np.ndarray:
    rng = np.random.default_rng(0)
    ref = np.full((48, 48), 40.0)
    ref[10:20, 10:20] = 1200.0  # bone
    ref[30:40, 5:15] = -900.0  # lung
    return ref + rng.normal(0, 5, ref.shape)


def test_the_two_reported_ranges_are_full_scaling_and_soft_tissue_window():
    assert HU_FULL == (-1024.0, 3072.0)
    assert HU_SOFT_TISSUE == (-160.0, 240.0)


def test_psnr_of_a_constant_offset_uses_the_range_width_as_peak(phantom):
    offset = 41.0
    expected_full = 20 * math.log10(4096.0 / offset)
    flat = np.full_like(phantom, 0.0)
    assert psnr(flat + offset, flat, HU_FULL) == pytest.approx(expected_full, rel=1e-9)
    assert psnr(flat + offset, flat, HU_SOFT_TISSUE) == pytest.approx(20 * math.log10(400.0 / offset), rel=1e-9)


def test_psnr_is_infinite_for_identical_slices(phantom):
    assert psnr(phantom, phantom, HU_FULL) == math.inf


def test_psnr_ignores_differences_outside_the_clipped_range(phantom):
    changed = phantom.copy()
    changed[10:20, 10:20] += 500.0  # bone stays above 240 HU: invisible in the soft-tissue window
    assert psnr(changed, phantom, HU_SOFT_TISSUE) == math.inf
    assert psnr(changed, phantom, HU_FULL) < 60.0


def test_the_soft_tissue_window_is_stricter_than_the_full_range(phantom):
    noisy = phantom + np.random.default_rng(1).normal(0, 20, phantom.shape)
    assert psnr(noisy, phantom, HU_SOFT_TISSUE) < psnr(noisy, phantom, HU_FULL) - 10
    assert ssim(noisy, phantom, HU_SOFT_TISSUE) < ssim(noisy, phantom, HU_FULL)


def test_ssim_is_gaussian_windowed_ssim_of_the_normalised_clipped_slice(phantom):
    noisy = phantom + np.random.default_rng(2).normal(0, 30, phantom.shape)
    expected = structural_similarity(
        np.clip((noisy + 160) / 400, 0, 1),
        np.clip((phantom + 160) / 400, 0, 1),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    assert ssim(noisy, phantom, HU_SOFT_TISSUE) == pytest.approx(expected, rel=1e-12)
    assert ssim(phantom, phantom, HU_FULL) == pytest.approx(1.0)


def test_ssim_refuses_a_volume():
    with pytest.raises(ValueError, match="2-D"):
        ssim(np.zeros((2, 16, 16)), np.zeros((2, 16, 16)), HU_FULL)


def test_rmse_is_in_hu_and_unclipped(phantom):
    changed = phantom.copy()
    changed[0, 0] += 48 * 48 * 1.0  # one pixel far outside every window
    assert rmse(changed, phantom) == pytest.approx(48.0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)), HU_FULL)
    with pytest.raises(ValueError, match="shape"):
        rmse(np.zeros((4, 4)), np.zeros((5, 4)))


def test_normalise_to_range_rejects_an_empty_range():
    with pytest.raises(ValueError, match="increasing"):
        normalise_to_range(np.zeros(3), (10.0, 10.0))


def test_slice_metrics_reports_every_labelled_metric(phantom):
    noisy = phantom + 10.0
    values = slice_metrics(noisy, phantom)
    assert list(values) == list(METRIC_LABELS)
    assert values["rmse_hu"] == pytest.approx(10.0)
    assert values["psnr_soft"] == pytest.approx(psnr(noisy, phantom, HU_SOFT_TISSUE))
