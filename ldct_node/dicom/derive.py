"""The derived series: new CT Image Storage instances built from a source slice and its denoised
stored values, their deterministic UIDs, the atomic writer and the loop guard.

A derived instance keeps its source's SOP class (CT Image Storage, never Secondary Capture), study,
patient, frame of reference and geometry, instance number, character set, dose, window, rescale and
bit-depth attributes and lossy history (once "01", always "01"). That is done by copying the source
data set whole; the functions below then replace what must change (UIDs, ImageType, series number
and description, derivation, source image, contributing equipment, dates) and drop what the new
pixels would make false.

``rewritten_instance`` holds the rules for any new instance whose pixels were rewritten from a
source slice's: what is dropped, ImageType, derivation and source image, file meta, lossy history
and the pixel encoding. The denoised series (``derive_dataset``) and the simulated low-dose series
(``ldct_train.simulate.simulated_dataset``) both build on it, each adding only what is its own.
"""

from __future__ import annotations

import copy
import datetime
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage

from ldct_node import __version__
from ldct_node.config import DeriveSettings
from ldct_node.dicom.pixels import stored_range
from ldct_node.dicom.uids import NODE_NAMESPACE, SEPARATOR, UUID_ROOT, name_uid
from ldct_node.durable import atomic_write

MANUFACTURER = "ldct-node"
# Identifies the software that wrote the file, not a site, so it is UUID-derived and never changes.
IMPLEMENTATION_CLASS_UID = name_uid(NODE_NAMESPACE, ["implementation class"], UUID_ROOT)
IMPLEMENTATION_VERSION_NAME = f"LDCT_NODE_{__version__}"[:16]
MAX_LO_CHARS = 64
_UTC_OFFSET = re.compile(r"^([+-])(\d\d)(\d\d)$")

# Codes from pydicom's dictionary of the standard's codes. DICOM has no code for "denoising";
# CID 7203's "Smoothing" (113087) is the closest.
SMOOTHING = codes.DCM.Smoothing
SOURCE_IMAGE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation  # 121322, CID 7202
MODIFYING_EQUIPMENT = codes.DCM.ModifyingEquipment  # 109103, CID 7005
DERIVED_IMAGE_TYPE = ["DERIVED", "SECONDARY", "AXIAL"]

# Attributes the new pixels or the new instance would make false: pixel statistics, the source's
# thumbnail, signatures over the old bytes, encapsulation leftovers and the old creator's UID.
_DROPPED = (
    0x00280106,  # SmallestImagePixelValue
    0x00280107,  # LargestImagePixelValue
    0x00280108,  # SmallestPixelValueInSeries
    0x00280109,  # LargestPixelValueInSeries
    0x00287FE0,  # PixelDataProviderURL
    0x00880200,  # IconImageSequence
    0x00080014,  # InstanceCreatorUID
    0x4FFE0001,  # MACParametersSequence
    0xFFFAFFFA,  # DigitalSignaturesSequence
    0xFFFCFFFC,  # DataSetTrailingPadding
)
# File meta (group 2) is rebuilt, and the whole pixel group goes: its encapsulation no longer applies.
_REPLACED_GROUPS = (0x0002, 0x7FE0)

# Transfer syntaxes that lose information, and the LossyImageCompressionMethod term for each.
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


@dataclass(frozen=True)
class Derivation:
    """What produced the derived pixels; fingerprint hashes every setting that changes pixels or UIDs."""

    model_name: str
    model_version: str
    fingerprint: str


def _derived_uid(kind: str, source_uid: str, derivation: Derivation, root: str) -> str:
    """A UID that depends only on its inputs, so a re-run replaces instead of duplicating in PACS
    (ldct_node.dicom.uids.name_uid: a name-based UUID under 2.25, the site's root's hash under any other)."""
    return name_uid(NODE_NAMESPACE, (kind, source_uid, derivation.model_name, derivation.model_version, derivation.fingerprint), root)


def derived_series_uid(source_series_uid: str, derivation: Derivation, root: str) -> str:
    """The SeriesInstanceUID of the derived series of source_series_uid."""
    return _derived_uid("series", source_series_uid, derivation, root)


def derived_sop_uid(source_series_uid: str, source_sop_uid: str, derivation: Derivation, root: str) -> str:
    """The SOPInstanceUID of the derived instance of source_sop_uid in source_series_uid. The series is
    part of the name because a modality may reuse a SOP Instance UID in a second series: both slices
    are kept, and their derived instances must not replace each other in PACS."""
    return _derived_uid("instance", f"{source_series_uid}{SEPARATOR}{source_sop_uid}", derivation, root)


