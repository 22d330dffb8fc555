"""Synthetic but realistic CT data sets for the tests: built in memory, written to disk, re-encoded.

A phantom slice is a water body with fat, lung and bone inserts inside a circular field of view;
outside that circle the vendor fill value sits, as scanners store it. Stored values are computed
here with plain numpy (not with ldct_node.dicom.pixels) so that the pixel tests have an independent oracle.
Nothing here imports pytest except `require_tool`, which turns a missing DCMTK binary into a skip.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
DCMCJPEG = Path("/usr/bin/dcmcjpeg")
DCMCJPLS = Path("/usr/bin/dcmcjpls")
PRIVATE_CREATOR = "SYNTHETIC PRIVATE"
PRIVATE_VALUE = "private payload kept"
J2K_MIN_SIZE = 32


def phantom_hu(rows: int, columns: int, *, fov_fill_hu: float | None = -3024.0, seed: int = 0) -> np.ndarray:
    """A float64 HU image: noisy water disc with fat, lung and bone inserts, vendor fill outside the FOV circle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    cy, cx = (rows - 1) / 2, (columns - 1) / 2
    r = np.hypot((y - cy) / (rows / 2), (x - cx) / (columns / 2))
    hu = np.full((rows, columns), -1000.0)
    hu[r < 0.8] = 40.0
    hu[np.hypot((y - cy * 0.6) / rows, (x - cx * 0.6) / columns) < 0.08] = -100.0
    hu[np.hypot((y - cy * 1.4) / rows, (x - cx * 0.6) / columns) < 0.08] = -800.0
    hu[np.hypot((y - cy) / rows, (x - cx * 1.4) / columns) < 0.06] = 1200.0
    hu += rng.normal(0.0, 20.0, size=hu.shape)
    if fov_fill_hu is not None:
        hu[r >= 1.0] = fov_fill_hu
    return hu


def to_stored(hu: np.ndarray, slope: float, intercept: float, bits_stored: int, signed: bool) -> np.ndarray:
    """HU to stored values the way a scanner writes them (rounded, clipped to BitsStored), as int16/uint16."""
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    stored = np.clip(np.rint((hu - intercept) / slope), lo, hi)
    return stored.astype(np.int16 if signed else np.uint16)


def ct_dataset(
    *,
    rows: int = 64,
    columns: int = 64,
    signed: bool = False,
    bits_stored: int = 12,
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding_value: int | None = None,
    padding_range_limit: int | None = None,
    fov_fill_hu: float | None = -3024.0,
    hu: np.ndarray | None = None,
    z: float = 0.0,
    instance_number: int | None = 1,
    orientation: Sequence[float] = AXIAL,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    sop_uid: str | None = None,
    series_description: str = "Abdomen 3mm low dose",
    series_number: int = 3,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
) -> FileDataset:
    """One CT Image Storage instance with every attribute a scanner fills in, valid for dciodvfy."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = list(image_type)
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20240102", "101500"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240102"
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = "100000", "100500", "100600", "100601"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic Scanners"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT Abdomen"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Phantom 1"
    # Non-ASCII name: proves SpecificCharacterSet survives derivation.
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = "3"
    ds.KVP = "100"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-160.0, -160.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
        ds["PixelPaddingValue"].VR = "SS" if signed else "US"
    if padding_range_limit is not None:
        ds.PixelPaddingRangeLimit = padding_range_limit
        ds["PixelPaddingRangeLimit"].VR = "SS" if signed else "US"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(intercept), str(slope), "HU"
    ds.CTDIvol = 4.2
    phantom = Dataset()
    phantom.CodeValue, phantom.CodingSchemeDesignator, phantom.CodeMeaning = "113691", "DCM", "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = DicomSequence([phantom])
    ds.IrradiationEventUID = generate_uid()
    ds.LossyImageCompression = "00"
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)

    image = phantom_hu(rows, columns, fov_fill_hu=fov_fill_hu, seed=seed) if hu is None else hu
    stored = to_stored(image, slope, intercept, bits_stored, signed)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def ct_series(count: int, *, spacing: float = 3.0, z0: float = 0.0, **kwargs) -> list[FileDataset]:
    """`count` slices of one series (shared study, series and frame of reference UIDs), z ascending."""
    shared = {
        "series_uid": kwargs.pop("series_uid", None) or generate_uid(),
        "study_uid": kwargs.pop("study_uid", None) or generate_uid(),
        "frame_of_reference_uid": kwargs.pop("frame_of_reference_uid", None) or generate_uid(),
    }
    return [
        ct_dataset(z=z0 + i * spacing, instance_number=i + 1, seed=i, **shared, **kwargs) for i in range(count)
    ]


def save(ds: Dataset, path: Path) -> Path:
    """Write a data set as a DICOM Part 10 file, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, datasets: Sequence[Dataset], names: Sequence[str] | None = None) -> list[Path]:
    """Each data set to folder/<name> (default IM00001 ... like a CD export); returns the paths."""
    names = names or [f"IM{i + 1:05d}" for i in range(len(datasets))]
    return [save(ds, folder / name) for ds, name in zip(datasets, names)]


