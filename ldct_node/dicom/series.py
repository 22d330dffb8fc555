"""Reading a folder tree the way a PACS export or a CD gives it: which files are axial CT images to
denoise (and why the others are not), grouped by series, each series split into sorted stacks.

Nothing here raises on bad input: every file that is not used comes back as a Skipped with its reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, CTImageStorage, MediaStorageDirectoryStorage
from pydicom.valuerep import VR

from ldct_node.dicom.derive import is_own_output
from ldct_node.dicom.pixels import HEADER_RULES, native_length_problem
from ldct_node.node.spool import is_valid_uid

# Gantry tilt of CT scanners reaches about 30 degrees; anything further from axial is a reformat
# (coronal, sagittal, oblique) that the network was not trained on.
MAX_AXIAL_TILT_DEGREES = 35.0
# Values larger than this are left where they lie (on disk, or in the received buffer) while headers
# are read, so neither scanning nor the receiver's checks copy out pixel data.
HEADER_DEFER_BYTES = 1024


# The label of every reason for a file that cannot be parsed; the receiver refuses those (0xC000).
UNREADABLE = "unreadable DICOM"


class VerdictKind(Enum):
    """Why classify leaves a data set alone."""

    IGNORE = "ignore"  # a valid object that is not an axial CT image to denoise: answered success, not stored
    UNREADABLE = "unreadable"  # a value that cannot be decoded: a broken data set, refused (0xC000)


@dataclass(frozen=True)
class Verdict:
    """classify's answer for a data set the node does not denoise."""

    kind: VerdictKind
    label: str  # short and from a fixed set: the metric label (ldct_instances_ignored_total{reason})
    detail: str | None = None  # what this data set holds instead (SOP class, ImageType, orientation, error)

    @property
    def reason(self) -> str:
        """The one line logs and reports show: the label, then the detail in parentheses."""
        return f"{self.label} ({self.detail})" if self.detail else self.label


# What is wrong with a CT image the node cannot use, by the failure status the receiver answers for it
# (receive.py maps each to its DIMSE status; the worker sets such an instance aside with its reason).
MISMATCH = "dataset does not match SOP class"  # 0xA900
UNDECODABLE = "cannot understand"  # 0xC000
BAD_UID = "malformed UID"  # 0xC001

IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_VRS = frozenset(VR.__members__)
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class Problem:
    kind: str  # MISMATCH, UNDECODABLE or BAD_UID
    reason: str


def uid_problem(uid: str) -> str | None:
    """Why uid is no DICOM UID (PS3.5 §9.1): missing, other characters, over 64, or a component with a leading zero."""
    if not uid:
        return "missing"
    if not is_valid_uid(uid):
        return "not a valid UID"
    if any(len(part) > 1 and part[0] == "0" for part in uid.split(".")):
        return "has a component with a leading zero"
    return None


def vr_problem(ds: pydicom.Dataset) -> str | None:
    """An element (in sequences too) whose explicit VR bytes are no DICOM VR; pydicom keeps such an
    element raw and fails only when its value is used, which may be while the derived series is written."""
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        vr = elem.VR
        if vr is not None and str(vr) not in _VRS:
            return f"element {Tag(tag)} has VR bytes {str(vr)[:2]!r}, which is no DICOM VR"
        if vr == "SQ":
            for item in ds[tag].value or []:
                found = vr_problem(item)
                if found:
                    return found
    return None


def pixel_data_length(ds: pydicom.Dataset) -> int | None:
    """Bytes of PixelData as encoded (without reading a deferred value); None when there is none."""
    if _PIXEL_DATA not in ds:
        return None
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    value = elem.value
    return len(value) if isinstance(value, (bytes, bytearray)) else int(elem.length)


