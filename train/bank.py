"""The noise bank: openly licensed normal-dose slices with cached unit noise, for fresh low dose at every step.

``ldct-node prepare`` reads the training manifest (train/data/manifest.toml: sources, patients,
vendors, kernels, licences, split) from a local copy of the data, checks every file against
train/data/checksums.sha256, and writes for each chosen slice its HU, its in-plane pixel size and
``realisations`` pairs of quantum and electronic unit noise (train/simulate.py). Projection is the
expensive part of the simulation and is done here once; a training sample then only mixes two
cached realisations with a random rotation (any cos·a + sin·b of two independent Gaussian fields
is a new draw of the same field), scales them to a dose drawn per sample and gives them a
reconstruction kernel drawn per sample, so even a 2-core run sees a new noise field every step.

Layout of a bank folder: ``index.json`` (one record per slice, with its source's metadata) and one
``<source>/<n>.npz`` per slice (``hu`` float32, ``quantum`` and ``electronic`` float16 of shape
(realisations, H, W)).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from torch.utils.data import Dataset

from ldct_node.config import read_toml
from ldct_node.dicom.pixels import padding_mask, padding_values, rescale, stored_to_hu, stored_values
from ldct_node.dicom.series import is_axial
from ldct_node.durable import atomic_write, atomic_write_bytes
from ldct_node.errors import CommandError
from ldct_node.logs import get_logger
from ldct_node.net.inference import resolve_device
from ldct_node.net.model import DOWNSAMPLE
from ldct_node.net.weights import InputScaling, sha256_of

from .data import allowed_turns, augment, crop_to_multiple
from .simulate import (
    KERNEL_ALPHA_RANGE,
    KERNEL_CUTOFF_RANGE,
    Kernel,
    ParallelBeamProjector,
    SimulationSettings,
    _pad_to_square,
    dose_weights,
    full_dose_counts,
    kernel_window,
    pixel_spacing_mm,
    unit_noise_hu,
)

log = get_logger(__name__)

INDEX = "index.json"
BANK_FORMAT = "ldct-noise-bank/1"
SOURCE_KEYS = {"id", "root", "files", "patient", "vendor", "scanner", "kernel", "body_part", "licence",
               "licence_source", "citation", "split", "every"}
SPLITS = ("train", "val", "test")
# Real protocols span about 5 % (ultra-low-dose screening) to 50 % of a routine dose.
DOSE_RANGE = (0.05, 0.5)
# Doses the validation and the evaluation report are measured at.
REPORT_DOSES = (0.1, 0.25, 0.5)
# A standard soft-tissue kernel for validation, between the smooth and sharp ends trained on.
VALIDATION_KERNEL = Kernel(alpha=0.6, cutoff=0.4)
# The kernel window is applied to a noise crop this much larger than the patch on every side, so
# the filter's wrap-around stays outside the patch.
KERNEL_MARGIN = 16
# A random patch is redrawn (up to PATCH_TRIES times) while less than this share of it is inside
# the body: air teaches the network nothing and the fill outside the field of view carries no noise.
BODY_ABOVE_HU = -500.0
MIN_BODY_FRACTION = 0.4
PATCH_TRIES = 8


@dataclass(frozen=True)
class Source:
    id: str
    root: str
    files: list[str]
    patient: str
    vendor: str
    scanner: str
    kernel: str
    body_part: str
    licence: str
    licence_source: str
    citation: str
    split: str
    every: int = 1


# ---------------------------------------------------------------- manifest and checksums


def load_manifest(path: Path) -> list[Source]:
    table = read_toml(path, "manifest", CommandError, not_found="pass --manifest train/data/manifest.toml")
    sources = []
    for i, entry in enumerate(table.get("source", [])):
        unknown = set(entry) - SOURCE_KEYS
        missing = SOURCE_KEYS - {"every"} - set(entry)
        if unknown or missing:
            raise CommandError(f"manifest {path}: source {i} has unknown keys {sorted(unknown)} / lacks {sorted(missing)}")
        if entry["split"] not in SPLITS:
            raise CommandError(f"manifest {path}: source {entry['id']} has split {entry['split']!r}: use one of {', '.join(SPLITS)}")
        sources.append(Source(**entry))
    if not sources:
        raise CommandError(f"manifest {path} names no [[source]] tables")
    return sources


def read_checksums(path: Path) -> dict[str, str]:
    """sha256sum's format: '<hex>  <path relative to the data root>' per line."""
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def source_files(source: Source, checksums: dict[str, str]) -> list[str]:
    """The source's files (relative to the data root) in name order, every ``every``-th one."""
    names = sorted(n for n in checksums if any(fnmatch.fnmatch(n, f"{source.root}/{pattern}") for pattern in source.files))
    return names[:: source.every]


