"""The denoise stage: HU slices in, denoised HU slices out.

The model is loaded once and fed batches of slices. The network sees the input scaling its
model card states and predicts a correction; the correction is added to the *unclipped* HU, so
values outside the scaling range (metal above 3072 HU) keep their excess, and a network that
predicts no correction returns the input bit for bit. Pixels flagged ``keep`` (padding, outside
the field of view) come back exactly as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldct_node.config import ConfigError, InferenceSettings
from ldct_node.net.allocator import keep_freed_memory
from ldct_node.net.model import DOWNSAMPLE
from ldct_node.net.weights import LoadedModel, load_weights


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


# Positions closer than this are one slice written twice (DS values carry about a micrometre); the
# projection on the slice normal adds float noise far below it.
SAME_POSITION_MM = 1e-3


def fast_memory_format(device: torch.device) -> torch.memory_format:
    """The tensor layout the network runs fastest in on this device. On CPU oneDNN's convolutions
    run faster on channels-last tensors for this network's few channels (2-core idle CPU: inference
    about 1.4x, training steps about 1.15x); CUDA keeps the default layout until it is measured there."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def slice_spacing(positions: Sequence[float | None]) -> float | None:
    """The stack's spacing: the median of the positive steps between consecutive known positions
    (sorted); None when fewer than two distinct positions are known."""
    known = np.sort(np.array([p for p in positions if p is not None], dtype=np.float64))
    steps = np.diff(known)
    steps = steps[steps > SAME_POSITION_MM]
    return float(np.median(steps)) if steps.size else None


def _adjacent_slice(sorted_pos: np.ndarray, sorted_idx: np.ndarray, target: float, window: float) -> int | None:
    """The slice (input index) nearest to target within ±window; ties go to the lower index, so a
    chunk that holds the whole stack's choice chooses the same."""
    lo = np.searchsorted(sorted_pos, target - window, side="left")
    hi = np.searchsorted(sorted_pos, target + window, side="right")
    if lo >= hi:
        return None
    candidates = sorted_idx[lo:hi]
    distance = np.abs(sorted_pos[lo:hi] - target)
    return int(candidates[np.lexsort((candidates, distance))[0]])


def neighbour_indices(
    slices: int | Sequence[float | None],
    in_slices: int,
    tolerance: float = InferenceSettings.neighbour_tolerance,
    spacing: float | None = None,
) -> np.ndarray:
    """(num_slices, in_slices) input indices: each slice's neighbours along the slice normal, in channel order.

    slices: the slice positions in mm (ImagePositionPatient on the normal, None when unknown) in
    any order, or an int n for n slices known to be contiguous and in order (a training volume),
    which gives index ± k with the end slices repeated. Channel radius + k holds the slice at
    position + k·spacing when it lies within tolerance·spacing of it and channel radius + k − 1 was
    filled the same way; otherwise the slice of channel radius + k − 1 repeats (for k = 1, the middle
    slice itself), exactly as the end slices repeat at a volume's edges. Duplicated positions
    (distance 0), gaps and slices without a position thus never enter as neighbours. spacing: the
    whole stack's spacing when these slices are a chunk of it (default: slice_spacing(slices)).
    """
    if isinstance(slices, (int, np.integer)):
        return _contiguous_neighbours(int(slices), in_slices)
    positions = list(slices)
    count, radius = len(positions), in_slices // 2
    out = np.repeat(np.arange(count)[:, None], in_slices, axis=1)
    spacing = slice_spacing(positions) if spacing is None else spacing
    if radius == 0 or spacing is None:
        return out
    known = np.array([p is not None for p in positions], dtype=bool)
    pos = np.array([np.nan if p is None else p for p in positions], dtype=np.float64)
    order = np.argsort(pos[known], kind="stable")
    sorted_pos, sorted_idx = pos[known][order], np.flatnonzero(known)[order]
    for i in np.flatnonzero(known):
        for side in (-1, 1):
            current, adjacent = int(i), True
            for k in range(1, radius + 1):
                target = pos[i] + side * k * spacing
                found = _adjacent_slice(sorted_pos, sorted_idx, target, tolerance * spacing) if adjacent else None
                adjacent = found is not None
                current = found if adjacent else current
                out[i, radius + side * k] = current
    return out


def _contiguous_neighbours(count: int, in_slices: int) -> np.ndarray:
    """neighbour_indices for slices known to be contiguous and in order: index ± k, ends repeated."""
    radius = in_slices // 2
    idx = np.arange(count)[:, None] + np.arange(-radius, radius + 1)[None, :]
    return np.clip(idx, 0, count - 1)


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
        if self.device.type == "cpu":
            keep_freed_memory()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if self.device.type == "cuda":
            # Same input, same output: cuDNN's autotuner may pick non-deterministic kernels.
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.memory_format = fast_memory_format(self.device)
        self.model = loaded.model.to(self.device, memory_format=self.memory_format).eval()
        self.card = loaded.card
        self.scaling = loaded.card.input_scaling
        self.in_slices = loaded.card.in_slices
        self.batch_size = settings.batch_size
        self.chunk_slices = settings.chunk_slices
        self.outside_fov_below_hu = settings.outside_fov_below_hu
        self.neighbour_tolerance = settings.neighbour_tolerance
        self.mixed_precision = settings.mixed_precision and self.device.type == "cuda"

    @classmethod
    def from_path(cls, path: Path | None, settings: InferenceSettings = InferenceSettings()) -> "DenoiseEngine":
        """Load weights (None: the shipped student) straight onto the configured device."""
        return cls(load_weights(path, resolve_device(settings.device)), settings)

    def denoise_hu(
        self,
        hu: np.ndarray,
        keep: np.ndarray | None = None,
        positions: Sequence[float | None] | None = None,
        spacing: float | None = None,
    ) -> np.ndarray:
        """hu: (S, H, W) slices of one stack; keep: pixels to return unchanged.

        positions: each slice's position along the slice normal (mm, None when unknown); a
        neighbour enters only when it is adjacent (see neighbour_indices). None: the slices are
        known to be contiguous and in order (index ± k). spacing: the whole stack's spacing when
        hu is a chunk of it. Returns float64 HU of the same shape.
        """
        hu = np.asarray(hu, dtype=np.float64)
        if hu.ndim != 3:
            raise ValueError("denoise_hu expects a (slices, rows, columns) stack")
        if positions is not None and len(positions) != hu.shape[0]:
            raise ValueError(f"denoise_hu got {len(positions)} positions for {hu.shape[0]} slices")
        net_input = hu if keep is None else np.where(keep, self.scaling.hu_min, hu)
        unit = torch.from_numpy(self.scaling.to_unit(net_input).astype(np.float32))
        slices = hu.shape[0] if positions is None else positions
        neighbours = neighbour_indices(slices, self.in_slices, self.neighbour_tolerance, spacing)
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
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.mixed_precision):
            y = self.model(x)
        mid = self.in_slices // 2
        delta = (y.float() - x[:, mid : mid + 1].float())[:, 0, :h, :w]
        return delta.cpu().numpy()