def code_item(code: Code) -> Dataset:
    """A code sequence item of code (CodeValue, CodingSchemeDesignator, CodeMeaning, and the scheme's
    version where the code has one)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        item.CodingSchemeVersion = code.scheme_version
    item.CodeMeaning = code.meaning
    return item


def series_description(source: str | None, suffix: str) -> str:
    """source + suffix in at most 64 characters: the source part is cut so the suffix always shows."""
    if not source:
        return suffix.strip()[:MAX_LO_CHARS]
    room = max(MAX_LO_CHARS - len(suffix), 0)
    return (source[:room].rstrip() + suffix)[:MAX_LO_CHARS]


def series_number(source: object, offset: int) -> int:
    """Source SeriesNumber + offset; an empty (type 2) source number counts as 0."""
    return (int(source) if source not in (None, "") else 0) + offset


def lossy_compression(source: Dataset) -> dict[str, object]:
    """LossyImageCompression with ratio and method for the derived instance; empty when the pixels never lost anything.

    "01" is sticky. A source that arrived in a lossy transfer syntax without saying so gets "01" and
    the method and ratio of that encoding appended; one that already says "01" is taken to have
    recorded its own compression, so the history is copied unchanged.
    """
    flag = source.get("LossyImageCompression")
    ratios = [float(r) for r in _as_list(source.get("LossyImageCompressionRatio"))]
    methods = [str(m) for m in _as_list(source.get("LossyImageCompressionMethod"))]
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    if flag != "01" and syntax in _LOSSY_METHODS:
        flag = "01"
        ratio = _compression_ratio(source)
        if ratio is not None:
            ratios.append(ratio)
        methods.append(_LOSSY_METHODS[syntax])
    if flag is None:
        return {}
    attrs: dict[str, object] = {"LossyImageCompression": flag}
    if ratios:
        attrs["LossyImageCompressionRatio"] = [round(r, 2) for r in ratios]
    if methods:
        attrs["LossyImageCompressionMethod"] = methods
    return attrs


def _as_list(value: object) -> list:
    """A DICOM value as a list: empty for absent, one item for single-valued."""
    if value in (None, ""):
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _compression_ratio(source: Dataset) -> float | None:
    """Uncompressed size over encapsulated size of the source pixels, None when unknown."""
    if "PixelData" not in source or not source["PixelData"].value:
        return None
    raw = int(source.Rows) * int(source.Columns) * int(source.get("SamplesPerPixel", 1)) * int(source.BitsAllocated) // 8
    return raw * int(source.get("NumberOfFrames", 1) or 1) / len(source["PixelData"].value)


def _dicom_time(created: datetime.datetime, source: Dataset) -> datetime.datetime:
    """created in the source's TimezoneOffsetFromUTC when both are known, so the new dates read like the old ones."""
    match = _UTC_OFFSET.match(str(source.get("TimezoneOffsetFromUTC") or ""))
    if match is None or created.tzinfo is None:
        return created
    sign, hours, minutes = match.groups()
    offset = datetime.timedelta(hours=int(hours), minutes=int(minutes)) * (-1 if sign == "-" else 1)
    return created.astimezone(datetime.timezone(offset))


def _pixel_dtype(ds: Dataset) -> np.dtype:
    """The little-endian dtype of native PixelData for BitsAllocated and PixelRepresentation."""
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32):
        raise ValueError(f"BitsAllocated {bits} is not supported (8, 16 or 32)")
    kind = "i" if int(ds.PixelRepresentation) == 1 else "u"
    return np.dtype(f"<{kind}{bits // 8}")


def _contributing_equipment(derivation: Derivation, settings: DeriveSettings, when: datetime.datetime) -> Dataset:
    """This software as modifying equipment, with the model that changed the pixels."""
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    if settings.institution_name:
        item.InstitutionName = settings.institution_name
    item.ManufacturerModelName = f"{derivation.model_name} {derivation.model_version}"[:MAX_LO_CHARS]
    item.SoftwareVersions = [__version__, f"{derivation.model_name} {derivation.model_version}"[:MAX_LO_CHARS]]
    item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f") + (when.strftime("%z") if when.tzinfo else "")
    item.ContributionDescription = _derivation_description(derivation)
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(MODIFYING_EQUIPMENT)])
    return item


def _derivation_description(derivation: Derivation) -> str:
    """Human-readable: which software and model made the pixels, and the settings fingerprint."""
    return (
        f"Denoised by ldct-node {__version__} with model {derivation.model_name} {derivation.model_version} "
        f"(settings {derivation.fingerprint})"
    )


