"""Do no harm: the shipped student on a real normal-dose slice it must leave nearly as it is."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from ldct_node.config import FidelitySettings, InferenceSettings
from ldct_node.dicom.fidelity import lowpass_change, mean_hu_change, noise_sd, soft_tissue_mask, uniform_tissue
from ldct_node.dicom.pixels import padding_mask, padding_values, rescale, stored_to_hu, stored_values
from ldct_node.net.inference import DenoiseEngine

FIDELITY = FidelitySettings()
# Liver, kidneys and spine (1-061) and the lung bases (1-031) of the shared abdominal series.
SLICES = ("1-031.dcm", "1-061.dcm")
TILE, OVERLAP = 320, 128


@pytest.fixture(scope="module")
def engine() -> DenoiseEngine:
    return DenoiseEngine.from_path(None, InferenceSettings(device="cpu"))


def read(path):
    ds = pydicom.dcmread(path)
    stored = stored_values(ds)
    hu = stored_to_hu(stored, *rescale(ds))
    keep = padding_mask(stored, hu, *padding_values(ds), InferenceSettings().outside_fov_below_hu)
    return hu, keep, tuple(float(v) for v in ds.PixelSpacing)


@pytest.mark.parametrize("name", SLICES)
def test_a_normal_dose_slice_keeps_its_soft_tissue_hu_and_gains_no_shading(shared_series, engine, name):
    hu, keep, spacing = read(shared_series / name)
    out = engine.denoise_hu(hu[None], keep[None])[0]
    tissue = soft_tissue_mask(hu, keep, FIDELITY.soft_tissue_min_hu, FIDELITY.soft_tissue_max_hu)
    assert abs(mean_hu_change(hu, out, tissue)) <= 1.0
    assert np.percentile(lowpass_change(hu, out, tissue, spacing, FIDELITY.lowpass_sigma_mm), 95) <= 5.0


@pytest.mark.parametrize("name", SLICES)
def test_a_normal_dose_slice_changes_by_less_than_its_own_noise(shared_series, engine, name):
    """Edges kept: the whole change, edges included, is no larger than the noise the slice carries."""
    hu, keep, _ = read(shared_series / name)
    out = engine.denoise_hu(hu[None], keep[None])[0]
    tissue = soft_tissue_mask(hu, keep, FIDELITY.soft_tissue_min_hu, FIDELITY.soft_tissue_max_hu)
    own_noise = noise_sd(hu, uniform_tissue(hu, tissue))
    body = ~keep & (hu > -500)
    assert np.sqrt(np.mean((out - hu)[body] ** 2)) <= own_noise


def test_overlapping_tiles_agree_with_the_full_slice(shared_series, engine):
    hu, keep, _ = read(shared_series / "1-061.dcm")
    full = engine.denoise_hu(hu[None], keep[None])[0]
    step = TILE - OVERLAP
    for top in (0, hu.shape[0] - TILE):
        for left in (0, hu.shape[1] - TILE):
            window = (slice(top, top + TILE), slice(left, left + TILE))
            tile = engine.denoise_hu(hu[window][None], keep[window][None])[0]
            margin = OVERLAP // 2
            inner = (slice(0 if top == 0 else margin, TILE - margin if top == 0 else TILE),
                     slice(0 if left == 0 else margin, TILE - margin if left == 0 else TILE))
            assert np.abs(tile[inner] - full[window][inner]).max() < 0.5, (top, left, step)
