"""TSC-Net (Fu et al., total-body low-dose CT denoising with prior knowledge transfer).

Encoder: 3×3 convolutions with two stride-2 steps (the slice is downsampled 4×), then a
chain of Dynamic Enhancement Modules (DEM) at the bottleneck; decoder: transposed
convolutions back to full size with skip connections from the encoder and a global residual,
so the network predicts the correction to the (middle) input slice.

Teacher and student are the same class; the trainer asks for the DEM outputs with
``return_features=True`` for the knowledge-transfer loss. The paper leaves widths open: they are
fields of :class:`TSCNetConfig`, stored in each weights file's model card.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

KERNEL = 3
DOWNSAMPLE = 4  # two stride-2 steps; inputs are padded to a multiple of this
# Cell side (bottleneck pixels) on which local channel attention pools its statistics.
LOCAL_MEAN_CELL = 4


@dataclass(frozen=True)
class TSCNetConfig:
    in_slices: int = 1  # 3 feeds both neighbouring slices as extra channels
    width: int = 32  # channels at full resolution; doubled at each downsampling step
    num_dems: int = 4
    # Ablation switch (paper variant A): plain residual blocks instead of DEMs.
    use_dem: bool = True
    se_reduction: int = 4
    feature_index: int = 1  # which DEM's output feeds knowledge transfer (the second)
    # Gaussian σ in pixels of the low-pass removed from the predicted correction (0: off). Noise
    # reconstructed by filtered back-projection has almost no power at these scales (the ramp), so
    # a correction's low-frequency part is a shift or shading, never noise removal: taking it out
    # keeps mean HU and large-scale contrast exactly as scanned on any vendor's images.
    correction_highpass_sigma_px: float = 0.0
    # Channel attention pools over this many bottleneck pixels around each pixel (odd; 0: the whole
    # image, squeeze-excitation's global pool). A global pool sees 24² bottleneck pixels on a 96²
    # training patch but 128² on a 512² slice, so its statistics differ between training and use and
    # every output pixel depends on the whole field of view; a local window equal to the training
    # patch keeps them alike and lets overlapping tiles agree with the full slice.
    attention_window: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TSCNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TSC-Net architecture fields: {', '.join(sorted(unknown))}")
        return cls(**data)


class ModulatedDeformConv(nn.Module):
    """DCNv2: a 3×3 convolution sampling at learned offsets, each tap scaled by a learned mask.

    Offsets and mask logits come from a 3×3 convolution of the same features, zero-initialised
    so training starts from an ordinary convolution (with mask sigmoid(0) = 0.5).
    """

    def __init__(self, channels: int):
        super().__init__()
        taps = KERNEL * KERNEL
        self.weight = nn.Parameter(torch.empty(channels, channels, KERNEL, KERNEL))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=1.0)
        self.offset_mask = nn.Conv2d(channels, 3 * taps, KERNEL, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = KERNEL * KERNEL
        om = self.offset_mask(x)
        offset, mask = om[:, : 2 * taps], torch.sigmoid(om[:, 2 * taps :])
        return modulated_deform_conv(x, offset, mask, self.weight, self.bias)


# Bytes of gathered taps per band in the CPU deformable convolution. On a 2-core CPU (32 MiB L3) one
# call on 64 channels of 128 x 128 went from 526 to about 240 ms at batch 8 (81 to about 40 ms at
# batch 1), the shipped student from 0.34 to 0.22 s per 512² slice; the results are the same.
GATHER_BAND_BYTES = 8 << 20


def modulated_deform_conv(x, offset, mask, weight, bias):
    """3×3, stride 1, padding 1 modulated deformable convolution (torchvision's layout:
    offset channels 2k, 2k+1 are the row and column shifts of tap k, row-major over the kernel).

    On CUDA torchvision's fused kernel runs, in float32 because it has no half-precision path on
    every device. On CPU that kernel is about 2.6× slower than gathering all nine taps with one
    bilinear grid_sample and contracting them with a matmul, which computes the same thing.
    """
    if x.is_cuda:
        dtype = x.dtype
        with torch.autocast(device_type="cuda", enabled=False):
            out = deform_conv2d(x.float(), offset.float(), weight.float(), bias.float(), padding=1, mask=mask.float())
        return out.to(dtype)
    return _deform_conv_gather(x, offset, mask, weight, bias)


def _deform_conv_gather(x, offset, mask, weight, bias):
    n, c, h, w = x.shape
    taps = KERNEL * KERNEL
    # The nine gathered taps of a whole map (c x 9 x h x w per slice) are far larger than the CPU's
    # cache; a band of rows at a time stays in it from grid_sample through the mask to the product.
    band = max(1, GATHER_BAND_BYTES // (n * c * taps * w * x.element_size()))
    tap = torch.arange(taps, device=x.device)
    shift = offset.view(n, taps, 2, h, w)
    masks = mask.view(n, 1, taps, h, w)
    weights = weight.reshape(1, weight.shape[0], c * taps).expand(n, -1, -1)
    out = x.new_empty(n, weight.shape[0], h, w)
    cols = (tap % KERNEL - 1).view(1, taps, 1, 1) + torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    all_rows = (tap // KERNEL - 1).view(1, taps, 1, 1) + torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    for top in range(0, h, band):
        bottom = min(h, top + band)
        rows = all_rows[:, :, top:bottom]
        # grid_sample wants (x, y) in [-1, 1]; align_corners=True maps -1 and 1 to pixel centres 0 and size-1.
        grid = torch.stack(
            [(cols + shift[:, :, 1, top:bottom]) * (2 / max(w - 1, 1)) - 1,
             (rows + shift[:, :, 0, top:bottom]) * (2 / max(h - 1, 1)) - 1],
            dim=-1,
        )
        sampled = F.grid_sample(x, grid.view(n, taps * (bottom - top), w, 2), mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        sampled = sampled.view(n, c, taps, bottom - top, w) * masks[:, :, :, top:bottom]
        # bmm, not matmul: matmul folds the batch into one mm through a full transposed copy of `sampled`.
        out[:, :, top:bottom] = torch.bmm(weights, sampled.reshape(n, c * taps, -1)).view(n, -1, bottom - top, w)
    return out + bias.view(1, -1, 1, 1)


class LocalMean(nn.Module):
    """Mean over about a window × window neighbourhood of each pixel (only pixels inside the image
    count). Features are first averaged over LOCAL_MEAN_CELL² cells, pooled over the window there
    and interpolated back: the statistics are smooth, and this costs a small fraction of a stride-1
    pool of the full map, whose cost grows with the window's area."""

    def __init__(self, window: int):
        super().__init__()
        self.cells = 2 * (max(1, round(window / LOCAL_MEAN_CELL)) // 2) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = F.avg_pool2d(x, LOCAL_MEAN_CELL, ceil_mode=True)
        mean = F.avg_pool2d(cells, self.cells, stride=1, padding=self.cells // 2, count_include_pad=False)
        return F.interpolate(mean, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: per-channel sigmoid weights from pooled features, pooled over the
    whole image (window 0) or over a window around each pixel."""

    def __init__(self, channels: int, reduction: int, window: int = 0):
        super().__init__()
        hidden = max(channels // reduction, 4)
        pool = nn.AdaptiveAvgPool2d(1) if window == 0 else LocalMean(window)
        self.fc = nn.Sequential(
            pool,
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class DynamicEnhancementModule(nn.Module):
    """DEM: conv → channel attention → modulated deformable conv, added back to the input."""

    def __init__(self, channels: int, reduction: int, attention_window: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, KERNEL, padding=1)
        self.attention = ChannelAttention(channels, reduction, attention_window)
        self.deform = ModulatedDeformConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attention(F.relu(self.conv(x)))
        return x + self.deform(y)


class ResidualBlock(nn.Module):
    """The ablation baseline's stand-in for a DEM: two plain 3×3 convolutions with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, KERNEL, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, KERNEL, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def blur_matrix(size: int, sigma: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(size, size) matrix B such that B @ v is v blurred along its length by a Gaussian truncated
    at 3 sigma, edges replicated (each tap that falls outside reads the nearest edge sample)."""
    radius = int(math.ceil(3.0 * sigma))
    taps = torch.arange(-radius, radius + 1, device=device)
    kernel = torch.exp(-0.5 * (taps.to(dtype) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    source = (torch.arange(size, device=device).view(-1, 1) + taps.view(1, -1)).clamp(0, size - 1)
    matrix = torch.zeros(size, size, dtype=dtype, device=device)
    return matrix.scatter_add_(1, source, kernel.expand(size, -1).contiguous())


def gaussian_lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W), edges replicated, as two products with banded
    matrices: on CPU about 4x faster than the equivalent 37-tap single-channel convolutions
    (5 instead of 20 ms per 512² slice on 2 cores)."""
    rows = blur_matrix(x.shape[-2], sigma, x.dtype, x.device)
    cols = blur_matrix(x.shape[-1], sigma, x.dtype, x.device)
    return rows @ x @ cols.T


def _conv_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, KERNEL, stride=stride, padding=1), nn.ReLU(inplace=True))


class TSCNet(nn.Module):
    def __init__(self, config: TSCNetConfig = TSCNetConfig()):
        super().__init__()
        if config.in_slices < 1 or config.in_slices % 2 == 0:
            raise ValueError("in_slices must be odd (the middle slice is the one denoised)")
        if not 0 <= config.feature_index < config.num_dems:
            raise ValueError("feature_index must name one of the DEMs")
        if config.attention_window < 0 or (config.attention_window and config.attention_window % 2 == 0):
            raise ValueError("attention_window must be 0 (global) or odd")
        self.config = config
        w = config.width
        self.enc0 = nn.Sequential(_conv_relu(config.in_slices, w), _conv_relu(w, w))
        self.enc1 = nn.Sequential(_conv_relu(w, 2 * w, stride=2), _conv_relu(2 * w, 2 * w))
        self.enc2 = nn.Sequential(_conv_relu(2 * w, 4 * w, stride=2), _conv_relu(4 * w, 4 * w))
        self.bottleneck = nn.ModuleList(
            DynamicEnhancementModule(4 * w, config.se_reduction, config.attention_window) if config.use_dem else ResidualBlock(4 * w)
            for _ in range(config.num_dems)
        )
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1)
        self.dec1 = _conv_relu(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.dec0 = _conv_relu(2 * w, w)
        self.head = nn.Conv2d(w, 1, KERNEL, padding=1)
        # Zero-initialised so an untrained network is the identity: training starts at the input's
        # quality instead of first having to undo a random correction.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (N, in_slices, H, W) scaled slices, H and W multiples of 4.

        Returns the denoised middle slice (N, 1, H, W), and with ``return_features`` also the
        list of DEM outputs.
        """
        if x.shape[-1] % DOWNSAMPLE or x.shape[-2] % DOWNSAMPLE:
            raise ValueError(f"height and width must be multiples of {DOWNSAMPLE}; pad first")
        mid = self.config.in_slices // 2
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        h = self.enc2(e1)
        features = []
        for block in self.bottleneck:
            h = block(h)
            features.append(h)
        d1 = self.dec1(torch.cat([self.up2(h), e1], dim=1))
        d0 = self.dec0(torch.cat([self.up1(d1), e0], dim=1))
        correction = self.head(d0)
        if self.config.correction_highpass_sigma_px > 0:
            correction = correction - gaussian_lowpass(correction, self.config.correction_highpass_sigma_px)
        out = x[:, mid : mid + 1] + correction
        return (out, features) if return_features else out


@dataclass(frozen=True)
class REDCNNConfig:
    """RED-CNN (Chen et al. 2017), the comparison baseline: 5 conv + 5 deconv, 5×5 kernels."""

    in_slices: int = 1
    width: int = 96

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "REDCNNConfig":
        return cls(**data)


class REDCNN(nn.Module):
    def __init__(self, config: REDCNNConfig = REDCNNConfig()):
        super().__init__()
        self.config = config
        w, k = config.width, 5
        self.convs = nn.ModuleList([nn.Conv2d(config.in_slices, w, k, padding=2)] + [nn.Conv2d(w, w, k, padding=2) for _ in range(4)])
        self.deconvs = nn.ModuleList([nn.ConvTranspose2d(w, w, k, padding=2) for _ in range(4)] + [nn.ConvTranspose2d(w, 1, k, padding=2)])

    def forward(self, x: torch.Tensor, return_features: bool = False):
        mid = self.config.in_slices // 2
        skips = [x[:, mid : mid + 1]]
        h = x
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            if i in (1, 3):
                skips.append(h)
        for i, deconv in enumerate(self.deconvs):
            h = deconv(h)
            if i in (0, 2):
                h = F.relu(h + skips.pop())
            elif i == 4:
                h = h + skips.pop()
            else:
                h = F.relu(h)
        return (h, []) if return_features else h


ARCHITECTURES = {"tscnet": (TSCNet, TSCNetConfig), "redcnn": (REDCNN, REDCNNConfig)}


def build_model(name: str, settings: dict) -> nn.Module:
    """A network from its architecture name and settings, as a model card states them."""
    try:
        cls, config_cls = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})") from None
    return cls(config_cls.from_dict(settings))