def verify(root: Path, names: list[str], checksums: dict[str, str]) -> None:
    """Every file present and bit-identical to the manifest's copy, or one error naming the first problems."""
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise CommandError(f"{len(missing)} manifest files missing under {root} (first: {missing[0]}): "
                           "fetch the sources named in the manifest into --root")
    wrong = [n for n in names if sha256_of(root / n) != checksums[n]]
    if wrong:
        raise CommandError(f"{len(wrong)} files under {root} differ from the manifest's checksums (first: {wrong[0]}): "
                           "use the exact revision the manifest names")


# ---------------------------------------------------------------- building


def read_slice(path: Path, outside_fov_below_hu: float) -> tuple[np.ndarray, float]:
    """HU of one CT image by the node's pixel rules, padding set to the fill the projector treats as air."""
    ds = pydicom.dcmread(path)
    if ds.get("Modality") != "CT" or "PixelData" not in ds:
        raise CommandError(f"{path} is not a CT image with pixel data: fix the manifest's file pattern")
    # The noise is simulated by projecting the slice as a transaxial section; a coronal or sagittal
    # reformat projected that way gets the noise of rays through the body's length, not of any scan.
    if not is_axial(ds):
        raise CommandError(f"{path} is not an axial slice (a reformat?): fix the manifest's file pattern")
    stored = stored_values(ds)
    hu = stored_to_hu(stored, *rescale(ds)).astype(np.float32)
    keep = padding_mask(stored, hu, *padding_values(ds), outside_fov_below_hu)
    return np.where(keep, outside_fov_below_hu - 1.0, hu).astype(np.float32), pixel_spacing_mm(ds)