def _source_image(source: Dataset) -> Dataset:
    """The SourceImageSequence item pointing at the source slice."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(SOURCE_IMAGE_PURPOSE)])
    return item


def _file_meta(sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    """New file meta information: nothing of the source's meta (its syntax, sender AE) applies any more."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def check_stored(source: Dataset, stored: np.ndarray) -> np.dtype:
    """The native PixelData dtype of source, after checking that stored can replace its pixels: a CT
    Image Storage source, the source's matrix, integers within BitsStored."""
    if source.get("SOPClassUID") != CTImageStorage:
        raise ValueError(f"source is not CT Image Storage (SOP class {source.get('SOPClassUID')}): only CT images are derived")
    dtype = _pixel_dtype(source)
    shape = (int(source.Rows), int(source.Columns))
    if stored.shape != shape:
        raise ValueError(f"stored pixels have shape {stored.shape}, the source is {shape}")
    lo, hi = stored_range(int(source.BitsStored), int(source.PixelRepresentation))
    if stored.dtype.kind not in "iu" or (stored.size and (int(stored.min()) < lo or int(stored.max()) > hi)):
        raise ValueError(f"stored pixels must be integers in {lo}..{hi} (BitsStored {int(source.BitsStored)})")
    return dtype


def rewritten_instance(
    source: pydicom.Dataset,
    stored: np.ndarray,
    *,
    series_uid: str,
    sop_uid: str,
    transfer_syntax: str,
    derivation_description: str,
    derivation_code: Code,
) -> FileDataset:
    """A new CT Image Storage instance of source carrying the stored values `stored`: the rules every
    rewrite of a slice's pixels follows. A copy of source without what the new pixels make false
    (_DROPPED, the old file meta and pixel group), with new file meta in transfer_syntax, the lossy
    compression history (lossy_compression), new Series and SOP Instance UIDs, ImageType
    DERIVED\\SECONDARY\\AXIAL, the derivation's
    description and code, a SourceImageSequence that points at the source slice, and `stored` as
    native pixel data. Pure: the caller adds what is its own (series number and description,
    equipment, dates)."""
    dtype = check_stored(source, stored)
    ds = FileDataset("", Dataset(), file_meta=_file_meta(sop_uid, transfer_syntax), preamble=b"\0" * 128)
    for elem in source:
        if elem.tag.group not in _REPLACED_GROUPS and elem.tag not in _DROPPED:
            ds.add(copy.deepcopy(elem))
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        ds.pop(keyword, None)
    for keyword, value in lossy_compression(source).items():
        setattr(ds, keyword, value)

    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = DERIVED_IMAGE_TYPE
    ds.DerivationDescription = derivation_description
    ds.DerivationCodeSequence = Sequence([code_item(derivation_code)])
    ds.SourceImageSequence = Sequence([_source_image(source)])
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OB" if dtype.itemsize == 1 else "OW"
    return ds


def derive_dataset(
    source: pydicom.Dataset,
    stored: np.ndarray,
    *,
    series_uid: str,
    sop_uid: str,
    derivation: Derivation,
    settings: DeriveSettings,
    created: datetime.datetime,
) -> FileDataset:
    """The derived (denoised) CT Image Storage instance of source carrying the stored values `stored`:
    rewritten_instance, then the derived series' number and description, ldct-node as contributing
    equipment and the creation time."""
    ds = rewritten_instance(
        source, stored, series_uid=series_uid, sop_uid=sop_uid, transfer_syntax=settings.transfer_syntax,
        derivation_description=_derivation_description(derivation), derivation_code=SMOOTHING,
    )
    ds.SeriesNumber = series_number(source.get("SeriesNumber"), settings.series_number_offset)
    ds.SeriesDescription = series_description(source.get("SeriesDescription"), settings.series_description_suffix)
    when = _dicom_time(created, source)
    equipment = [copy.deepcopy(item) for item in source.get("ContributingEquipmentSequence", [])]
    ds.ContributingEquipmentSequence = Sequence(equipment + [_contributing_equipment(derivation, settings, when)])
    day, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    ds.InstanceCreationDate = ds.SeriesDate = ds.ContentDate = day
    ds.InstanceCreationTime = ds.SeriesTime = ds.ContentTime = time
    ds.BurnedInAnnotation = "NO"
    return ds


def write_dataset(ds: FileDataset, path: Path) -> None:
    """Write ds to path atomically and durably (see ldct_node.durable)."""
    atomic_write(path, lambda fh: pydicom.dcmwrite(fh, ds, enforce_file_format=True))


def is_own_output(ds: pydicom.Dataset) -> bool:
    """True for anything ldct-node derived (ldct-node among its contributing equipment): the loop guard."""
    return any(item.get("Manufacturer") == MANUFACTURER for item in ds.get("ContributingEquipmentSequence", []) or [])
