"""The training losses of TSC-Net, each term a function of its own.

Student (stage 2): ``L = w_pixel·smoothL1(rec, nd) + w_kt·L1(F_S, F_T) + w_msssim·(1 − MS-SSIM(rec, nd))
+ w_contrast·L_C``, with ``L_C = Σ_i β_i ‖E_i(nd) − E_i(rec)‖² / ‖E_i(ld) − E_i(rec)‖²`` over VGG-16
conv1_2, conv2_2 and conv3_3, each squared norm divided by C·H·W; the paper's weights are the defaults
(w_pixel = w_kt = 1, w_msssim = 0.1, w_contrast = 0.001, β = 1/4, 1/2, 1). Teacher (stage 1) and RED-CNN use
the smooth-L1 and MS-SSIM terms only. All images are in network units ([0, 1], see InputScaling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from .vgg import VGG16Features

# pytorch_msssim's five-scale weights (Wang et al. 2003).
MSSSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_WINDOW = 11
DATA_RANGE = 1.0  # network units


@dataclass(frozen=True)
class LossWeights:
    pixel: float = 1.0  # smooth L1 to the normal-dose image
    smooth_l1_beta: float = 1.0  # torch's default; the paper gives none
    msssim: float = 0.1
    kt: float = 1.0  # knowledge transfer: L1 between student and teacher DEM features
    contrast: float = 0.001
    betas: tuple[float, float, float] = (0.25, 0.5, 1.0)  # conv1_2, conv2_2, conv3_3
    # The contrastive ratio's denominator is floored at this fraction of the LD-ND feature distance
    # (see contrastive_loss); eps only guards the degenerate case LD == ND.
    contrast_floor: float = 0.1
    contrast_eps: float = 1e-7
    # Noise weighting (0: off): each sample's pixel loss is divided by the noise power its input
    # carries, floored at this value (network units squared; see noise_weights).
    noise_floor: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def msssim_geometry(min_side: int) -> tuple[int, int]:
    """(scales, window) for MS-SSIM on images whose smaller side is min_side.

    pytorch_msssim always downsamples 4 times and so needs min_side > (window − 1)·16: 161 px with
    the standard 11-px window. Full slices qualify; training patches usually do not, and shrinking
    the window to fit would leave a 3-px window at 64 px, so smaller images fall back to
    single-scale SSIM (window 11, or the largest odd window that fits a tinier image).
    """
    scales = len(MSSSIM_SCALE_WEIGHTS)
    if min_side > (MSSSIM_WINDOW - 1) * 2 ** (scales - 1):
        return scales, MSSSIM_WINDOW
    return 1, max(3, min(MSSSIM_WINDOW, min_side if min_side % 2 else min_side - 1))


def msssim_loss(rec: torch.Tensor, nd: torch.Tensor) -> torch.Tensor:
    """1 − MS-SSIM, or 1 − SSIM when the images are too small for five scales."""
    scales, window = msssim_geometry(min(rec.shape[-2:]))
    rec, nd = rec.float(), nd.float()
    if scales == 1:
        return 1.0 - ssim(rec, nd, data_range=DATA_RANGE, win_size=window)
    return 1.0 - ms_ssim(rec, nd, data_range=DATA_RANGE, win_size=window, weights=list(MSSSIM_SCALE_WEIGHTS))


def pixel_loss(rec: torch.Tensor, nd: torch.Tensor, beta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth L1, each sample's mean scaled by its weight when weights (N,) are given."""
    per_sample = F.smooth_l1_loss(rec.float(), nd.float(), beta=beta, reduction="none").flatten(1).mean(dim=1)
    return (per_sample if weights is None else per_sample * weights).mean()