def unit_noise_for(hu: np.ndarray, pixel_mm: float, realisations: int, settings: SimulationSettings,
                   generator: torch.Generator, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(realisations, H, W) quantum and electronic unit noise of one slice, in HU."""
    height, width = hu.shape
    square, (top, left) = _pad_to_square(torch.from_numpy(hu)[None].to(device), settings.attenuation_downsample)
    projector = ParallelBeamProjector(square.shape[-1], settings.views, device, settings.memory_budget_mb)
    counts, outside = full_dose_counts(square, pixel_mm, settings)
    counts, outside = counts.expand(realisations, -1, -1), outside.expand(realisations, -1, -1)
    quantum, electronic = unit_noise_hu(counts, outside, pixel_mm, settings, generator, projector)
    crop = (slice(None), slice(top, top + height), slice(left, left + width))
    return quantum[crop].cpu().numpy(), electronic[crop].cpu().numpy()


def build(sources: list[Source], root: Path, checksums: dict[str, str], out: Path, realisations: int,
          settings: SimulationSettings, seed: int) -> list[dict]:
    device = resolve_device(settings.device)
    generator = torch.Generator(device).manual_seed(seed)
    records = []
    for source in sources:
        names = source_files(source, checksums)
        if not names:
            raise CommandError(f"manifest source {source.id} matches no file in the checksums list: fix its root/files")
        verify(root, names, checksums)
        (out / source.id).mkdir(parents=True, exist_ok=True)
        for n, name in enumerate(names):
            started = time.monotonic()
            hu, pixel_mm = read_slice(root / name, settings.outside_fov_below_hu)
            quantum, electronic = unit_noise_for(hu, pixel_mm, realisations, settings, generator, device)
            target = out / source.id / f"{n:04d}.npz"
            atomic_write(target, lambda fh: np.savez(fh, hu=hu, quantum=quantum.astype(np.float16),
                                                     electronic=electronic.astype(np.float16)))
            records.append({"file": str(target.relative_to(out)), "source_file": name, "sha256": checksums[name],
                            "pixel_mm": pixel_mm, "shape": list(hu.shape), **asdict(source)})
            log.info("bank slice", source=source.id, file=name, seconds=round(time.monotonic() - started, 2))
    index = {"format": BANK_FORMAT, "realisations": realisations, "seed": seed,
             "simulation": asdict(settings), "slices": records}
    atomic_write_bytes(out / INDEX, json.dumps(index, indent=1).encode())
    return records


# ---------------------------------------------------------------- reading


@dataclass
class BankSlice:
    hu: np.ndarray
    quantum: np.ndarray
    electronic: np.ndarray
    pixel_mm: float
    record: dict


def read_index(folder: Path) -> dict:
    try:
        index = json.loads((Path(folder) / INDEX).read_text())
    except FileNotFoundError:
        raise CommandError(f"{folder} is not a noise bank (no {INDEX}): build one with `ldct-node prepare`") from None
    if index.get("format") != BANK_FORMAT:
        raise CommandError(f"{folder}/{INDEX} is not in format {BANK_FORMAT}: rebuild it with `ldct-node prepare`")
    return index


def is_bank(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def load_bank(folder: Path, split: str) -> list[BankSlice]:
    index = read_index(folder)
    out = []
    for record in index["slices"]:
        if record["split"] == split:
            with np.load(Path(folder) / record["file"]) as arrays:
                out.append(BankSlice(arrays["hu"], arrays["quantum"], arrays["electronic"], float(record["pixel_mm"]), record))
    return out


def describe_bank(folder: Path) -> dict:
    """What a model card says about its training data: per split, the sources with their licences."""
    index = read_index(folder)
    splits: dict[str, dict] = {}
    for record in index["slices"]:
        entry = splits.setdefault(record["split"], {}).setdefault(record["id"], {
            k: record[k] for k in ("patient", "vendor", "scanner", "kernel", "body_part", "licence", "licence_source", "citation")})
        entry["slices"] = entry.get("slices", 0) + 1
    return {"noise_bank": str(folder), "realisations": index["realisations"], "simulation": index["simulation"], "splits": splits}


# ---------------------------------------------------------------- noise draws


def draw_kernel(rng: np.random.Generator) -> Kernel:
    return Kernel(alpha=float(rng.uniform(*KERNEL_ALPHA_RANGE)), cutoff=float(rng.uniform(*KERNEL_CUTOFF_RANGE)))


def draw_dose(rng: np.random.Generator, dose_range: tuple[float, float] = DOSE_RANGE) -> float:
    """Log-uniform: each halving of the dose is as likely as the next."""
    low, high = dose_range
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def mixed(realisations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """cos θ·a + sin θ·b of two cached realisations, with a random sign: a new draw of the same field."""
    if realisations.shape[0] == 1:
        return realisations[0].astype(np.float32) * rng.choice((-1.0, 1.0))
    a, b = rng.choice(realisations.shape[0], 2, replace=False)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    return math.cos(theta) * realisations[a].astype(np.float32) + math.sin(theta) * realisations[b].astype(np.float32)


def noise_for(item: BankSlice, window: tuple[slice, slice], dose: float, kernel: Kernel, rng: np.random.Generator) -> np.ndarray:
    """The noise dose ``dose`` adds inside ``window`` of the slice, with the texture of ``kernel``."""
    rows, cols = window
    height, width = item.hu.shape
    top, left = max(0, rows.start - KERNEL_MARGIN), max(0, cols.start - KERNEL_MARGIN)
    bottom, right = min(height, rows.stop + KERNEL_MARGIN), min(width, cols.stop + KERNEL_MARGIN)
    region = (slice(None), slice(top, bottom), slice(left, right))
    w_quantum, w_electronic = dose_weights(dose)
    noise = w_quantum * mixed(item.quantum[region], rng) + w_electronic * mixed(item.electronic[region], rng)
    spectrum = np.fft.rfft2(noise) * kernel_window(*noise.shape, kernel, "cpu").numpy()
    filtered = np.fft.irfft2(spectrum, s=noise.shape)
    inner = (slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
    return filtered[inner].astype(np.float32)


def patch_window(hu: np.ndarray, size: int, rng: np.random.Generator) -> tuple[slice, slice]:
    height, width = hu.shape
    for _ in range(PATCH_TRIES):
        top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
        window = (slice(top, top + size), slice(left, left + size))
        if (hu[window] > BODY_ABOVE_HU).mean() >= MIN_BODY_FRACTION:
            break
    return window


class BankSlices(Dataset):
    """Training (random patches, dose and kernel drawn per item) or fixed validation items
    (full slices at each of ``doses`` with VALIDATION_KERNEL), as ``{"low", "normal", "pixel_mm"}``
    in network units like train.data.PairedSlices. Item i of epoch e is seeded by (seed, e, i)."""

    def __init__(self, slices: list[BankSlice], scaling: InputScaling, patch_size: int | None = None,
                 patches_per_epoch: int | None = None, augment: bool = False, seed: int = 0,
                 doses: tuple[float, ...] = REPORT_DOSES, dose_range: tuple[float, float] = DOSE_RANGE,
                 clean_fraction: float = 0.0):
        if not slices:
            raise CommandError("the noise bank has no slices for this split: check the manifest's split entries")
        if patch_size is not None and (patch_size % DOWNSAMPLE or patch_size > min(min(s.hu.shape) for s in slices)):
            raise CommandError(f"--patch-size {patch_size} must be a multiple of {DOWNSAMPLE} and at most the smallest slice side")
        self.slices, self.scaling, self.patch_size = slices, scaling, patch_size
        self.augment, self.seed, self.doses, self.dose_range = augment, seed, doses, dose_range
        self.clean_fraction = clean_fraction
        self.epoch = 0
        self.length = patches_per_epoch or len(slices) if patch_size is not None else len(slices) * len(doses)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.patch_size is None:
            rng = np.random.default_rng((self.seed, i))
            item = self.slices[i // len(self.doses)]
            dose, kernel = self.doses[i % len(self.doses)], VALIDATION_KERNEL
            height, width = crop_to_multiple(item.hu).shape
            window = (slice(0, height), slice(0, width))
        else:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            item = self.slices[int(rng.integers(len(self.slices)))]
            dose, kernel = draw_dose(rng, self.dose_range), draw_kernel(rng)
            window = patch_window(item.hu, self.patch_size, rng)
            # A share of samples is the normal-dose image itself, to be returned as it is: without
            # them the network learns a fixed amount of smoothing and blurs every edge of a scan
            # that is already clean, instead of removing only the noise it sees.
            if rng.random() < self.clean_fraction:
                dose = 1.0
        normal = item.hu[window]
        low = normal + noise_for(item, window, dose, kernel, rng) if dose < 1.0 else normal.copy()
        low, normal = self.scaling.to_unit(low)[None], self.scaling.to_unit(normal)[None]
        if self.augment:
            turns = allowed_turns(*low.shape[-2:])
            k, flip = turns[int(rng.integers(len(turns)))], bool(rng.integers(2))
            low, normal = augment(low, k, flip), augment(normal, k, flip)
        return {"low": torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32)),
                "normal": torch.from_numpy(np.ascontiguousarray(normal, dtype=np.float32)),
                "pixel_mm": torch.tensor(item.pixel_mm, dtype=torch.float32)}


# ---------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=Path(__file__).parent / "data" / "manifest.toml",
                        help="training manifest (default: the one shipped in train/data/)")
    parser.add_argument("--checksums", type=Path, help="sha256sum list (default: checksums.sha256 beside the manifest)")
    parser.add_argument("--root", type=Path, required=True, help="local copy of the sources, laid out as the checksums list")
    parser.add_argument("--out", type=Path, required=True, help="noise bank folder to write")
    parser.add_argument("--realisations", type=int, default=2, help="cached unit noise draws per slice (default %(default)d)")
    parser.add_argument("--views", type=int, default=SimulationSettings.views, help="projection views (default %(default)d)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--only", action="append", default=[], metavar="SOURCE_ID", help="build only these sources")


def run(args: argparse.Namespace) -> int:
    if args.realisations < 1:
        raise CommandError("--realisations must be at least 1")
    sources = load_manifest(args.manifest)
    if args.only:
        sources = [s for s in sources if s.id in set(args.only)]
    checksums_path = args.checksums or args.manifest.parent / "checksums.sha256"
    if not checksums_path.is_file():
        raise CommandError(f"checksums list {checksums_path} not found: pass --checksums")
    settings = SimulationSettings(views=args.views, device=args.device)
    started = time.monotonic()
    records = build(sources, args.root, read_checksums(checksums_path), args.out, args.realisations, settings, args.seed)
    print(f"noise bank {args.out}: {len(records)} slices from {len(sources)} sources in {time.monotonic() - started:.0f} s")
    return 0
