"""Classical denoisers the evaluation compares the networks with, applied slice by slice to HU.

Both work on the slice mapped to [0, 1] over the full HU range the networks see, and set their
strength from the noise level estimated on the slice itself (never from the normal-dose
reference, which a real reader would not have). BM3D is reported as not available unless the
``bm3d`` package is installed; nothing stands in for it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import convolve
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from .metrics import HU_FULL, normalise_to_range


@dataclass(frozen=True)
class BaselineSettings:
    # Chambolle TV weight as a multiple of the estimated noise SD (unit scale); tuned by PSNR on
    # a simulated 5 % dose slice of the shared series.
    tv_weight_per_sigma: float = 1.0
    nlm_patch_size: int = 5
    nlm_patch_distance: int = 6
    # Filter strength h as a multiple of the estimated noise SD; tuned like the TV weight
    # (skimage suggests about 0.8 for white noise; correlated CT noise wants more).
    nlm_h_per_sigma: float = 1.2
    # The Laplacian estimate sees the finest scale only, where reconstructed CT noise is weak; this
    # factor brings it to the noise SD inside the body (measured on the simulated 5 % dose slice,
    # whose noise has the simulator's Hann-windowed grain; other kernels may want another factor).
    sigma_correction: float = 5.8
    # Noise is estimated inside the body: air outside it is clipped or vendor fill, without noise.
    body_above_hu: float = -900.0


def bm3d_available() -> bool:
    return importlib.util.find_spec("bm3d") is not None


def _to_unit(hu: np.ndarray) -> np.ndarray:
    return normalise_to_range(hu, HU_FULL)


def _to_hu(unit: np.ndarray) -> np.ndarray:
    low, high = HU_FULL
    return unit * (high - low) + low


# Immerkær's mask: the difference of two Laplacians, blind to linear ramps; white noise of SD σ
# comes out with SD 6σ (the root of the sum of its squared weights).
_NOISE_MASK = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_NOISE_MASK_GAIN = 6.0
_MAD_TO_SD = 1.4826  # median absolute deviation of a normal distribution, to its SD


def noise_sigma(unit: np.ndarray, body: np.ndarray, settings: BaselineSettings) -> float:
    """Noise SD of a unit-scaled slice, estimated from the slice alone (median-based: edges barely count)."""
    response = convolve(unit, _NOISE_MASK, mode="reflect")[body]
    if response.size == 0:
        return 0.0
    return float(_MAD_TO_SD * np.median(np.abs(response)) / _NOISE_MASK_GAIN) * settings.sigma_correction


def tv_denoise(hu: np.ndarray, settings: BaselineSettings) -> np.ndarray:
    """Total-variation denoising (Chambolle) of one HU slice."""
    unit = _to_unit(hu)
    weight = settings.tv_weight_per_sigma * noise_sigma(unit, hu > settings.body_above_hu, settings)
    return _to_hu(denoise_tv_chambolle(unit, weight=weight))


def nlm_denoise(hu: np.ndarray, settings: BaselineSettings) -> np.ndarray:
    """Non-local means of one HU slice."""
    unit = _to_unit(hu)
    sigma = noise_sigma(unit, hu > settings.body_above_hu, settings)
    return _to_hu(denoise_nl_means(unit, h=settings.nlm_h_per_sigma * sigma, sigma=sigma, fast_mode=True,
                                   patch_size=settings.nlm_patch_size, patch_distance=settings.nlm_patch_distance))


def bm3d_denoise(hu: np.ndarray, settings: BaselineSettings) -> np.ndarray:
    """BM3D of one HU slice (only offered when the bm3d package is installed)."""
    import bm3d

    unit = _to_unit(hu)
    return _to_hu(bm3d.bm3d(unit, sigma_psd=noise_sigma(unit, hu > settings.body_above_hu, settings)))


# Report name -> slice denoiser, in report order.
BASELINES: dict[str, Callable[[np.ndarray, BaselineSettings], np.ndarray]] = {
    "TV": tv_denoise,
    "NLM": nlm_denoise,
}
if bm3d_available():
    BASELINES["BM3D"] = bm3d_denoise


def denoise_volume(method: Callable[[np.ndarray, BaselineSettings], np.ndarray], hu: np.ndarray,
                   settings: BaselineSettings) -> np.ndarray:
    """A slice denoiser applied to every slice of (S, H, W) HU."""
    return np.stack([method(slice_, settings) for slice_ in hu]).astype(np.float32)
