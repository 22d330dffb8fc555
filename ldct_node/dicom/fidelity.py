"""HU fidelity of a denoised series: did the network remove noise without shifting tissue HU?

Per slice, in the source's soft tissue (HU within [soft_tissue_min_hu, soft_tissue_max_hu] after
a 15 x 15 mean, eroded, never a kept/padding pixel):

- noise σ before and after: a robust SD (median absolute deviation × 1.4826) of the high-pass
  residual (image minus its 5 × 5 local mean, corrected for the filter's variance factor) in
  uniform tissue. That is the white-noise-equivalent σ of the fine-grain band; real CT noise is
  correlated, so it reads lower than a ROI's SD but is comparable before/after and between series;
- the change out − in: its mean (a bias) and the 95th percentile of its magnitude after a
  Gaussian low-pass of ``lowpass_sigma_mm`` (shading: a regional shift the overall mean hides).

FidelityAccumulator sums these over the slices of a series (chunks and stacks alike) into one
FidelitySummary; fidelity_violation says, in one line, which limit a summary exceeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ldct_node.config import FidelitySettings

# Local mean window (pixels) of the high-pass residual.
LOCAL_WINDOW_PX = 5
# Soft tissue is thresholded on the source's mean over this window: choosing pixels by a noisy value
# selects their noise (fat at -100 HU enters where its noise is positive) and fakes a change. On
# the shared series at 5 % simulated dose, a perfect denoiser reads -5.5 HU with a 5 x 5 mean and
# at most -0.5 HU with this window.
MASK_WINDOW_PX = 15
# ... and each pixel's 5 x 5 mean must lie within the range widened by this much: that keeps thin
# bone or air which the wide mean averages into range out of the mask, and lies far beyond noise.
MASK_MARGIN_HU = 400.0
# For white noise, var(x − mean_n(x)) = σ²(1 − 1/n) with n pixels in the window.
HIGHPASS_SD_FACTOR = math.sqrt(1.0 - 1.0 / LOCAL_WINDOW_PX**2)
# Erosion of the soft-tissue mask: partial-volume edges (tissue/air, tissue/bone) change
# legitimately when noise is removed and would bias the mean.
SOFT_TISSUE_EROSION_PX = 2
# Uniform tissue: the lowest quartile of local structure among soft-tissue pixels. Structure is the
# gradient of the local mean: choosing pixels by their own 5 × 5 SD would pick the ones whose
# noise happens to be low and bias σ about 17 % low; the local mean's gradient does not.
UNIFORM_QUANTILE = 0.25
# MAD → SD for a normal distribution.
MAD_TO_SD = 1.4826
# Fewer uniform pixels than this give no σ for the slice (end slices with hardly any tissue).
MIN_NOISE_PIXELS = 100
LOWPASS_PERCENTILE = 95.0
# The low-pass magnitudes of a whole series are pooled in a histogram (memory stays bounded for
# thousands of slices); the percentile is read to half this resolution, anything above the top
# bin counts in the top bin.
HISTOGRAM_BIN_HU = 0.05
HISTOGRAM_MAX_HU = 1000.0
# The low-pass is computed on cells of at most sigma / this many pixels (block sums), which changes
# the kernel's width by under 1 % and makes it ~16 times cheaper at 0.7 mm pixels.
LOWPASS_CELLS_PER_SIGMA = 2


def local_mean(image: np.ndarray) -> np.ndarray:
    """Mean over the LOCAL_WINDOW_PX square around each pixel (edges replicated)."""
    return ndimage.uniform_filter(np.asarray(image, dtype=np.float64), LOCAL_WINDOW_PX, mode="nearest")


def soft_tissue_mask(
    hu: np.ndarray, keep: np.ndarray | None, min_hu: float, max_hu: float, smooth: np.ndarray | None = None
) -> np.ndarray:
    """Pixels whose MASK_WINDOW_PX mean HU lies within [min_hu, max_hu] (and 5 x 5 mean within
    MASK_MARGIN_HU of it), eroded, never a kept (padding) pixel. smooth: local_mean(hu) if known."""
    smooth = local_mean(hu) if smooth is None else smooth
    wide = ndimage.uniform_filter(np.asarray(hu, dtype=np.float64), MASK_WINDOW_PX, mode="nearest")
    inside = (wide >= min_hu) & (wide <= max_hu)
    inside &= (smooth >= min_hu - MASK_MARGIN_HU) & (smooth <= max_hu + MASK_MARGIN_HU)
    if keep is not None:
        inside &= ~keep
    return ndimage.binary_erosion(inside, structure=np.ones((3, 3), bool), iterations=SOFT_TISSUE_EROSION_PX,
                                  border_value=0)


def uniform_tissue(hu: np.ndarray, mask: np.ndarray, smooth: np.ndarray | None = None) -> np.ndarray:
    """The mask's pixels whose local structure (gradient magnitude of the local mean) is in its
    lowest UNIFORM_QUANTILE: flat tissue. smooth: local_mean(hu) if already known."""
    if not mask.any():
        return mask
    smooth = local_mean(hu) if smooth is None else smooth
    structure = np.hypot(*np.gradient(smooth))
    return mask & (structure <= np.quantile(structure[mask], UNIFORM_QUANTILE))


def highpass(image: np.ndarray, smooth: np.ndarray | None = None) -> np.ndarray:
    """The image minus its local mean (smooth, if already known): the fine-grain band where noise lives."""
    return np.asarray(image, dtype=np.float64) - (local_mean(image) if smooth is None else smooth)


def robust_sd(values: np.ndarray) -> float:
    """MAD × 1.4826: the SD of normal data, unmoved by a few outliers (vessels, calcifications)."""
    return float(MAD_TO_SD * np.median(np.abs(values - np.median(values))))


def noise_sd(image: np.ndarray, where: np.ndarray, smooth: np.ndarray | None = None) -> float | None:
    """Noise σ (HU) of the image in the pixels `where`; None when fewer than MIN_NOISE_PIXELS."""
    if int(where.sum()) < MIN_NOISE_PIXELS:
        return None
    return robust_sd(highpass(image, smooth)[where]) / HIGHPASS_SD_FACTOR


def mean_hu_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float | None:
    """mean(after − before) over the mask; None for an empty mask."""
    if not mask.any():
        return None
    return float(np.mean((after - before)[mask]))


def block_sum(image: np.ndarray, factor: int) -> np.ndarray:
    """Sums over factor × factor cells (the image zero-padded to a multiple of factor)."""
    h, w = image.shape
    padded = np.pad(image, ((0, -h % factor), (0, -w % factor)))
    return padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).sum(axis=(1, 3))


def lowpass_change(
    before: np.ndarray, after: np.ndarray, mask: np.ndarray, pixel_spacing_mm: tuple[float, float], sigma_mm: float
) -> np.ndarray:
    """|Gaussian low-pass (sigma_mm) of (after − before)| at the mask's pixels, in HU.

    Smoothed within the mask only (normalised convolution), so air, bone and padding do not leak
    in; on cells of at most sigma / LOWPASS_CELLS_PER_SIGMA pixels, each pixel taking its cell's value."""
    if not mask.any():
        return np.empty(0)
    sigma_px = np.array([sigma_mm / pixel_spacing_mm[0], sigma_mm / pixel_spacing_mm[1]])
    factor = max(1, int(sigma_px.min() // LOWPASS_CELLS_PER_SIGMA))
    change = block_sum(np.where(mask, after - before, 0.0), factor)
    support = block_sum(mask.astype(np.float64), factor)
    smoothed = ndimage.gaussian_filter(change, sigma_px / factor, mode="constant")
    weight = ndimage.gaussian_filter(support, sigma_px / factor, mode="constant")
    rows, cols = np.nonzero(mask)
    rows, cols = rows // factor, cols // factor
    return np.abs(smoothed[rows, cols] / weight[rows, cols])


def percentile_from_histogram(counts: np.ndarray, bin_width: float, q: float) -> float | None:
    """The q-th percentile of the values counted in bins of bin_width from 0: the centre of the bin
    that reaches it (within half a bin of the true value); None when nothing was counted."""
    total = int(counts.sum())
    if total == 0:
        return None
    reached = int(np.searchsorted(np.cumsum(counts), q / 100.0 * total, side="left"))
    return (reached + 0.5) * bin_width


@dataclass(frozen=True)
class FidelitySummary:
    noise_sd_before: float | None  # HU, median over slices; None: no uniform soft tissue found
    noise_sd_after: float | None
    mean_hu_change: float | None  # HU, over every soft-tissue pixel of the series
    lowpass_p95_hu: float | None  # HU, 95th percentile of |low-pass change| over the series
    soft_tissue_pixels: int

    def as_fields(self, digits: int = 2) -> dict[str, float | None]:
        """The four measures rounded, for log lines and reports."""
        def r(v):
            return None if v is None else round(v, digits)

        return {"noise_sd_before": r(self.noise_sd_before), "noise_sd_after": r(self.noise_sd_after),
                "mean_hu_change": r(self.mean_hu_change), "lowpass_p95_hu": r(self.lowpass_p95_hu)}


@dataclass
class FidelityAccumulator:
    """Collects each slice's input and output HU of one series and summarises them."""

    settings: FidelitySettings = field(default_factory=FidelitySettings)
    _pixels: int = 0
    _change_sum: float = 0.0
    _noise_before: list[float] = field(default_factory=list)
    _noise_after: list[float] = field(default_factory=list)
    _lowpass_counts: np.ndarray = field(
        default_factory=lambda: np.zeros(int(round(HISTOGRAM_MAX_HU / HISTOGRAM_BIN_HU)), dtype=np.int64))

    def add(self, before: np.ndarray, after: np.ndarray, keep: np.ndarray | None,
            pixel_spacing_mm: tuple[float, float] | None) -> None:
        """One slice: before/after (H, W) HU, keep: padding pixels, pixel_spacing_mm: (row, column)
        spacing, None when unknown (no low-pass measure for the slice)."""
        s = self.settings
        smooth = local_mean(before)
        mask = soft_tissue_mask(before, keep, s.soft_tissue_min_hu, s.soft_tissue_max_hu, smooth)
        pixels = int(mask.sum())
        if not pixels:
            return
        self._pixels += pixels
        self._change_sum += float(np.sum((after - before)[mask]))
        uniform = uniform_tissue(before, mask, smooth)
        noise = noise_sd(before, uniform, smooth), noise_sd(after, uniform)
        if None not in noise:
            self._noise_before.append(noise[0])
            self._noise_after.append(noise[1])
        if pixel_spacing_mm is not None:
            values = lowpass_change(before, after, mask, pixel_spacing_mm, s.lowpass_sigma_mm)
            bins = np.minimum((values / HISTOGRAM_BIN_HU).astype(np.int64), len(self._lowpass_counts) - 1)
            self._lowpass_counts += np.bincount(bins, minlength=len(self._lowpass_counts))

    def to_state(self) -> dict:
        """What has been summed so far, as JSON-ready data: streaming keeps it in the job store
        between chunks, so that a restart neither loses nor recounts the slices measured."""
        bins = np.nonzero(self._lowpass_counts)[0]
        return {"pixels": self._pixels, "change_sum": self._change_sum, "noise_before": list(self._noise_before),
                "noise_after": list(self._noise_after),
                "lowpass": [[int(b), int(self._lowpass_counts[b])] for b in bins]}

    @classmethod
    def from_state(cls, settings: FidelitySettings, state: dict) -> FidelityAccumulator:
        """The accumulator to_state described, to go on adding slices to."""
        made = cls(settings, state["pixels"], state["change_sum"], list(state["noise_before"]),
                   list(state["noise_after"]))
        for index, count in state["lowpass"]:
            made._lowpass_counts[index] = count
        return made

    def summary(self) -> FidelitySummary:
        def median(values):
            return float(np.median(values)) if values else None

        return FidelitySummary(
            noise_sd_before=median(self._noise_before),
            noise_sd_after=median(self._noise_after),
            mean_hu_change=self._change_sum / self._pixels if self._pixels else None,
            lowpass_p95_hu=percentile_from_histogram(self._lowpass_counts, HISTOGRAM_BIN_HU, LOWPASS_PERCENTILE),
            soft_tissue_pixels=self._pixels,
        )


def fidelity_violation(summary: FidelitySummary, settings: FidelitySettings) -> str | None:
    """One line naming the first limit the series exceeds, None when it passes (or was not measurable)."""
    mean, limit = summary.mean_hu_change, settings.max_mean_hu_change
    if limit > 0 and mean is not None and abs(mean) > limit:
        return f"HU fidelity: mean soft-tissue change {mean:+.1f} HU exceeds the {limit:.1f} HU limit"
    p95, limit = summary.lowpass_p95_hu, settings.max_lowpass_change_hu
    if limit > 0 and p95 is not None and p95 > limit:
        return (f"HU fidelity: low-pass soft-tissue change {p95:.1f} HU ({LOWPASS_PERCENTILE:.0f}th percentile)"
                f" exceeds the {limit:.1f} HU limit")
    return None