def is_compressed(ds: pydicom.Dataset) -> bool:
    """The data set's transfer syntax (file meta) encapsulates its pixel data."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(syntax) and UID(str(syntax)).is_compressed


def image_problem(ds: pydicom.Dataset) -> Problem | None:
    """What makes a CT image unusable that its header shows, without decoding pixel data: identifying
    UIDs, VR bytes, pixel data present, matrix, grayscale, single frame, bits, rescale and, for
    uncompressed syntaxes, a PixelData length matching the header. None: usable as far as cheaply known."""
    for name in IDENTIFYING_UIDS:
        found = uid_problem(str(ds.get(name, "") or ""))
        if found:
            return Problem(BAD_UID, f"{name} {found}")
    found = vr_problem(ds)
    if found:
        return Problem(UNDECODABLE, found)
    length = pixel_data_length(ds)
    if length is None:
        return Problem(MISMATCH, "CT image without pixel data")
    try:
        for rule in HEADER_RULES:
            found = rule(ds)
            if found:
                return Problem(MISMATCH, found)
        if not is_compressed(ds):
            if length == _UNDEFINED_LENGTH:
                return Problem(MISMATCH, "encapsulated pixel data in an uncompressed transfer syntax")
            found = native_length_problem(ds, length)
            if found:
                return Problem(MISMATCH, found)
    except Exception as exc:  # noqa: BLE001 - a missing or malformed image attribute is the problem itself
        return Problem(MISMATCH, f"image attributes unusable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})")
    return None


@dataclass
class Instance:
    path: Path
    sop_uid: str
    series_uid: str
    rows: int
    columns: int
    position: float | None  # ImagePositionPatient projected on the slice normal, mm
    instance_number: int | None


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class ScanResult:
    series: dict[str, list[Instance]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)


def _slice_normal(ds: pydicom.Dataset) -> tuple[float, float, float] | None:
    """Unit normal (row x column direction cosines) of the image plane, None when orientation is missing or degenerate.
    Plain floats: numpy's cross product of two 3-vectors cost the receiver 20 us per instance."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(iop) != 6:
        return None
    (rx, ry, rz), (cx, cy, cz) = iop[:3], iop[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    norm = math.hypot(*normal)
    if not norm > 0.5:
        return None
    return normal[0] / norm, normal[1] / norm, normal[2] / norm


def is_axial(ds: pydicom.Dataset, max_tilt_degrees: float = MAX_AXIAL_TILT_DEGREES) -> bool:
    """The slice normal is within max_tilt_degrees of the patient's head-foot axis (gantry tilt allowed)."""
    normal = _slice_normal(ds)
    return normal is not None and abs(normal[2]) >= math.cos(math.radians(max_tilt_degrees))


def _image_type(ds: pydicom.Dataset) -> list[str]:
    """ImageType values in upper case, [] when absent."""
    value = ds.get("ImageType") or []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def classify(ds: pydicom.Dataset, accept_derived: bool = False) -> Verdict | None:
    """None for an axial CT image to denoise, else the Verdict why it is left alone; never raises.

    The node denoises original/primary images only. accept_derived also takes DERIVED (or
    SECONDARY) images: training and evaluation read simulated low-dose series, which are derived."""
    try:
        return _classify(ds, accept_derived)
    except Exception as exc:  # noqa: BLE001 - a malformed value is a reason to skip, not a crash of the receiver
        return Verdict(VerdictKind.UNREADABLE, UNREADABLE, f"{type(exc).__name__}: {exc}")


def _ignore(label: str, detail: str | None = None) -> Verdict:
    return Verdict(VerdictKind.IGNORE, label, detail)


def _classify(ds: pydicom.Dataset, accept_derived: bool) -> Verdict | None:
    """classify's rules in order; may raise on malformed values."""
    if is_own_output(ds):
        return _ignore("ldct-node output", "loop guard")
    sop_class = _sop_class(ds)
    if sop_class != CTImageStorage:
        name = getattr(sop_class, "name", None) or sop_class or "none"
        return _ignore("not a CT image", f"SOP class {name}, modality {ds.get('Modality') or 'none'}")
    image_type = _image_type(ds)
    if "LOCALIZER" in image_type:
        return _ignore("localizer")
    if image_type[:2] != ["ORIGINAL", "PRIMARY"] and not accept_derived:
        shown = "\\".join(image_type) or "none"
        return _ignore("not an original/primary image", f"ImageType {shown}")
    if "PixelData" not in ds:
        return _ignore("no pixel data")
    if not is_axial(ds):
        orientation = "\\".join(str(v) for v in ds.get("ImageOrientationPatient", [])) or "none"
        return _ignore("not axial", f"orientation {orientation}")
    return None


def slice_position(ds: pydicom.Dataset) -> float | None:
    """ImagePositionPatient projected on the slice normal (mm), None when either is missing."""
    normal = _slice_normal(ds)
    try:
        ipp = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if normal is None or len(ipp) != 3:
        return None
    return math.fsum(n * p for n, p in zip(normal, ipp))


def _instance_number(ds: pydicom.Dataset) -> int | None:
    """InstanceNumber as int, None when absent, empty or malformed."""
    try:
        return int(ds.InstanceNumber)
    except (AttributeError, TypeError, ValueError):
        return None


def _sop_class(ds: pydicom.Dataset) -> str | None:
    """SOPClassUID, or the file meta's MediaStorageSOPClassUID for objects without one (DICOMDIR)."""
    meta = getattr(ds, "file_meta", None)
    return ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)


