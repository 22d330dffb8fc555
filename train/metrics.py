"""Image-quality metrics on HU slices, each stated for an explicit HU range.

PSNR and SSIM depend on the intensity range they are computed over, so every call names it:
the full scaled range ``HU_FULL`` (what the network sees) and the soft-tissue window
``HU_SOFT_TISSUE`` (what a reader sees). RMSE is in HU on the unclipped images, so it also
counts errors outside the windows.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from ldct_node.config import FidelitySettings
from ldct_node.dicom.fidelity import mean_hu_change, noise_sd, soft_tissue_mask, uniform_tissue
from ldct_node.net.weights import InputScaling

# The network's input range, from the one place that states it (a reader's window is not it).
HU_FULL: tuple[float, float] = (InputScaling().hu_min, InputScaling().hu_max)
HU_SOFT_TISSUE: tuple[float, float] = (-160.0, 240.0)

# SSIM as in Wang et al. 2004 with a Gaussian window; the settings skimage documents for that paper.
SSIM_GAUSSIAN_SIGMA = 1.5


def _as_float(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _check_shapes(test: np.ndarray, ref: np.ndarray) -> None:
    if test.shape != ref.shape:
        raise ValueError(f"test and reference images differ in shape: {test.shape} vs {ref.shape}")


def normalise_to_range(hu, hu_range: tuple[float, float]) -> np.ndarray:
    """HU clipped to the range and mapped to [0, 1]."""
    low, high = hu_range
    if not high > low:
        raise ValueError(f"HU range must be increasing, got {hu_range}")
    return (np.clip(_as_float(hu), low, high) - low) / (high - low)


def psnr(test_hu, ref_hu, hu_range: tuple[float, float]) -> float:
    """PSNR in dB of the clipped images, with the range width as the peak; inf when identical."""
    test, ref = _as_float(test_hu), _as_float(ref_hu)
    _check_shapes(test, ref)
    mse = float(np.mean((normalise_to_range(test, hu_range) - normalise_to_range(ref, hu_range)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)


def ssim(test_hu, ref_hu, hu_range: tuple[float, float]) -> float:
    """2-D SSIM of one slice on the clipped, range-normalised images."""
    test, ref = _as_float(test_hu), _as_float(ref_hu)
    _check_shapes(test, ref)
    if test.ndim != 2:
        raise ValueError(f"ssim takes one 2-D slice, got shape {test.shape}")
    return float(
        structural_similarity(
            normalise_to_range(test, hu_range),
            normalise_to_range(ref, hu_range),
            gaussian_weights=True,
            sigma=SSIM_GAUSSIAN_SIGMA,
            use_sample_covariance=False,
            data_range=1.0,
        )
    )


def rmse(test_hu, ref_hu) -> float:
    """Root-mean-square error in HU, unclipped."""
    test, ref = _as_float(test_hu), _as_float(ref_hu)
    _check_shapes(test, ref)
    return float(np.sqrt(np.mean((test - ref) ** 2)))


# Metric name -> what it is, in the order reports list them.
METRIC_LABELS: dict[str, str] = {
    "psnr_full": f"PSNR [dB], HU {HU_FULL[0]:g}..{HU_FULL[1]:g}",
    "ssim_full": f"SSIM, HU {HU_FULL[0]:g}..{HU_FULL[1]:g}",
    "psnr_soft": f"PSNR [dB], HU {HU_SOFT_TISSUE[0]:g}..{HU_SOFT_TISSUE[1]:g}",
    "ssim_soft": f"SSIM, HU {HU_SOFT_TISSUE[0]:g}..{HU_SOFT_TISSUE[1]:g}",
    "rmse_hu": "RMSE [HU]",
    "hu_bias": "HU bias in soft tissue [HU]",
    "noise_sd": "noise σ in uniform soft tissue [HU]",
}
# Soft tissue as the node's fidelity gate defines it, so the report and the gate measure alike.
_FIDELITY = FidelitySettings()


def soft_tissue_of(ref_hu) -> np.ndarray:
    ref = _as_float(ref_hu)
    return soft_tissue_mask(ref, None, _FIDELITY.soft_tissue_min_hu, _FIDELITY.soft_tissue_max_hu)


def hu_bias(test_hu, ref_hu) -> float:
    """mean(test − ref) over the reference's soft tissue (NaN where it has none)."""
    change = mean_hu_change(_as_float(ref_hu), _as_float(test_hu), soft_tissue_of(ref_hu))
    return math.nan if change is None else change


def noise_in_uniform_tissue(test_hu, ref_hu) -> float:
    """The test image's robust noise σ where the reference is flat soft tissue (NaN where it has none)."""
    ref = _as_float(ref_hu)
    sd = noise_sd(_as_float(test_hu), uniform_tissue(ref, soft_tissue_of(ref)))
    return math.nan if sd is None else sd


def slice_metrics(test_hu, ref_hu) -> dict[str, float]:
    """Every reported metric of one slice, keyed as in METRIC_LABELS."""
    return {
        "psnr_full": psnr(test_hu, ref_hu, HU_FULL),
        "ssim_full": ssim(test_hu, ref_hu, HU_FULL),
        "psnr_soft": psnr(test_hu, ref_hu, HU_SOFT_TISSUE),
        "ssim_soft": ssim(test_hu, ref_hu, HU_SOFT_TISSUE),
        "rmse_hu": rmse(test_hu, ref_hu),
        "hu_bias": hu_bias(test_hu, ref_hu),
        "noise_sd": noise_in_uniform_tissue(test_hu, ref_hu),
    }