def _mean_square(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² / (C·H·W), per sample."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def noise_weights(ld: torch.Tensor, nd: torch.Tensor, floor: float) -> torch.Tensor:
    """Per-sample weights ∝ 1 / (mean (ld − nd)² + floor), scaled to mean 1 over the batch.

    Unweighted, a 5 %-dose patch's squared error is ~100× that of a 50 %-dose one, so the network
    spends its capacity on heavy noise and learns to smooth a scan that is nearly clean. Divided
    by the noise each input carries, every dose counts by its relative improvement, as the PSNR
    the report measures does; the floor (about a normal-dose scan's own noise power) gives the
    clean samples, which carry none, the weight of a normal-dose scan.
    """
    weights = 1.0 / (_mean_square(ld, nd) + floor)
    return weights / weights.mean()


def knowledge_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """L1 between the student's DEM output and the frozen teacher's (no gradient into the teacher)."""
    return F.l1_loss(student_features.float(), teacher_features.detach().float())


def contrastive_loss(vgg: VGG16Features, rec: torch.Tensor, nd: torch.Tensor, ld: torch.Tensor,
                     betas: tuple[float, ...], floor: float, eps: float) -> torch.Tensor:
    """Contrastive regularisation: pull rec towards nd (positive) and away from ld (negative) in
    VGG feature space. rec, nd, ld are (N, 1, H, W); averaged over the batch.

    The paper's ratio ‖E(nd) − E(rec)‖² / ‖E(ld) − E(rec)‖² is unbounded at rec = ld, which is exactly
    where a student that starts as the identity begins: there it measured ~1e6 and wrecked training
    (25.9 dB validation PSNR against 39.2 dB without the term, same budget). The denominator is
    therefore floored at ``floor`` × ‖E(ld) − E(nd)‖², which bounds the ratio by 1/floor at rec = ld
    and leaves it falling to 0 as rec reaches nd.
    """
    rec, nd, ld = rec.float(), nd.float(), ld.float()  # the frozen VGG is float32, rec may come from autocast
    with torch.no_grad():
        positive, negative = vgg(nd), vgg(ld)
    anchor = vgg(rec)
    total = torch.zeros(rec.shape[0], device=rec.device)
    for beta, a, p, n in zip(betas, anchor, positive, negative, strict=True):
        gap = _mean_square(n, p)  # no gradient: both come from the frozen VGG without rec
        total = total + beta * _mean_square(p, a) / (_mean_square(n, a) + floor * gap + eps)
    return total.mean()


@dataclass
class LossInputs:
    """What one step has: the reconstruction, its targets, and optional KT / contrastive inputs."""

    rec: torch.Tensor  # (N, 1, H, W)
    nd: torch.Tensor  # (N, 1, H, W) normal-dose middle slice
    ld: torch.Tensor | None = None  # (N, 1, H, W) low-dose middle slice, for the contrastive term
    student_features: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None


def total_loss(weights: LossWeights, inputs: LossInputs, vgg: VGG16Features | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the terms whose inputs are present, and each term's value for logging.

    Which terms are present is the ablation: KT needs teacher features, L_C needs vgg and ld.
    The pixel term is noise-weighted when ``weights.noise_floor`` is set (it then needs ld).
    """
    sample_weights = None
    if weights.noise_floor > 0:
        if inputs.ld is None:
            raise ValueError("noise-weighted pixel loss needs the low-dose input")
        sample_weights = noise_weights(inputs.ld, inputs.nd, weights.noise_floor)
    terms = {
        "pixel": (weights.pixel, lambda: pixel_loss(inputs.rec, inputs.nd, weights.smooth_l1_beta, sample_weights)),
        "msssim": (weights.msssim, lambda: msssim_loss(inputs.rec, inputs.nd)),
    }
    if inputs.student_features is not None and inputs.teacher_features is not None:
        terms["kt"] = (weights.kt, lambda: knowledge_transfer_loss(inputs.student_features, inputs.teacher_features))
    if vgg is not None and inputs.ld is not None:
        terms["contrast"] = (weights.contrast, lambda: contrastive_loss(vgg, inputs.rec, inputs.nd, inputs.ld, weights.betas, weights.contrast_floor, weights.contrast_eps))
    total = torch.zeros((), device=inputs.rec.device)
    parts = {}
    for name, (weight, term) in terms.items():
        if weight == 0:
            continue
        value = term()
        parts[name] = float(value.detach())
        total = total + weight * value
    parts["total"] = float(total.detach())
    return total, parts
