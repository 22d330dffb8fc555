"""Paired low-/normal-dose training data.

A TOML *pairs file* names the volumes (``[[pair]]`` tables, paths relative to the file's folder);
each volume is a DICOM series folder or a NIfTI/MHA file. Low- and normal-dose slices are matched
by position along the slice normal, never by file order, so a missing or extra slice is an error
rather than a silent one-slice shift. Splitting is by patient; a ``slices`` range holds out slabs
of a single patient explicitly, and a file whose unsplit pairs are all one patient (without
``slices``) has that patient cut into train / val / test slabs automatically (:func:`split_pairs`).

The datasets hand the network HU scaled by :class:`ldct_node.net.weights.InputScaling` — the one
scaling, recorded in every model card the trainer writes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from ldct_node.config import read_toml
from ldct_node.dicom.pixels import rescale, stored_to_hu, stored_values
from ldct_node.dicom.series import scan_tree, stacks
from ldct_node.errors import CommandError
from ldct_node.net.inference import neighbour_indices
from ldct_node.net.model import DOWNSAMPLE
from ldct_node.net.weights import InputScaling

SPLITS = ("train", "val", "test")
PAIR_KEYS = {"patient", "low", "normal", "split", "slices"}
REQUIRED_PAIR_KEYS = ("patient", "low", "normal")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd")
# Reconstructions of one scan agree on slice positions to well under this; slice gaps are ≥ 0.5 mm.
POSITION_TOLERANCE_MM = 0.1
# How many unmatched positions an error message spells out before it only counts.
SHOWN_POSITIONS = 5
# Matched slices left out between the automatic slabs of a single patient. A network fed in_slices =
# 2k+1 neighbours sees slices i-k ... i+k; for in_slices up to 5 (k <= 2) the windows of the last
# slice of one slab and the first of the next share no slice once 2k = 4 slices lie between them,
# and one more is margin for the correlation of adjacent (often overlapping) reconstructions.
SLAB_GAP_SLICES = 5
# Rotations by 90/180/270 degrees (k quarter turns) and a horizontal flip: the paper's augmentation.
QUARTER_TURNS = (0, 1, 2, 3)


@dataclass
class PairSpec:
    patient: str
    low: Path
    normal: Path
    split: str | None = None
    slices: tuple[int, int] | None = None


@dataclass
class Volume:
    hu: np.ndarray  # (S, H, W) float32, slices in ascending position
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    positions: np.ndarray  # (S,) mm along the slice normal


# ---------------------------------------------------------------- pairs file


def load_pairs(path: Path, require_existing: bool = True) -> list[PairSpec]:
    """The pairs a TOML pairs file names. ``require_existing=False`` lets a tool that is about to
    create the volumes (the simulator) read the file before they exist."""
    path = Path(path)
    table = read_toml(path, "pairs file", CommandError, not_found="check the --data path")
    unknown = set(table) - {"pair"}
    if unknown:
        raise CommandError(f"pairs file {path} has unknown top-level keys {', '.join(sorted(unknown))}: only [[pair]] tables are allowed")
    entries = table.get("pair")
    if not isinstance(entries, list) or not entries:
        raise CommandError(f"pairs file {path} names no pairs: add at least one [[pair]] table with patient, low and normal")
    pairs = [_parse_pair(entry, i, path) for i, entry in enumerate(entries)]
    if require_existing:
        for i, pair in enumerate(pairs):
            for key in ("low", "normal"):
                where = getattr(pair, key)
                if not where.exists():
                    raise CommandError(f"pairs file {path}: pair {i} ({pair.patient}) {key} = {where} does not exist: fix the path (relative to the pairs file)")
    return pairs


def _parse_pair(entry: object, index: int, path: Path) -> PairSpec:
    where = f"pairs file {path}: pair {index}"
    if not isinstance(entry, dict):
        raise CommandError(f"{where} is not a table: write it as [[pair]] with key = value lines")
    unknown = set(entry) - PAIR_KEYS
    if unknown:
        raise CommandError(f"{where} has unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(PAIR_KEYS))})")
    for key in REQUIRED_PAIR_KEYS:
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise CommandError(f"{where} needs {key} = \"...\" (a non-empty string)")
    split = entry.get("split")
    if split is not None and split not in SPLITS:
        raise CommandError(f"{where} has split = {split!r}: use one of {', '.join(SPLITS)} or leave it out")
    slices = entry.get("slices")
    if slices is not None:
        ok = (isinstance(slices, list) and len(slices) == 2 and all(type(s) is int for s in slices)
              and 0 <= slices[0] < slices[1])
        if not ok:
            raise CommandError(f"{where} has slices = {slices!r}: use [first, end) as two integers with 0 <= first < end")
        slices = (slices[0], slices[1])
    base = path.parent
    return PairSpec(patient=entry["patient"], low=base / entry["low"], normal=base / entry["normal"], split=split, slices=slices)


def split_counts(n_patients: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) patient counts: the fractions rounded, but a non-zero fraction gets at
    least one patient as long as one is left for training (train first, then val, then test)."""
    counts = {"val": round(val_fraction * n_patients), "test": round(test_fraction * n_patients)}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and counts[name] == 0:
            counts[name] = 1
    while counts["val"] + counts["test"] > max(n_patients - 1, 0):
        name = "test" if counts["test"] > 0 else "val"
        counts[name] -= 1
    return n_patients - counts["val"] - counts["test"], counts["val"], counts["test"]