def damage(path: Path, ds: pydicom.Dataset) -> str | None:
    """A reason when the file is cut short or has no identity; pydicom reads such files without complaint.

    The last element read is the one an interrupted copy cuts: its value (still on disk when
    deferred) must fit in the file. A cut inside an element header ends the data set early without
    a trace: then the data set lacks its own SOPClassUID (which every object but a DICOMDIR has), or
    it lacks PixelData and bytes that no element accounts for follow its last element.
    """
    if "SOPClassUID" not in ds and _sop_class(ds) != MediaStorageDirectoryStorage:
        return f"{UNREADABLE} (no SOP Class UID in the data set: truncated or damaged file)"
    if not len(ds):
        return None
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    length = getattr(last, "length", None)
    tell = getattr(last, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return None
    size = path.stat().st_size
    available = size - tell if last.value is None else len(last.value)
    if available < length:
        return f"{UNREADABLE} (truncated: {last.tag} needs {length} bytes, {max(available, 0)} present)"
    if "PixelData" not in ds and size > tell + length:
        return f"{UNREADABLE} (truncated: {size - tell - length} bytes after {last.tag} are no complete element)"
    return None


def read_instance(path: Path, accept_derived: bool = False) -> Instance | Skipped:
    """The file's Instance when it is an axial CT image to denoise, else Skipped with the reason (also
    when its header makes it unusable: image_problem, the rules the receiver answers a failure for)."""
    try:
        ds = pydicom.dcmread(path, defer_size=HEADER_DEFER_BYTES)
    except InvalidDicomError:
        return Skipped(path, "not DICOM")
    except Exception as exc:  # noqa: BLE001 - any parser failure is a damaged file, reported, never raised
        return Skipped(path, f"{UNREADABLE} ({type(exc).__name__}: {exc})")
    try:
        damaged = damage(path, ds)
        if damaged:
            return Skipped(path, damaged)
        verdict = classify(ds, accept_derived)
        if verdict:
            return Skipped(path, verdict.reason)
        problem = image_problem(ds)
        if problem:
            return Skipped(path, problem.reason)
        return Instance(
            path=path,
            sop_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            position=slice_position(ds),
            instance_number=_instance_number(ds),
        )
    except Exception as exc:  # noqa: BLE001 - e.g. a value cut off mid-element only fails on access
        return Skipped(path, f"{UNREADABLE} ({type(exc).__name__}: {exc})")


def scan_files(paths: Iterable[Path], accept_derived: bool = False) -> ScanResult:
    """Classify the files and group the usable ones by SeriesInstanceUID; a repeated SOPInstanceUID keeps the first file."""
    result = ScanResult()
    kept: dict[str, Path] = {}
    for path in paths:
        found = read_instance(Path(path), accept_derived)
        if isinstance(found, Skipped):
            result.skipped.append(found)
        elif found.sop_uid in kept:
            result.skipped.append(Skipped(found.path, f"duplicate SOP Instance UID (kept {kept[found.sop_uid]})"))
        else:
            kept[found.sop_uid] = found.path
            result.series.setdefault(found.series_uid, []).append(found)
    return result


def _walk(root: Path) -> list[Path]:
    """Every regular file under root, in a stable (sorted) order so duplicates resolve the same way each run."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        files.extend(Path(folder) / name for name in sorted(names))
    return [p for p in files if p.is_file()]


def scan_tree(root: Path, accept_derived: bool = False) -> ScanResult:
    """scan_files over every file under root (any names, DICOMDIR, non-DICOM files, several series)."""
    return scan_files(_walk(Path(root)), accept_derived)


def _stack_order(stack: list[Instance]) -> list[Instance]:
    """Sorted by position when every slice has one, else by InstanceNumber when every slice has one, else by file name."""
    if all(i.position is not None for i in stack):
        return sorted(stack, key=lambda i: (i.position, i.instance_number or 0, str(i.path)))
    if all(i.instance_number is not None for i in stack):
        return sorted(stack, key=lambda i: (i.instance_number, str(i.path)))
    return sorted(stack, key=lambda i: str(i.path))


def stacks(instances: list[Instance]) -> list[list[Instance]]:
    """The series split by matrix size (rows, columns), largest stack first, each sorted along the slice normal.

    A series with mixed matrix sizes cannot be one volume; each stack is denoised on its own and all
    of them go into the same derived series.
    """
    groups: dict[tuple[int, int], list[Instance]] = {}
    for inst in instances:
        groups.setdefault((inst.rows, inst.columns), []).append(inst)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [_stack_order(group) for _, group in ordered]