def _require_j2k_size(ds: Dataset) -> None:
    """pylibjpeg-openjpeg always uses 6 wavelet resolutions, which need at least 32 x 32 pixels."""
    if min(int(ds.Rows), int(ds.Columns)) < J2K_MIN_SIZE:
        raise ValueError(f"JPEG 2000 test images need rows and columns >= {J2K_MIN_SIZE}, got {ds.Rows} x {ds.Columns}")


def compress_j2k_lossless(ds: FileDataset) -> FileDataset:
    """The data set re-encoded in place as JPEG 2000 lossless (pylibjpeg-openjpeg encoder)."""
    _require_j2k_size(ds)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def compress_j2k_lossy(ds: FileDataset, ratio: float = 10.0) -> FileDataset:
    """The data set re-encoded as lossy JPEG 2000 without touching LossyImageCompression, as careless senders do."""
    _require_j2k_size(ds)
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[ratio])
    ds.LossyImageCompression = "00"
    return ds


def require_tool(path: Path) -> Path:
    """The tool's path, or a pytest skip when it is not installed."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        import pytest

        pytest.skip(f"{path} not installed")
    return path


def compress_jpeg_lossless(src: Path, dst: Path) -> Path:
    """src re-encoded as JPEG lossless SV1 (1.2.840.10008.1.2.4.70) with DCMTK: pydicom 3 has no encoder for it."""
    tool = require_tool(DCMCJPEG)
    subprocess.run([str(tool), "+e1", str(src), str(dst)], check=True, capture_output=True)
    return dst


def compress_jpeg_ls_lossless(src: Path, dst: Path) -> Path:
    """src re-encoded as JPEG-LS lossless (1.2.840.10008.1.2.4.80) with DCMTK: pydicom has no JPEG-LS encoder here."""
    tool = require_tool(DCMCJPLS)
    subprocess.run([str(tool), "+el", str(src), str(dst)], check=True, capture_output=True)
    return dst


def broken_jpeg_ls(src: Path, dst: Path) -> Path:
    """src as JPEG-LS lossless whose codestream lost its first bytes, as a corrupt transfer leaves it:
    the header still says JPEG-LS, 16 bits, Rows x Columns, but no decoder makes an image of it."""
    compress_jpeg_ls_lossless(src, dst)
    ds = pydicom.dcmread(dst)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0)
    ds.PixelData = pydicom.encaps.encapsulate([frame[2:]])
    ds.save_as(dst, enforce_file_format=True)
    return dst


def compress_rle(ds: FileDataset) -> FileDataset:
    """The data set re-encoded in place as RLE lossless (pydicom's own encoder)."""
    ds.compress(RLELossless)
    return ds


def localizer_dataset(**kwargs) -> FileDataset:
    """A CT scout (topogram): ImageType ...LOCALIZER, coronal orientation."""
    return ct_dataset(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=CORONAL, **kwargs)


def mr_dataset(**kwargs) -> FileDataset:
    """An MR image, which a CT node must leave alone."""
    ds = ct_dataset(**kwargs)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    return ds


def without_pixels(**kwargs) -> FileDataset:
    """A CT header whose PixelData is missing (a broken export)."""
    ds = ct_dataset(**kwargs)
    del ds.PixelData
    return ds


def derived_marker(ds: FileDataset) -> FileDataset:
    """The data set stamped as another system's derived output (not ours): DERIVED\\SECONDARY."""
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    item = Dataset()
    item.Manufacturer = "Other Vendor"
    ds.ContributingEquipmentSequence = DicomSequence([item])
    return ds


def truncate(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut the file short, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def created_at() -> datetime.datetime:
    """A fixed, timezone-aware creation time so derived attributes can be asserted exactly."""
    return datetime.datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))