def assign_splits(pairs: list[PairSpec], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> list[PairSpec]:
    """Fill in missing splits, whole patients at a time (a patient's slices are correlated, so a
    slice-level split would leak). Pairs with an explicit split keep it."""
    open_patients = sorted({p.patient for p in pairs if p.split is None})
    order = np.random.default_rng(seed).permutation(len(open_patients))
    _, n_val, n_test = split_counts(len(open_patients), val_fraction, test_fraction)
    chosen = {}
    for rank, i in enumerate(order):
        chosen[open_patients[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return [p if p.split is not None else PairSpec(p.patient, p.low, p.normal, chosen[p.patient], p.slices) for p in pairs]


def slab_ranges(n_slices: int, val_fraction: float, test_fraction: float, gap: int = SLAB_GAP_SLICES) -> dict[str, tuple[int, int]]:
    """[first, end) ranges cutting one patient's n matched slices (ascending position) into
    contiguous slabs: train first, then val, then test, ``gap`` slices apart. Sizes follow
    split_counts: each fraction of n rounded, a non-zero fraction gets at least one slice, and the
    held-out slabs shrink (test first) while training would be left empty. A zero fraction gets no
    slab (and no gap). A volume too short for that is a one-line CommandError."""
    sizes = {"val": round(val_fraction * n_slices), "test": round(test_fraction * n_slices)}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and sizes[name] == 0:
            sizes[name] = 1
    held = [name for name in ("val", "test") if sizes[name] > 0]
    gaps = gap * len(held)
    while n_slices - gaps - sum(sizes.values()) < 1 and any(sizes[name] > 1 for name in held):
        sizes["test" if sizes["test"] > 1 else "val"] -= 1
    n_train = n_slices - gaps - sum(sizes.values())
    if n_train < 1:
        raise CommandError(f"{n_slices} matched slices are too few to cut into {' / '.join(['train', *held])} slabs "
                           f"{gap} slices apart (at least {1 + len(held) + gaps} needed): add patients, or set split and slices in the pairs file")
    ranges = {"train": (0, n_train)}
    end = n_train
    for name in held:
        ranges[name] = (end + gap, end + gap + sizes[name])
        end = ranges[name][1]
    return ranges


@dataclass
class SlabCut:
    """How split_pairs cut one pair of a single patient into slabs."""

    patient: str
    slices: int  # matched slices of the pair
    ranges: dict[str, tuple[int, int]]
    gap: int = SLAB_GAP_SLICES

    def line(self) -> str:
        slabs = ", ".join(f"{name} [{first}, {end})" for name, (first, end) in self.ranges.items())
        return f"single patient {self.patient} cut into slabs of its {self.slices} matched slices: {slabs} ({self.gap}-slice gaps)"

    def fields(self) -> dict:
        return {"patient": self.patient, "slices": self.slices, "gap": self.gap,
                **{name: list(bounds) for name, bounds in self.ranges.items()}}


def split_pairs(pairs: list[PairSpec], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                cache: dict[Path, Volume] | None = None) -> tuple[list[PairSpec], list[SlabCut]]:
    """Every pair with its split: the one rule ``train`` and ``evaluate`` share, so both see the same
    held-out slices. By patient (assign_splits), except when the pairs without a split all belong to
    one patient whom no pair gives ``slices``: then each such pair is cut into slabs (slab_ranges)
    for the splits that no explicit pair fills, which reads the pair to count its matched slices
    (into ``cache``, for the caller to reuse)."""
    open_pairs = [p for p in pairs if p.split is None]
    patients = {p.patient for p in open_pairs}
    if len(patients) != 1:
        return assign_splits(pairs, val_fraction, test_fraction, seed), []
    (patient,) = patients
    explicit = {p.split for p in pairs if p.split is not None}
    fractions = {name: 0.0 if name in explicit else fraction for name, fraction in (("val", val_fraction), ("test", test_fraction))}
    if any(p.slices is not None for p in pairs if p.patient == patient) or not any(fractions.values()):
        return assign_splits(pairs, val_fraction, test_fraction, seed), []
    out, cuts = [], []
    for spec in pairs:
        if spec.split is not None:
            out.append(spec)
            continue
        n_slices = load_pair(spec, cache)[0].hu.shape[0]
        try:
            ranges = slab_ranges(n_slices, fractions["val"], fractions["test"])
        except CommandError as exc:
            raise CommandError(f"pair {spec.patient} ({spec.low.name}), the only patient without a split: {exc}") from None
        out += [PairSpec(spec.patient, spec.low, spec.normal, name, bounds) for name, bounds in ranges.items()]
        cuts.append(SlabCut(spec.patient, n_slices, ranges))
    return out, cuts


# ---------------------------------------------------------------- volumes


def load_volume(path: Path) -> Volume:
    """A DICOM series folder (HU via RescaleSlope/Intercept) or a NIfTI/MHA file (already HU)."""
    path = Path(path)
    if path.is_dir():
        return _load_dicom_series(path)
    if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
        return _load_itk_volume(path)
    raise CommandError(f"{path} is neither a DICOM folder nor a {'/'.join(VOLUME_SUFFIXES)} volume: point the pairs file at one")


def _load_dicom_series(folder: Path) -> Volume:
    """The one axial CT series under folder, slices ordered by position, in HU (the node's own pixel rules).
    Derived images count: a pair's low-dose side is often a simulated (derived) series."""
    scan = scan_tree(folder, accept_derived=True)
    if not scan.series:
        raise CommandError(f"no axial CT series found in {folder}: point the pairs file at a CT series folder")
    if len(scan.series) > 1:
        series = sorted(scan.series)
        raise CommandError(f"{folder} holds {len(series)} series ({', '.join(series[:3])}{' ...' if len(series) > 3 else ''}): give each series its own folder")
    (instances,) = scan.series.values()
    groups = stacks(instances)
    if len(groups) > 1:
        sizes = sorted((g[0].rows, g[0].columns) for g in groups)
        raise CommandError(f"{folder} mixes image sizes {sizes}: one series must have one matrix size")
    (stack,) = groups
    if any(inst.position is None for inst in stack):
        raise CommandError(f"{folder} has slices without ImagePositionPatient: slices cannot be matched by position")
    datasets = [pydicom.dcmread(inst.path) for inst in stack]
    hu = np.stack([stored_to_hu(stored_values(ds), *rescale(ds)) for ds in datasets]).astype(np.float32)
    positions = np.array([inst.position for inst in stack])
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)
    return Volume(hu=hu, spacing=(_slice_gap(positions, datasets[0]), dy, dx), positions=positions)


def _slice_gap(positions: np.ndarray, first) -> float:
    if len(positions) > 1:
        return float(np.median(np.diff(positions)))
    return float(first.get("SliceThickness", 1.0))


def _load_itk_volume(path: Path) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise CommandError(f"cannot read volume {path} ({first_line}): check the file") from None
    if image.GetDimension() != 3:
        raise CommandError(f"volume {path} has {image.GetDimension()} dimensions: a 3-D volume is needed")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    normal = direction[:, 2]
    positions = np.array([np.dot(normal, image.TransformIndexToPhysicalPoint((0, 0, k))) for k in range(hu.shape[0])])
    order = np.argsort(positions, kind="stable")
    dx, dy, dz = image.GetSpacing()
    return Volume(hu=hu[order], spacing=(float(dz), float(dy), float(dx)), positions=positions[order])


def match_positions(low: np.ndarray, normal: np.ndarray, tolerance: float = POSITION_TOLERANCE_MM) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """Indices of low and normal slices at the same position (both inputs ascending), and the
    positions left unmatched in each."""
    low_idx, normal_idx = [], []
    i = j = 0
    unmatched_low, unmatched_normal = [], []
    while i < len(low) and j < len(normal):
        gap = low[i] - normal[j]
        if abs(gap) <= tolerance:
            low_idx.append(i)
            normal_idx.append(j)
            i += 1
            j += 1
        elif gap < 0:
            unmatched_low.append(float(low[i]))
            i += 1
        else:
            unmatched_normal.append(float(normal[j]))
            j += 1
    unmatched_low += [float(p) for p in low[i:]]
    unmatched_normal += [float(p) for p in normal[j:]]
    return np.array(low_idx, int), np.array(normal_idx, int), unmatched_low, unmatched_normal


def _describe_positions(positions: list[float]) -> str:
    shown = ", ".join(f"{p:.2f}" for p in positions[:SHOWN_POSITIONS])
    more = f" ... ({len(positions)} in all)" if len(positions) > SHOWN_POSITIONS else f" ({len(positions)})"
    return f"[{shown}]{more}"


def load_pair(spec: PairSpec, cache: dict[Path, Volume] | None = None) -> tuple[Volume, Volume]:
    """Low- and normal-dose volumes of one pair, slice for slice at the same positions, cut to the
    pair's ``slices`` range. A ``cache`` dict shared between calls reads each volume once when
    several pairs are slabs of the same patient."""
    cache = {} if cache is None else cache
    for path in (spec.low, spec.normal):
        if path not in cache:
            cache[path] = load_volume(path)
    low, normal = cache[spec.low], cache[spec.normal]
    if low.hu.shape[1:] != normal.hu.shape[1:]:
        raise CommandError(f"pair {spec.patient}: low-dose slices are {low.hu.shape[1:]} but normal-dose {normal.hu.shape[1:]}: both must share one matrix size")
    li, ni, lost_low, lost_normal = match_positions(low.positions, normal.positions)
    if lost_low or lost_normal:
        parts = [f"{label} slices at mm {_describe_positions(lost)}" for label, lost in (("low-dose", lost_low), ("normal-dose", lost_normal)) if lost]
        raise CommandError(f"pair {spec.patient}: unmatched {'; '.join(parts)} (tolerance {POSITION_TOLERANCE_MM} mm): both volumes must cover the same slice positions")
    first, end = spec.slices if spec.slices is not None else (0, len(li))
    if end > len(li):
        raise CommandError(f"pair {spec.patient}: slices = [{first}, {end}] but the volumes have {len(li)} matched slices: fix the range")
    li, ni = li[first:end], ni[first:end]
    return _take(low, li), _take(normal, ni)


def _take(volume: Volume, index: np.ndarray) -> Volume:
    return Volume(hu=volume.hu[index], spacing=volume.spacing, positions=volume.positions[index])


# ---------------------------------------------------------------- slices for the network


def neighbour_stack(volume: np.ndarray, index: int, in_slices: int) -> np.ndarray:
    """Slices index−k … index+k (in_slices = 2k+1) with the end slices repeated, as the node feeds them."""
    return volume[neighbour_indices(volume.shape[0], in_slices)[index]]


def crop_to_multiple(image: np.ndarray, multiple: int = DOWNSAMPLE) -> np.ndarray:
    """Trim the last rows/columns so H and W are multiples of the network's downsampling: at most
    multiple−1 pixels of the border (air in CT), and no padded pixels ever enter a loss."""
    h, w = image.shape[-2:]
    return image[..., : h - h % multiple, : w - w % multiple]


def augment(image: np.ndarray, quarter_turns: int, flip: bool) -> np.ndarray:
    """Rotate the last two axes by quarter_turns × 90° and optionally flip horizontally."""
    out = np.rot90(image, quarter_turns, axes=(-2, -1))
    if flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def allowed_turns(height: int, width: int) -> tuple[int, ...]:
    """Quarter turns that keep the image shape (a batch of full slices must share it)."""
    return QUARTER_TURNS if height == width else (0, 2)


@dataclass
class ScaledPair:
    """One pair's volumes in network units, (S, H, W) float32 each."""

    low: np.ndarray
    normal: np.ndarray
    patient: str
    pixel_mm: float = 1.0  # in-plane pixel spacing (dx), which the low-dose simulator needs


def scale_pair(low: Volume, normal: Volume, patient: str, scaling: InputScaling) -> ScaledPair:
    return ScaledPair(
        low=scaling.to_unit(low.hu).astype(np.float32),
        normal=scaling.to_unit(normal.hu).astype(np.float32),
        patient=patient,
        pixel_mm=float(normal.spacing[2]),
    )


def load_scaled_pairs(specs: list[PairSpec], scaling: InputScaling, cache: dict[Path, Volume] | None = None) -> list[ScaledPair]:
    """Every pair in network units; a volume shared by several pairs (slabs of one patient) is read
    once and dropped after its last use, so loading never holds more than it must. ``cache`` may
    hold volumes already read (by split_pairs); the ones these pairs use are dropped from it."""
    uses = Counter(path for spec in specs for path in (spec.low, spec.normal))
    cache = {} if cache is None else cache
    out = []
    for spec in specs:
        out.append(scale_pair(*load_pair(spec, cache), spec.patient, scaling))
        for path in (spec.low, spec.normal):
            uses[path] -= 1
            if uses[path] == 0:
                cache.pop(path, None)
    return out


class PairedSlices(Dataset):
    """Items ``{"low": (in_slices, H, W), "normal": (in_slices, H, W), "pixel_mm": ()}`` as float tensors.

    Full slices (``patch_size=None``; one item per slice, the paper's setting) or random patches
    (``patches_per_epoch`` items, each a random slice and location). Randomness of item i in epoch
    e comes from a generator seeded with (seed, e, i), so the data order and content are the same
    for any number of loader workers or DDP ranks, and a resumed run sees what it would have seen.
    """

    def __init__(self, pairs: list[ScaledPair], in_slices: int = 1, patch_size: int | None = None,
                 patches_per_epoch: int | None = None, augment: bool = False, seed: int = 0):
        if not pairs:
            raise CommandError("no slices for this split: check the split and slices entries of the pairs file")
        self.pairs = pairs
        self.in_slices = in_slices
        self.patch_size = patch_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.index = [(p, s) for p, pair in enumerate(pairs) for s in range(pair.low.shape[0])]
        self.length = patches_per_epoch if patch_size is not None and patches_per_epoch else len(self.index)
        if patch_size is not None:
            smallest = min(min(pair.low.shape[1:]) for pair in pairs)
            if patch_size % DOWNSAMPLE or patch_size > smallest:
                raise CommandError(f"--patch-size {patch_size} must be a multiple of {DOWNSAMPLE} and at most the smallest slice side ({smallest})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        if self.patch_size is None:
            p, s = self.index[i]
        else:
            p, s = self.index[int(rng.integers(len(self.index)))]
        pair = self.pairs[p]
        low = neighbour_stack(pair.low, s, self.in_slices)
        normal = neighbour_stack(pair.normal, s, self.in_slices)
        if self.patch_size is None:
            low, normal = crop_to_multiple(low), crop_to_multiple(normal)
        else:
            h, w = low.shape[-2:]
            top = int(rng.integers(h - self.patch_size + 1))
            left = int(rng.integers(w - self.patch_size + 1))
            window = (..., slice(top, top + self.patch_size), slice(left, left + self.patch_size))
            low, normal = low[window], normal[window]
        if self.augment:
            turns = allowed_turns(*low.shape[-2:])
            k = turns[int(rng.integers(len(turns)))]
            flip = bool(rng.integers(2))
            low, normal = augment(low, k, flip), augment(normal, k, flip)
        return {"low": torch.from_numpy(np.ascontiguousarray(low)), "normal": torch.from_numpy(np.ascontiguousarray(normal)),
                "pixel_mm": torch.tensor(pair.pixel_mm, dtype=torch.float32)}
