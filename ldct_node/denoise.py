"""The denoise stage: HU slices in, denoised HU slices out.

The model is loaded once and fed batches of slices. The network sees the input scaling its
model card states and predicts a correction; the correction is added to the *unclipped* HU, so
values outside the scaling range (metal above 3072 HU) keep their excess, and a network that
predicts no correction returns the input bit for bit. Pixels flagged ``keep`` (padding, outside
the field of view) come back exactly as they were.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, InferenceSettings
from .model import DOWNSAMPLE
from .weights import LoadedModel, load_weights


def resolve_device(name: str) -> torch.device:
    """'auto' takes the GPU when there is one; naming a device that is not there is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r} asked for but no such CUDA GPU is available: use auto or cpu")
    return device


def neighbour_indices(num_slices: int, in_slices: int) -> np.ndarray:
    """(num_slices, in_slices) slice indices centred on each slice, repeating the end slices at the volume's edges."""
    radius = in_slices // 2
    idx = np.arange(num_slices)[:, None] + np.arange(-radius, radius + 1)[None, :]
    return np.clip(idx, 0, num_slices - 1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad height and width up to a multiple; returns the padded tensor and the original size."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class DenoiseEngine:
    def __init__(self, loaded: LoadedModel, settings: InferenceSettings = InferenceSettings()):
        self.device = resolve_device(settings.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if self.device.type == "cuda":
            # Same input, same output: cuDNN's autotuner may pick non-deterministic kernels.
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.model = loaded.model.to(self.device).eval()
        self.card = loaded.card
        self.scaling = loaded.card.input_scaling
        self.in_slices = loaded.card.in_slices
        self.batch_size = settings.batch_size
        self.chunk_slices = settings.chunk_slices
        self.outside_fov_below_hu = settings.outside_fov_below_hu
        self.mixed_precision = settings.mixed_precision and self.device.type == "cuda"

    @classmethod
    def from_path(cls, path: Path | None, settings: InferenceSettings = InferenceSettings()) -> "DenoiseEngine":
        """Load weights (None: the shipped student) straight onto the configured device."""
        return cls(load_weights(path, resolve_device(settings.device)), settings)

    def denoise_hu(self, hu: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """hu: (S, H, W) slices of one stack in order; keep: pixels to return unchanged.

        Returns float64 HU of the same shape.
        """
        hu = np.asarray(hu, dtype=np.float64)
        if hu.ndim != 3:
            raise ValueError("denoise_hu expects a (slices, rows, columns) stack")
        net_input = hu if keep is None else np.where(keep, self.scaling.hu_min, hu)
        unit = torch.from_numpy(self.scaling.to_unit(net_input).astype(np.float32))
        neighbours = neighbour_indices(hu.shape[0], self.in_slices)
        correction = np.empty(hu.shape, dtype=np.float32)
        for start in range(0, hu.shape[0], self.batch_size):
            idx = neighbours[start : start + self.batch_size]
            correction[start : start + len(idx)] = self._correction(unit[torch.from_numpy(idx)])
        out = hu + correction.astype(np.float64) * self.scaling.span
        return out if keep is None else np.where(keep, hu, out)

    @torch.inference_mode()
    def _correction(self, batch: torch.Tensor) -> np.ndarray:
        """The network's change to the middle slice of each (in_slices, H, W) stack, in unit scale."""
        x, (h, w) = pad_to_multiple(batch.to(self.device), DOWNSAMPLE)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.mixed_precision):
            y = self.model(x)
        mid = self.in_slices // 2
        delta = (y.float() - x[:, mid : mid + 1].float())[:, 0, :h, :w]
        return delta.cpu().numpy()
