"""One series from its source files to a derived series on disk.

This is the shared middle of the data path: ``ldct-node denoise`` calls it for each series it
finds in a folder tree, the daemon's worker for each series the queue hands it. A series is
split into stacks of equal matrix size (series.stacks), each stack is read and denoised in
chunks of slices (with the neighbour slices the network needs on either side), so memory stays
bounded for total-body series of thousands of slices. Neighbours are chosen once per stack from
the slice positions (denoise.neighbour_indices: only adjacent slices), and each chunk reads every
slice its kept slices need. Every slice's input and output HU goes into the series' HU fidelity
summary (ldct_node.dicom.fidelity); SeriesResult.fidelity_failure names the limit a series exceeds.

One bad slice does not cost its series. Slices whose header makes them unusable never enter a
stack (series.read_instance skips them, with the receiver's rules). A slice whose pixel data
turns out unreadable while its stack is denoised is set aside with its reason
(SeriesResult.skipped) and the stack is denoised again without it, from scratch, so that
neighbour selection never sees it: its neighbours get exactly what they would have got had it never
arrived. Files already written for that stack carry the same UIDs and are simply replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom

from ldct_node.config import DeriveSettings, FidelitySettings, InferenceSettings
from ldct_node.dicom.derive import Derivation, derive_dataset, derived_series_uid, derived_sop_uid, write_dataset
from ldct_node.dicom.fidelity import FidelityAccumulator, FidelitySummary, fidelity_violation
from ldct_node.dicom.pixels import hu_to_stored, padding_mask, padding_values, rescale, restore_masked, stored_to_hu, stored_values
from ldct_node.dicom.series import Instance, Skipped, scan_files, stacks
from ldct_node.net.inference import DenoiseEngine, neighbour_indices, slice_spacing


class UnusableSlice(Exception):
    """A slice of a stack whose file cannot be read into HU; denoise_instances sets it aside."""

    def __init__(self, instance: Instance, reason: str):
        super().__init__(reason)
        self.instance = instance
        self.reason = reason


@dataclass
class SeriesResult:
    source_series_uid: str
    derived_series_uid: str
    files: list[Path]
    slices: int
    seconds: float
    skipped: list[Skipped] = field(default_factory=list)
    fidelity: FidelitySummary | None = None
    # The one-line reason when the fidelity summary exceeds a limit: the series must not be used.
    fidelity_failure: str | None = None
    # Source SOP Instance UID -> its derived file, and the sums behind `fidelity` (streaming keeps both).
    by_source: dict[str, Path] = field(default_factory=dict)
    measured: FidelityAccumulator | None = None


@dataclass(frozen=True)
class Streamed:
    """What streaming (ldct_node.node.stream) already made of this run while the series arrived:
    kept as it is, so the run that closes the series denoises only the rest."""

    series_uid: str
    derived: dict[str, Path]  # source SOP Instance UID -> derived file
    set_aside: list[Skipped]
    fidelity: dict  # FidelityAccumulator.to_state() over the derived slices
    created: datetime  # the run's creation time: series-level dates must agree across its instances


@dataclass
class SourceSlice:
    dataset: pydicom.Dataset
    stored: np.ndarray
    hu: np.ndarray
    keep: np.ndarray


def derivation_for(engine: DenoiseEngine, settings: DeriveSettings) -> Derivation:
    """What the derived pixels and UIDs depend on: the exact weights and every setting that shows in the output."""
    payload = {
        "weights_sha256": engine.card.sha256,
        "derive": dataclasses.asdict(settings),
        "outside_fov_below_hu": engine.outside_fov_below_hu,
    }
    # Only a non-default tolerance joins the fingerprint, so that the UIDs of series derived before
    # the setting existed stay the same (a re-derivation replaces them in PACS, never duplicates).
    if engine.in_slices > 1 and engine.neighbour_tolerance != InferenceSettings.neighbour_tolerance:
        payload["neighbour_tolerance"] = engine.neighbour_tolerance
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return Derivation(model_name=engine.card.name, model_version=engine.card.version, fingerprint=digest[:16])


def output_series_uid(series_uid: str, engine: DenoiseEngine, settings: DeriveSettings) -> str:
    """The derived SeriesInstanceUID a source series gets, known before any slice is denoised."""
    return derived_series_uid(series_uid, derivation_for(engine, settings), settings.uid_root)


def read_slice(path: Path, outside_fov_below_hu: float) -> SourceSlice:
    ds = pydicom.dcmread(path)
    stored = stored_values(ds)
    slope, intercept = rescale(ds)
    hu = stored_to_hu(stored, slope, intercept)
    keep = padding_mask(stored, hu, *padding_values(ds), outside_fov_below_hu)
    return SourceSlice(ds, stored, hu, keep)


def read_stack_slice(instance: Instance, outside_fov_below_hu: float) -> SourceSlice:
    """read_slice, with any failure of the file itself (decoder, values) raised as UnusableSlice;
    running out of memory is no fault of the slice and stays what it is."""
    try:
        return read_slice(instance.path, outside_fov_below_hu)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder raises its own types
        detail = " ".join(str(exc).split())[:200] or "no detail"
        raise UnusableSlice(instance, f"pixel data unusable ({type(exc).__name__}: {detail})") from exc


def pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """PixelSpacing (row, column) in mm, None when absent or not two positive numbers."""
    try:
        rows, cols = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return (rows, cols) if rows > 0 and cols > 0 else None


def chunk_bounds(neighbours: np.ndarray, chunk: int):
    """(read_start, read_stop, keep_start, keep_stop) per chunk of a stack whose neighbour table
    (neighbour_indices) is given: keep the chunk, read every slice its kept slices need."""
    for start in range(0, len(neighbours), chunk):
        stop = min(start + chunk, len(neighbours))
        needed = neighbours[start:stop]
        yield min(start, int(needed.min())), max(stop, int(needed.max()) + 1), start, stop


def denoise_stack(
    stack: list[Instance],
    engine: DenoiseEngine,
    write: Callable[[SourceSlice, np.ndarray], Path],
    progress: Callable[[int], None] | None = None,
    fidelity: FidelityAccumulator | None = None,
) -> list[Path]:
    """Denoise one stack chunk by chunk, writing each slice; fidelity, when given, sees every slice's input and output HU.
    Raises UnusableSlice for a slice whose file cannot be read (denoise_instances sets it aside)."""
    positions = [inst.position for inst in stack]
    spacing = slice_spacing(positions)
    neighbours = neighbour_indices(positions, engine.in_slices, engine.neighbour_tolerance, spacing)
    files = []
    for read_start, read_stop, keep_start, keep_stop in chunk_bounds(neighbours, engine.chunk_slices):
        slices = [read_stack_slice(inst, engine.outside_fov_below_hu) for inst in stack[read_start:read_stop]]
        out_hu = engine.denoise_hu(
            np.stack([s.hu for s in slices]), np.stack([s.keep for s in slices]),
            positions=positions[read_start:read_stop], spacing=spacing,
        )
        for offset in range(keep_start - read_start, keep_stop - read_start):
            source = slices[offset]
            if fidelity is not None:
                fidelity.add(source.hu, out_hu[offset], source.keep, pixel_spacing_mm(source.dataset))
            files.append(write(source, out_hu[offset]))
        if progress:
            progress(keep_stop - keep_start)
    return files


def denoise_instances(
    series_uid: str,
    instances: list[Instance],
    out_dir: Path,
    engine: DenoiseEngine,
    settings: DeriveSettings,
    progress: Callable[[int], None] | None = None,
    fidelity: FidelitySettings = FidelitySettings(),
    measured: FidelityAccumulator | None = None,
    created: datetime | None = None,
) -> SeriesResult:
    """Denoise one series' instances into out_dir/<derived SOPInstanceUID>.dcm and measure its HU
    fidelity; a summary over a limit is reported in fidelity_failure (the files are still written:
    the caller decides what to do with them). A slice whose pixel data cannot be read is set aside
    (SeriesResult.skipped, with its reason) and its stack denoised without it. measured and created:
    the fidelity sums and creation time of the part of the run streaming already derived."""
    started = time.monotonic()
    derivation = derivation_for(engine, settings)
    new_series_uid = output_series_uid(series_uid, engine, settings)
    created = created or datetime.now().astimezone()
    out_dir.mkdir(parents=True, exist_ok=True)
    by_source: dict[str, Path] = {}

    def write(source: SourceSlice, hu: np.ndarray) -> Path:
        ds = source.dataset
        stored = hu_to_stored(hu, *rescale(ds), int(ds.BitsStored), int(ds.PixelRepresentation), source.stored.dtype)
        stored = restore_masked(source.stored, stored, source.keep)
        sop_uid = derived_sop_uid(ds.SeriesInstanceUID, ds.SOPInstanceUID, derivation, settings.uid_root)
        derived = derive_dataset(
            ds, stored, series_uid=new_series_uid, sop_uid=sop_uid, derivation=derivation, settings=settings, created=created
        )
        path = out_dir / f"{sop_uid}.dcm"
        write_dataset(derived, path)
        by_source[str(ds.SOPInstanceUID)] = path
        return path

    measured = measured or FidelityAccumulator(fidelity)
    files: list[Path] = []
    set_aside: list[Skipped] = []
    for stack in stacks(instances):
        while stack:
            # Each try of a stack measures into a copy and counts its own progress, so that a try cut
            # short by an unusable slice leaves neither in the series' figures.
            trial, done = copy.deepcopy(measured), [0]

            def counted(slices: int) -> None:
                done[0] += slices
                if progress:
                    progress(slices)

            try:
                files += denoise_stack(stack, engine, write, counted, trial)
            except UnusableSlice as bad:
                set_aside.append(Skipped(bad.instance.path, bad.reason))
                stack = [inst for inst in stack if inst is not bad.instance]
                if progress:
                    progress(1 - done[0])  # the try's slices are undone; the slice set aside is dealt with
                continue
            measured = trial
            break
    summary = measured.summary()
    return SeriesResult(series_uid, new_series_uid, files, len(files), time.monotonic() - started,
                        skipped=set_aside, fidelity=summary, fidelity_failure=fidelity_violation(summary, fidelity),
                        by_source=by_source, measured=measured)


def slice_counter(total: int, report: Callable[[int, int], None]) -> Callable[[int], None]:
    """Turn denoise_stack's slices-per-chunk into (done, total) of the whole series. Reports (0, total)
    at once, so that the total is known while the first chunk, the slowest, is still running."""
    done = 0
    report(done, total)

    def add(slices: int) -> None:
        nonlocal done
        done += slices
        report(done, total)

    return add


def denoise_series(
    sources: list[Path], out_dir: Path, engine: DenoiseEngine, settings: DeriveSettings,
    fidelity: FidelitySettings = FidelitySettings(), progress: Callable[[int, int], None] | None = None,
    prior: Streamed | None = None,
) -> SeriesResult:
    """The worker's entry: the spooled files of one series; files that are not axial CT images or cannot be used are
    set aside and reported in SeriesResult.skipped, with their reasons; the others are derived.
    progress, when given, gets (slices done, slices in the series) after each chunk. prior: what
    streaming derived and set aside of this run already, which is kept and not read again."""
    if prior is not None:
        return _complete_streamed(sources, out_dir, engine, settings, fidelity, progress, prior)
    scan = scan_files(sources)
    if not scan.series and scan.skipped:
        # Every file was set aside: nothing to derive, and the reasons are the result.
        return SeriesResult("", "", [], 0, 0.0, skipped=scan.skipped)
    if len(scan.series) != 1:
        found = ", ".join(scan.series) or "none"
        raise ValueError(f"expected the files of exactly one CT series, found series: {found}")
    (series_uid, instances), = scan.series.items()
    counted = slice_counter(len(instances), progress) if progress else None
    result = denoise_instances(series_uid, instances, out_dir, engine, settings, progress=counted, fidelity=fidelity)
    result.skipped = scan.skipped + result.skipped
    return result


def _complete_streamed(
    sources: list[Path], out_dir: Path, engine: DenoiseEngine, settings: DeriveSettings,
    fidelity: FidelitySettings, progress: Callable[[int, int], None] | None, prior: Streamed,
) -> SeriesResult:
    """denoise_series for a run streaming began: the instances it has not dealt with are derived
    into the same folder, with the same creation time, and measured into the same fidelity sums."""
    if engine.in_slices > 1:
        # A kept slice would lack the neighbours that arrived after it was derived.
        raise ValueError("streamed slices need a single-slice model (the model's in_slices is "
                         f"{engine.in_slices})")
    handled = {skipped.path for skipped in prior.set_aside}
    # Spooled files are named <SOP Instance UID>.dcm: the ones streaming dealt with need not be read.
    rest = [path for path in sources if path.stem not in prior.derived and path not in handled]
    scan = scan_files(rest)
    others = set(scan.series) - {prior.series_uid}
    if others:
        raise ValueError(f"expected the files of exactly one CT series, found series: {', '.join(scan.series)}")
    instances = scan.series.get(prior.series_uid, [])
    measured = FidelityAccumulator.from_state(fidelity, prior.fidelity)
    counted = slice_counter(len(instances), progress) if progress else None
    result = denoise_instances(prior.series_uid, instances, out_dir, engine, settings, progress=counted,
                               fidelity=fidelity, measured=measured, created=prior.created)
    by_source = {**prior.derived, **result.by_source}
    files = list(by_source.values())
    return dataclasses.replace(result, files=files, slices=len(files), by_source=by_source,
                               skipped=prior.set_aside + scan.skipped + result.skipped)
