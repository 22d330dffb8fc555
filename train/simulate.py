"""Low-dose CT simulated from normal-dose slices in the projection domain.

HU → linear attenuation → parallel-beam sinogram p → the photon counts a full-dose ray receives,
λ = I0·e^−p. A scan at dose fraction d receives d·λ photons plus electronic noise of SD σe, so its
log-transformed line integrals carry noise of variance (d·λ + σe²)/(d·λ)². The normal-dose scan
already carries the d = 1 share of it, so what the simulation *adds* is the difference:

    var_added = (1 − d)/(d·λ) + (1 − d²)·σe²/(d·λ)²

drawn as a zero-mean Gaussian in the sinogram (the post-log Gaussian model of low-dose noise
insertion). Taking −log of Poisson counts instead would be biased by about (λ + σe²)/(2λ²) on every
ray, a bias that grows as 1/d and showed up as a constant HU shift in the network trained on it;
the Gaussian draw has mean zero at every dose by construction. The inserted noise is
reconstructed by filtered back-projection with the plain ramp and then given the texture of a
reconstruction kernel by a radial window in the image's 2-D spectrum (the Fourier slice theorem
makes that the same as windowing the 1-D ramp), so one reconstruction serves every kernel.

Both variance terms are linear in a unit draw: ``unit_noise_hu`` returns the reconstructed
quantum (z/√λ) and electronic (σe·z/λ) realisations, and ``dose_weights`` scales them to any dose.
The trainer caches a few unit realisations per slice (train/bank.py) and mixes, scales and
filters them afresh at every step, which costs a few FFTs instead of a projection.

The projector is written in torch (rotation by ``grid_sample``, summed along rows; back-projection
by linear interpolation of each filtered view) so that it batches and runs on CUDA. View angles
are offset by half a step, which makes the set closed under a quarter turn and a mirror: one
sampling grid serves four views, applied to the slice rotated by 90° and mirrored, which quarters
the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from ldct_node import __version__
from ldct_node.config import InferenceSettings
from ldct_node.dicom.derive import rewritten_instance, write_dataset
from ldct_node.dicom.pixels import hu_to_stored, padding_mask, padding_values, rescale, restore_masked, stored_to_hu, stored_values
from ldct_node.dicom.series import Instance, scan_tree, stacks
from ldct_node.dicom.uids import SIMULATE_NAMESPACE, UUID_ROOT, name_uid
from ldct_node.errors import CommandError
from ldct_node.logs import get_logger
from ldct_node.net.inference import resolve_device

from .data import load_pairs

# Windows on the ramp for the projector's own filtered back-projection.
FILTERS = ("ramp", "shepp-logan", "hann")


@dataclass(frozen=True)
class Kernel:
    """Radial window W(f) = alpha + (1 − alpha)·cos(π f / cutoff) below the cutoff, 0 above, f in
    cycles per pixel (Nyquist 0.5): alpha 1 is the bare ramp (the sharpest noise), 0.5 a Hann
    roll-off (smooth); a lower cutoff smooths further."""

    alpha: float
    cutoff: float


KERNELS = {
    "ramp": Kernel(1.0, 0.5),  # sharp: bone / lung kernels
    "hamming": Kernel(0.54, 0.5),
    "hann": Kernel(0.5, 0.5),  # standard soft tissue
    "smooth": Kernel(0.5, 0.35),  # smooth abdominal / iterative-looking
}
# The ranges a training sample's kernel is drawn from: the soft-tissue presets above and beyond them
# on both sides, from smoother than "smooth" (cutoff 0.25) to a sharp body kernel with 1.65 × the
# noise of "hann" (alpha 0.75). Not the bare ramp: at 25 % dose it adds 2.5 × hann's noise (≈ 95 HU
# in the abdomen), bone-kernel noise that nobody reads soft tissue in, and a range reaching it spent
# most training samples far above the 20–40 HU that real quarter-dose scans add
# (bench/noise_spectra.py prints the spectra and σ this range covers).
KERNEL_ALPHA_RANGE = (0.5, 0.75)
KERNEL_CUTOFF_RANGE = (0.25, 0.5)
# HU is defined so that water is 0 and air −1000.
HU_PER_WATER = 1000.0


@dataclass(frozen=True)
class SimulationSettings:
    # Photons reaching one simulated detector bin (one pixel wide, the slice thick) in one view of an
    # unattenuated ray at full dose. A bin lumps several rows and views of a real detector (each
    # about 1e5–2e5), hence the larger number: with it the full-dose noise this model implies for the
    # shared abdominal series is about 12 HU in the liver, that of a routine scan, so a dose fraction
    # d adds 12·sqrt((1 − d)/d) HU. Noise scales with 1/sqrt(incident_flux · views).
    incident_flux: float = 1.0e6
    # Standard deviation of the detector's electronic noise, in photon counts; it dominates
    # photon-starved rays at very low dose.
    electronic_noise: float = 10.0
    # Linear attenuation of water at about 70 keV, the effective energy of a 120 kVp beam.
    mu_water_per_mm: float = 0.0193
    # Views over 180°; a multiple of 4 × attenuation_downsample (the symmetry the projector uses).
    views: int = 512
    # Reconstruction kernel of the inserted noise (a name in KERNELS): "hann" rolls off to zero at
    # Nyquist like a scanner's standard soft-tissue kernel.
    kernel: str = "hann"
    # Full-dose counts are floored here before the variance is formed: rays through metal would
    # otherwise get unbounded noise, where scanners clamp and pre-filter photon-starved rays.
    count_floor: float = 20.0
    # The attenuation sinogram only sets the photon counts, which vary smoothly along the detector,
    # so it is computed at this reduced resolution (1: full); noise is drawn at full resolution.
    attenuation_downsample: int = 2
    # Vendor fill outside the field of view is air for the projector and is written back unchanged.
    outside_fov_below_hu: float = InferenceSettings.outside_fov_below_hu
    device: str = "auto"
    # Slices simulated together and the size of one batch of views during projection. On a
    # CPU more of either only adds memory traffic; on a GPU raise both (e.g. 16 and 1024).
    slices_per_batch: int = 1
    memory_budget_mb: int = 16


def validate_settings(settings: SimulationSettings) -> None:
    """Raise CommandError naming the first setting that cannot work."""
    s = settings
    checks = [
        (s.incident_flux > 0, "incident flux must be positive"),
        (s.electronic_noise >= 0, "electronic noise must be >= 0"),
        (s.mu_water_per_mm > 0, "mu_water_per_mm must be positive"),
        (s.attenuation_downsample in (1, 2), "attenuation_downsample must be 1 or 2"),
        (s.views > 0 and s.views % (4 * s.attenuation_downsample) == 0,
         f"views must be a positive multiple of {4 * s.attenuation_downsample}"),
        (s.kernel in KERNELS, f"kernel must be one of {', '.join(KERNELS)}"),
        (s.count_floor > 0, "count_floor must be positive"),
        (s.slices_per_batch >= 1, "slices_per_batch must be at least 1"),
        (s.memory_budget_mb >= 1, "memory_budget_mb must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise CommandError(f"simulation settings: {message}")


def validate_dose(dose: float) -> None:
    if not 0 < dose <= 1:
        raise CommandError(f"dose fraction {dose} is outside (0, 1]: give e.g. --dose 0.05 for 5 % of the normal dose")


# ---------------------------------------------------------------- projector


def detector_coordinates(size: int, device, dtype=torch.float32) -> torch.Tensor:
    """Pixel (and detector bin) centres in grid_sample's normalised [-1, 1] units."""
    return (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1


def view_angles(views: int) -> torch.Tensor:
    """Angles over [0, π) offset by half a step, so θ ↦ θ + π/2 and θ ↦ π − θ map views onto views."""
    return (torch.arange(views, dtype=torch.float64) + 0.5) * math.pi / views


def _symmetric_views(k: torch.Tensor, views: int) -> list[torch.Tensor]:
    """The four views that the grid of view k (k < views/4) reaches through the channel
    transforms of _to_channels, in channel order."""
    return [k, k + views // 2, views - 1 - k, views // 2 - 1 - k]


def _to_channels(image: torch.Tensor) -> torch.Tensor:
    """(B, N, N) → (4B, N, N): the slice, turned 90°, mirrored, and mirrored then turned."""
    turn = lambda a: torch.rot90(a, 1, (-2, -1))  # noqa: E731
    mirror = lambda a: torch.flip(a, (-1,))  # noqa: E731
    return torch.cat([image, turn(image), mirror(image), turn(mirror(image))])


def _from_channels(stacked: torch.Tensor) -> torch.Tensor:
    """Inverse transforms of _to_channels, summed back to (B, N, N)."""
    a, b, c, d = stacked.chunk(4)
    unturn = lambda x: torch.rot90(x, -1, (-2, -1))  # noqa: E731
    return a + unturn(b) + torch.flip(c, (-1,)) + torch.flip(unturn(d), (-1,))


class ParallelBeamProjector:
    """Parallel-beam projection of (B, N, N) images onto ``views`` views of N bins one pixel wide.

    Sinograms are in pixel units (sums of pixel values along rays); multiply by the pixel size for
    line integrals.
    """

    def __init__(self, size: int, views: int, device: torch.device,
                 memory_budget_mb: int = SimulationSettings.memory_budget_mb):
        if views % 4:
            raise ValueError(f"views must be a multiple of 4, got {views}")
        self.size, self.views, self.device = size, views, torch.device(device)
        self.memory_budget = memory_budget_mb * 2**20
        angles = view_angles(views)[: views // 4]
        self.cos = torch.cos(angles).to(self.device, torch.float32)
        self.sin = torch.sin(angles).to(self.device, torch.float32)
        self.u = detector_coordinates(size, self.device)

    def _chunks(self, channels: int):
        per_view = channels * self.size * self.size * 4
        step = max(1, self.memory_budget // per_view)
        for first in range(0, self.views // 4, step):
            k = torch.arange(first, min(first + step, self.views // 4), device=self.device)
            yield k, self.cos[k, None, None], self.sin[k, None, None]

    def project(self, image: torch.Tensor) -> torch.Tensor:
        """(B, N, N) → (B, views, N)."""
        channels = _to_channels(image).unsqueeze(0)
        x, y = self.u[None, None, :], self.u[None, :, None]
        sino = torch.empty(image.shape[0], self.views, self.size, device=self.device, dtype=image.dtype)
        for k, c, s in self._chunks(channels.shape[1]):
            grid = torch.stack((c * x - s * y, s * x + c * y), dim=-1)
            rays = F.grid_sample(channels.expand(len(k), -1, -1, -1), grid, align_corners=False).sum(2)
            for part, view in zip(rays.chunk(4, dim=1), _symmetric_views(k, self.views)):
                sino[:, view] = part.transpose(0, 1)
        return sino

    def backproject(self, sino: torch.Tensor) -> torch.Tensor:
        """(B, views, N) → (B, N, N): Σ over views of each view's value at x·cosθ + y·sinθ."""
        batch = sino.shape[0]
        total = torch.zeros(4 * batch, self.size, self.size, device=self.device, dtype=sino.dtype)
        x, y = self.u[None, None, :], self.u[None, :, None]
        for k, c, s in self._chunks(4 * batch):
            t = c * x + s * y
            grid = torch.stack((t, torch.zeros_like(t)), dim=-1)
            rows = torch.cat([sino[:, view] for view in _symmetric_views(k, self.views)]).transpose(0, 1)
            total += F.grid_sample(rows.unsqueeze(2), grid, align_corners=False).sum(0)
        return _from_channels(total)


def ramp_filter(length: int, kind: str, device) -> torch.Tensor:
    """Frequency response (rfft bins) of the band-limited ramp for a zero-padded length.

    Built from the spatial kernel of Kak & Slaney (h0 = 1/4, odd n: −1/(πn)²) rather than |f|
    sampled directly, which would misplace the DC term and offset the reconstruction.
    """
    n = torch.arange(length, device=device, dtype=torch.float64)
    n = torch.where(n > length // 2, n - length, n)
    odd = (n.abs() % 2) == 1
    kernel = torch.where(odd, -1.0 / (math.pi * torch.where(odd, n, 1.0)) ** 2, torch.zeros_like(n))
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel).real
    frequency = torch.fft.rfftfreq(length, device=device, dtype=torch.float64)  # cycles per bin, up to 0.5
    if kind == "shepp-logan":
        response = response * torch.sinc(frequency)
    elif kind == "hann":
        response = response * 0.5 * (1.0 + torch.cos(2.0 * math.pi * frequency))
    return response.to(torch.float32)


def filter_sinogram(sino: torch.Tensor, kind: str) -> torch.Tensor:
    """Convolve each view with the ramp filter (in bins), zero-padded against wrap-around."""
    bins = sino.shape[-1]
    length = 1 << (2 * bins - 1).bit_length()
    response = ramp_filter(length, kind, sino.device)
    spectrum = torch.fft.rfft(sino, n=length, dim=-1) * response
    return torch.fft.irfft(spectrum, n=length, dim=-1)[..., :bins]


def fbp(projector: ParallelBeamProjector, sino: torch.Tensor, kind: str, pixel_mm: float) -> torch.Tensor:
    """Filtered back-projection of line integrals (dimensionless) into attenuation per mm."""
    filtered = filter_sinogram(sino, kind) / pixel_mm
    return projector.backproject(filtered) * (math.pi / projector.views)


# ---------------------------------------------------------------- noise insertion


def hu_to_mu(hu: torch.Tensor, mu_water: float, outside: torch.Tensor) -> torch.Tensor:
    """Linear attenuation per mm; outside the field of view (and anything below air) is 0."""
    mu = mu_water * (1.0 + hu / HU_PER_WATER)
    return torch.where(outside, torch.zeros_like(mu), mu.clamp(min=0.0))


def outside_field_of_view(hu: torch.Tensor, fill_below_hu: float) -> torch.Tensor:
    """Vendor fill, and everything outside the circle a scanner reconstructs (the inscribed one)."""
    size = hu.shape[-1]
    u = detector_coordinates(size, hu.device)
    circle = (u[None, :] ** 2 + u[:, None] ** 2) > 1.0
    return (hu < fill_below_hu) | circle


def _upsample_sinogram(coarse: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, V, M) at views/factor and bins/factor → (B, V·factor, M·factor), linear in angle and bin.

    One view is wrapped around at each end (the view at θ+π is the view at θ mirrored) so that
    the first and last fine views interpolate instead of clamping.
    """
    if factor == 1:
        return coarse
    padded = torch.cat([coarse[:, -1:].flip(-1), coarse, coarse[:, :1].flip(-1)], dim=1)
    views, bins = padded.shape[1] * factor, coarse.shape[2] * factor
    fine = F.interpolate(padded.unsqueeze(1), size=(views, bins), mode="bilinear", align_corners=False)[:, 0]
    return fine[:, factor: factor + coarse.shape[1] * factor]


def _pad_to_square(hu: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    height, width = hu.shape[-2:]
    size = max(height, width)
    size += -size % multiple
    top, left = (size - height) // 2, (size - width) // 2
    fill = torch.full((hu.shape[0], size, size), -HU_PER_WATER, device=hu.device, dtype=hu.dtype)
    fill[:, top: top + height, left: left + width] = hu
    return fill, (top, left)


def full_dose_counts(hu: torch.Tensor, pixel_mm: float, settings: SimulationSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected photons per ray of square slices (B, N, N) at full dose, floored, and the mask of
    pixels outside the field of view."""
    outside = outside_field_of_view(hu, settings.outside_fov_below_hu)
    mu = hu_to_mu(hu, settings.mu_water_per_mm, outside)
    factor = settings.attenuation_downsample
    coarse_mu = F.avg_pool2d(mu.unsqueeze(1), factor)[:, 0] if factor > 1 else mu
    coarse = ParallelBeamProjector(coarse_mu.shape[-1], settings.views // factor, hu.device, settings.memory_budget_mb)
    line_integrals = _upsample_sinogram(coarse.project(coarse_mu) * (pixel_mm * factor), factor)
    counts = settings.incident_flux * torch.exp(-line_integrals)
    return counts.clamp(min=settings.count_floor), outside


def unit_noise_hu(counts: torch.Tensor, outside: torch.Tensor, pixel_mm: float, settings: SimulationSettings,
                  generator: torch.Generator | None, projector: ParallelBeamProjector) -> tuple[torch.Tensor, torch.Tensor]:
    """One quantum (z/√λ) and one electronic (σe·z/λ) realisation, reconstructed with the bare ramp, in HU."""
    def reconstruct(sino: torch.Tensor) -> torch.Tensor:
        noise = fbp(projector, sino, "ramp", pixel_mm) * (HU_PER_WATER / settings.mu_water_per_mm)
        return torch.where(outside, torch.zeros_like(noise), noise)

    draw = lambda: torch.randn(counts.shape, generator=generator, device=counts.device)  # noqa: E731
    quantum = reconstruct(draw() / counts.sqrt())
    electronic = reconstruct(draw() * settings.electronic_noise / counts)
    return quantum, electronic


def dose_weights(dose: float) -> tuple[float, float]:
    """Scales of the quantum and electronic unit realisations whose sum is the noise that dose
    fraction ``dose`` adds to its full-dose scan (zero at dose 1)."""
    return math.sqrt((1.0 - dose) / dose), math.sqrt(1.0 - dose * dose) / dose


def kernel_window(height: int, width: int, kernel: Kernel, device) -> torch.Tensor:
    """The kernel's radial window on the rfft2 grid of a (height, width) image."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    f = torch.sqrt(fy * fy + fx * fx)
    window = kernel.alpha + (1.0 - kernel.alpha) * torch.cos(math.pi * f / kernel.cutoff)
    return torch.where(f < kernel.cutoff, window, torch.zeros_like(window))


def apply_kernel(noise: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Ramp-reconstructed noise (..., H, W) with the texture of ``kernel``."""
    height, width = noise.shape[-2:]
    spectrum = torch.fft.rfft2(noise) * kernel_window(height, width, kernel, noise.device)
    return torch.fft.irfft2(spectrum, s=(height, width))


def simulated_noise_hu(hu: torch.Tensor, pixel_mm: float, dose: float, settings: SimulationSettings,
                       generator: torch.Generator | None, projector: ParallelBeamProjector) -> torch.Tensor:
    """The noise, in HU, that dose fraction ``dose`` adds to square full-dose slices (B, N, N)."""
    counts, outside = full_dose_counts(hu, pixel_mm, settings)
    quantum, electronic = unit_noise_hu(counts, outside, pixel_mm, settings, generator, projector)
    w_quantum, w_electronic = dose_weights(dose)
    noise = apply_kernel(w_quantum * quantum + w_electronic * electronic, KERNELS[settings.kernel])
    return torch.where(outside, torch.zeros_like(noise), noise)


def simulate_low_dose(hu, pixel_spacing_mm: float, dose: float, settings: SimulationSettings | None = None,
                      generator: torch.Generator | None = None):
    """Low-dose version of normal-dose slices: (H, W) or (S, H, W) HU, numpy or torch, same back.

    numpy input runs on ``settings.device``; torch input on its own device (pass a generator on
    that device for reproducible noise). Pixels outside the field of view come back unchanged.
    """
    settings = settings or SimulationSettings()
    validate_settings(settings)
    validate_dose(dose)
    as_numpy = not isinstance(hu, torch.Tensor)
    device = resolve_device(settings.device) if as_numpy else hu.device
    volume = torch.as_tensor(np.asarray(hu, dtype=np.float32) if as_numpy else hu, device=device).float()
    single = volume.ndim == 2
    if single:
        volume = volume.unsqueeze(0)
    if volume.ndim != 3:
        raise ValueError(f"simulate_low_dose takes (H, W) or (S, H, W) slices, got shape {tuple(volume.shape)}")
    height, width = volume.shape[-2:]
    square, (top, left) = _pad_to_square(volume, settings.attenuation_downsample)
    projector = ParallelBeamProjector(square.shape[-1], settings.views, device, settings.memory_budget_mb)
    out = torch.empty_like(volume)
    for first in range(0, volume.shape[0], settings.slices_per_batch):
        batch = square[first: first + settings.slices_per_batch]
        noise = simulated_noise_hu(batch, pixel_spacing_mm, dose, settings, generator, projector)
        out[first: first + len(batch)] = (batch + noise)[:, top: top + height, left: left + width]
    if single:
        out = out[0]
    return out.cpu().numpy() if as_numpy else out


# ---------------------------------------------------------------- DICOM series in, DICOM series out

log = get_logger(__name__)
SERIES_DESCRIPTION_MAX = 64  # the LO value representation
# DerivationCodeSequence of a simulated slice. Hand-typed in a local ("99") coding scheme because
# neither DICOM (CID 7203 Image Derivation) nor pydicom's code dictionary has a code for simulated
# dose reduction or noise insertion; DerivationDescription says the rest.
SIMULATION_CODE = Code("SIMLOWDOSE", "99LDCTNODE", "Simulated low-dose noise insertion")
# Slices read, simulated and written at a time: the simulation is slice by slice, so total-body
# series of thousands of slices need not fit in memory at once.
READ_CHUNK_SLICES = 64


def simulated_uid(kind: str, source_uid: str, dose: float, seed: int, settings: SimulationSettings) -> str:
    """A UID that depends on its source, the dose, the seed and the settings: a re-run with the same
    inputs writes the same UIDs (a replacement), a different dose or seed a different series."""
    return name_uid(SIMULATE_NAMESPACE, (kind, source_uid, repr(dose), str(seed), repr(dataclasses.astuple(settings))), UUID_ROOT)


def simulated_description(source: str | None, dose: float) -> str:
    """The source description with the dose appended, cut from the source side to fit 64 characters."""
    suffix = f" simulated {dose * 100:g} % dose"
    return (source or "")[: SERIES_DESCRIPTION_MAX - len(suffix)].rstrip() + suffix


def series_seed(seed: int, series_uid: str) -> int:
    """Per-series noise seed, so a series' noise does not depend on which other series share the tree."""
    digest = hashlib.sha256(f"{seed}:{series_uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pixel_spacing_mm(ds: pydicom.Dataset) -> float:
    """The in-plane pixel size; the parallel-beam projector needs square pixels."""
    try:
        rows, columns = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        raise CommandError(f"series {ds.SeriesInstanceUID} has no usable PixelSpacing: the simulation needs the pixel size in mm") from None
    if not math.isclose(rows, columns, rel_tol=1e-3):
        raise CommandError(f"series {ds.SeriesInstanceUID} has non-square pixels ({rows} x {columns} mm): resample it to square pixels first")
    return rows


def derivation_text(dose: float, seed: int, settings: SimulationSettings) -> str:
    """DerivationDescription of a simulated slice: what made its pixels, with everything needed to
    make them again."""
    return (f"Simulated {dose * 100:g} % dose by ldct-node {__version__}: projection-domain noise insertion "
            f"(incident flux {settings.incident_flux:g}, electronic noise {settings.electronic_noise:g}, "
            f"{settings.views} views, kernel {settings.kernel}, seed {seed})")


def simulated_dataset(source: pydicom.Dataset, hu: np.ndarray, series_uid: str, sop_uid: str, dose: float,
                      seed: int = 0, settings: SimulationSettings | None = None) -> pydicom.Dataset:
    """The simulated instance of source: the rules of every rewrite of a slice's pixels
    (ldct_node.dicom.derive.rewritten_instance: what the new pixels make false dropped, new file meta in
    Explicit VR Little Endian, lossy history, derivation and source image), the simulated pixels,
    new UIDs and a description naming the dose."""
    settings = settings or SimulationSettings()
    slope, intercept = rescale(source)
    stored = stored_values(source)
    new = hu_to_stored(hu, slope, intercept, int(source.BitsStored), int(source.PixelRepresentation), stored.dtype)
    ds = rewritten_instance(
        source, new, series_uid=series_uid, sop_uid=sop_uid, transfer_syntax=ExplicitVRLittleEndian,
        derivation_description=derivation_text(dose, seed, settings), derivation_code=SIMULATION_CODE,
    )
    ds.SeriesDescription = simulated_description(source.get("SeriesDescription"), dose)
    return ds


def simulate_stack(datasets: list[pydicom.Dataset], dose: float, settings: SimulationSettings,
                   generator: torch.Generator) -> list[np.ndarray]:
    """Simulated HU of one stack of slices (same matrix size), padding pixels unchanged."""
    stored = [stored_values(ds) for ds in datasets]
    hu = np.stack([stored_to_hu(s, *rescale(ds)) for s, ds in zip(stored, datasets)]).astype(np.float32)
    keep = np.stack([padding_mask(s, h, *padding_values(ds), settings.outside_fov_below_hu)
                     for s, h, ds in zip(stored, hu, datasets)])
    # Padding is air to the projector; it is put back unchanged below.
    projected = np.where(keep, settings.outside_fov_below_hu - 1.0, hu)
    low = simulate_low_dose(projected, pixel_spacing_mm(datasets[0]), dose, settings, generator)
    return [restore_masked(h.astype(np.float64), lo.astype(np.float64), k) for h, lo, k in zip(hu, low, keep)]


def simulate_series(series_uid: str, instances: list[Instance], nd_dir: Path, ld_dir: Path, dose: float,
                    seed: int, settings: SimulationSettings) -> list[Path]:
    """Write the simulated series beside the layout of nd_dir; returns the written paths."""
    device = resolve_device(settings.device)
    generator = torch.Generator(device=device).manual_seed(series_seed(seed, series_uid))
    new_series_uid = simulated_uid("series", series_uid, dose, seed, settings)
    written = []
    for stack in stacks(instances):
        for first in range(0, len(stack), READ_CHUNK_SLICES):
            chunk = stack[first: first + READ_CHUNK_SLICES]
            datasets = [pydicom.dcmread(instance.path) for instance in chunk]
            for instance, source, hu in zip(chunk, datasets, simulate_stack(datasets, dose, settings, generator)):
                sop_uid = simulated_uid("instance", instance.sop_uid, dose, seed, settings)
                target = ld_dir / instance.path.relative_to(nd_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_dataset(simulated_dataset(source, hu, new_series_uid, sop_uid, dose, seed, settings), target)
                written.append(target)
    return written


def series_folder(paths: list[Path]) -> Path:
    """The deepest folder holding all of a series' files."""
    return Path(os.path.commonpath([p.parent for p in paths]))


def pair_block(patient: str, low: Path, normal: Path, base: Path) -> str:
    """One [[pair]] table, paths relative to the pairs file's folder (JSON strings are TOML strings)."""
    rel = lambda p: Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()  # noqa: E731
    return f"\n[[pair]]\npatient = {json.dumps(patient)}\nlow = {json.dumps(rel(low))}\nnormal = {json.dumps(rel(normal))}\n"


def extend_pairs_file(path: Path, patient: str, folders: list[tuple[Path, Path]]) -> int:
    """Append a pair per (low, normal) folder not yet named in the file; returns how many were added."""
    known = set()
    if path.exists():
        known = {(p.patient, p.low.resolve(), p.normal.resolve()) for p in load_pairs(path, require_existing=False)}
    blocks = [pair_block(patient, low, normal, path.parent) for low, normal in folders
              if (patient, low.resolve(), normal.resolve()) not in known]
    if blocks:
        old = path.read_text() if path.exists() else ""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(old + "".join(blocks))
        tmp.replace(path)
    return len(blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SimulationSettings()
    parser.add_argument("nd_dir", type=Path, metavar="ND_DIR", help="folder tree of normal-dose CT series (DICOM)")
    parser.add_argument("ld_dir", type=Path, metavar="LD_DIR", help="receives the simulated series, same file layout and names")
    parser.add_argument("--dose", type=float, required=True, help="dose fraction of the normal-dose scan in (0, 1], e.g. 0.25 for a quarter dose")
    parser.add_argument("--flux", type=float, default=defaults.incident_flux,
                        help="incident photons per detector bin and view at full dose (default %(default)g)")
    parser.add_argument("--electronic-noise", type=float, default=defaults.electronic_noise,
                        help="electronic noise SD in photon counts (default %(default)g)")
    parser.add_argument("--views", type=int, default=defaults.views, help="projection views over 180 degrees (default %(default)d)")
    parser.add_argument("--kernel", choices=tuple(KERNELS), default=defaults.kernel,
                        help="reconstruction kernel of the inserted noise, sharp (ramp) to smooth (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same output (default 0)")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--pairs", type=Path, help="pairs TOML file to create or extend with the new pairs")
    parser.add_argument("--patient", help="patient name for the pairs file (required with --pairs)")


def settings_from_args(args: argparse.Namespace) -> SimulationSettings:
    settings = dataclasses.replace(SimulationSettings(), incident_flux=args.flux, electronic_noise=args.electronic_noise,
                                   views=args.views, kernel=args.kernel, device=args.device)
    validate_settings(settings)
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    validate_dose(args.dose)
    nd_dir, ld_dir = args.nd_dir, args.ld_dir
    if not nd_dir.is_dir():
        raise CommandError(f"normal-dose folder {nd_dir} does not exist or is not a folder")
    if ld_dir.resolve().is_relative_to(nd_dir.resolve()):
        raise CommandError(f"output folder {ld_dir} lies inside the normal-dose folder {nd_dir}: choose a folder outside it")
    if args.pairs is not None and not args.patient:
        raise CommandError("--pairs needs --patient NAME: the patient is the unit the splits keep together")
    scan = scan_tree(nd_dir)
    if not scan.series:
        raise CommandError(f"no axial CT series found under {nd_dir} ({len(scan.skipped)} files skipped): point ND_DIR at normal-dose CT DICOM files")
    folders = {uid: series_folder([i.path for i in instances]) for uid, instances in sorted(scan.series.items())}
    if args.pairs is not None and len(set(folders.values())) < len(folders):
        raise CommandError(f"several series share a folder under {nd_dir}: a pairs file needs one series per folder, so move them apart or leave out --pairs")

    started = time.monotonic()
    slices = 0
    for uid, instances in sorted(scan.series.items()):
        series_started = time.monotonic()
        try:
            written = simulate_series(uid, instances, nd_dir, ld_dir, args.dose, args.seed, settings)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CommandError(f"disk full while writing to {ld_dir}: free space and run again (a re-run writes the same files)") from None
            raise
        slices += len(written)
        log.info("simulated series", series_uid=uid, slices=len(written), dose=args.dose,
                 seconds_per_slice=round((time.monotonic() - series_started) / len(written), 3))
    elapsed = time.monotonic() - started
    print(f"simulated {len(scan.series)} series ({slices} slices) at {args.dose * 100:g} % dose into {ld_dir} "
          f"in {elapsed:.1f} s ({elapsed / slices:.2f} s per slice); {len(scan.skipped)} other files skipped")
    if args.pairs is not None:
        pairs = [(ld_dir / folder.relative_to(nd_dir), folder) for folder in folders.values()]
        added = extend_pairs_file(args.pairs, args.patient, pairs)
        print(f"{args.pairs}: {added} pair(s) added")
    return 0
