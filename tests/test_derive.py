"""The derived series: one test per rule of what it keeps, changes and drops, UIDs, atomic writing, loop guard, dciodvfy."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.coding import Code
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

import ldct_node
from ldct_node.config import DeriveSettings
from ldct_node.dicom.derive import (
    IMPLEMENTATION_CLASS_UID,
    Derivation,
    code_item,
    derive_dataset,
    derived_series_uid,
    derived_sop_uid,
    is_own_output,
    lossy_compression,
    rewritten_instance,
    series_description,
    series_number,
    write_dataset,
)
from ldct_node.dicom.pixels import hu_to_stored, padding_mask, padding_values, rescale, restore_masked, stored_to_hu, stored_values
from ldct_node.dicom.uids import NODE_NAMESPACE, SIMULATE_NAMESPACE, name_uid
from tests import synthetic
from tests.peers import dciodvfy_findings

DERIVATION = Derivation(model_name="tscnet-student", model_version="1.2.0", fingerprint="0123456789abcdef")
SETTINGS = DeriveSettings()
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def derive(source: pydicom.Dataset, stored: np.ndarray | None = None, settings: DeriveSettings = SETTINGS,
           derivation: Derivation = DERIVATION, created: datetime.datetime | None = None) -> pydicom.FileDataset:
    """The derived instance of source with the default rules (stored defaults to the source's own pixels)."""
    stored = stored_values(source) if stored is None else stored
    return derive_dataset(
        source,
        stored,
        series_uid=derived_series_uid(source.SeriesInstanceUID, derivation, settings.uid_root),
        sop_uid=derived_sop_uid(source.SeriesInstanceUID, source.SOPInstanceUID, derivation, settings.uid_root),
        derivation=derivation,
        settings=settings,
        created=created or synthetic.created_at(),
    )


def reread(ds: pydicom.FileDataset, tmp_path: Path, name: str = "derived.dcm") -> pydicom.FileDataset:
    """ds written with write_dataset and read back, as PACS would see it."""
    path = tmp_path / name
    write_dataset(ds, path)
    return pydicom.dcmread(path)


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(UID_RE.match(uid))


@pytest.fixture(scope="module")
def source() -> pydicom.FileDataset:
    ds = synthetic.ct_dataset(rows=32, columns=32)
    ds.SmallestImagePixelValue, ds.LargestImagePixelValue = 0, 4095
    return ds


@pytest.fixture(scope="module")
def derived(source, tmp_path_factory) -> pydicom.FileDataset:
    return reread(derive(source), tmp_path_factory.mktemp("derived"))


# --- UIDs -----------------------------------------------------------------------------------------


def test_derived_uids_are_deterministic():
    assert derived_series_uid("1.2.3", DERIVATION, "2.25.") == derived_series_uid("1.2.3", DERIVATION, "2.25.")
    assert derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "2.25.") == derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "2.25.")


@pytest.mark.parametrize("change", [{"model_version": "1.2.1"}, {"fingerprint": "fedcba9876543210"}, {"model_name": "other"}])
def test_derived_uids_change_with_model_version_or_settings(change):
    other = dataclasses.replace(DERIVATION, **change)
    assert derived_series_uid("1.2.3", other, "2.25.") != derived_series_uid("1.2.3", DERIVATION, "2.25.")
    assert derived_sop_uid("1.9", "1.2.3.4", other, "2.25.") != derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "2.25.")


def test_one_sop_instance_uid_in_two_series_derives_two_instance_uids():
    assert derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "2.25.") != derived_sop_uid("1.8", "1.2.3.4", DERIVATION, "2.25.")
    assert derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "1.2.826.0.1.") != derived_sop_uid("1.8", "1.2.3.4", DERIVATION, "1.2.826.0.1.")


def test_derived_uids_differ_per_source_and_between_series_and_instance():
    uids = {derived_sop_uid("1.9", f"1.2.3.{i}", DERIVATION, "2.25.") for i in range(200)}
    assert len(uids) == 200
    assert derived_series_uid("1.2.3", DERIVATION, "2.25.") != derived_sop_uid("1.9", "1.2.3", DERIVATION, "2.25.")
    assert derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "2.25.") != "1.2.3.4"


def test_uuid_root_uids_hold_a_128_bit_uuid_integer():
    uid = derived_sop_uid("1.9", "1.2.840.113619.2.55.3.1", DERIVATION, "2.25.")
    assert valid_uid(uid)
    assert uid.startswith("2.25.") and int(uid[5:]) < 2**128


def test_derived_uids_never_change_between_versions():
    """PACS relies on a re-derivation replacing its earlier instances: these values are pinned for good."""
    site = "1.2.826.0.1.3680043.10.999."
    assert derived_series_uid("1.2.3", DERIVATION, "2.25.") == "2.25.338639101257950569151658855655403076986"
    assert derived_sop_uid("1.9", "1.2.3.4", DERIVATION, "2.25.") == "2.25.168180828776031201594397018034759588919"
    assert derived_series_uid("1.2.3", DERIVATION, site) == site + "1283794196645383813030883028307414372"
    assert derived_sop_uid("1.9", "1.2.3.4", DERIVATION, site) == site + "5606130876439567127452586011785525735"
    assert IMPLEMENTATION_CLASS_UID == "2.25.193122669159185019550462391603692042140"


def test_name_uid_depends_on_namespace_parts_and_their_boundaries():
    assert name_uid(NODE_NAMESPACE, ["a", "b"]) == name_uid(NODE_NAMESPACE, ("a", "b"))
    assert name_uid(NODE_NAMESPACE, ["a", "b"]) != name_uid(SIMULATE_NAMESPACE, ["a", "b"])
    assert name_uid(NODE_NAMESPACE, ["ab", "c"]) != name_uid(NODE_NAMESPACE, ["a", "bc"])
    assert valid_uid(name_uid(NODE_NAMESPACE, ["a"], "1.2.3."))


@pytest.mark.parametrize("root", ["1.2.826.0.1.3680043.10.999.", "1.2.3.", "2.25."])
def test_derived_uids_are_valid_and_under_the_configured_root(root):
    for uid in (derived_series_uid("1.2.3", DERIVATION, root), derived_sop_uid("1.9", "9.8.7", DERIVATION, root)):
        assert uid.startswith(root)
        assert valid_uid(uid), uid


# --- kept from the source -------------------------------------------------------------------------

KEPT = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "AccessionNumber", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation",
    "InstanceNumber", "SpecificCharacterSet", "Modality", "Manufacturer", "KVP",
    "CTDIvol", "IrradiationEventUID", "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "Rows", "Columns",
    "AcquisitionDate", "AcquisitionTime",
]


@pytest.mark.parametrize("keyword", KEPT)
def test_derived_keeps_source_attribute(source, derived, keyword):
    assert derived[keyword].value == source[keyword].value


def test_derived_keeps_non_ascii_patient_name_under_its_character_set(derived):
    assert str(derived.PatientName) == "Müller^Jürgen"
    assert derived.SpecificCharacterSet == "ISO_IR 192"


def test_derived_keeps_private_tags(derived):
    block = derived.private_block(0x0009, synthetic.PRIVATE_CREATOR)
    assert block[0x01].value in (synthetic.PRIVATE_VALUE, synthetic.PRIVATE_VALUE.encode())


def test_derived_is_ct_image_storage_in_dataset_and_file_meta(derived):
    assert derived.SOPClassUID == CTImageStorage
    assert derived.file_meta.MediaStorageSOPClassUID == CTImageStorage


# --- changed --------------------------------------------------------------------------------------


def test_derived_has_new_uids_and_meta_instance_uid_matches(source, derived):
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.file_meta.MediaStorageSOPInstanceUID == derived.SOPInstanceUID
    assert derived.SOPInstanceUID == derived_sop_uid(source.SeriesInstanceUID, source.SOPInstanceUID, DERIVATION, "2.25.")
    assert derived.SeriesInstanceUID == derived_series_uid(source.SeriesInstanceUID, DERIVATION, "2.25.")


def test_derived_file_meta_names_ldct_node_and_explicit_little_endian(derived):
    assert derived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert derived.file_meta.ImplementationVersionName.startswith("LDCT_NODE_")
    assert valid_uid(derived.file_meta.ImplementationClassUID)
    assert "SourceApplicationEntityTitle" not in derived.file_meta


def test_derived_transfer_syntax_follows_the_setting(source, tmp_path):
    ds = reread(derive(source, settings=DeriveSettings(transfer_syntax=ImplicitVRLittleEndian)), tmp_path)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, stored_values(source))


def test_derived_image_type_is_derived_secondary_axial(derived):
    assert list(derived.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]


def test_rewritten_instance_is_derived_and_leaves_series_number_and_equipment_to_the_caller(source):
    kwargs = dict(series_uid="1.2.3", sop_uid="1.2.3.4", transfer_syntax=ExplicitVRLittleEndian,
                  derivation_description="test", derivation_code=Code("113087", "DCM", "Smoothing"))
    rewritten = rewritten_instance(source, stored_values(source), **kwargs)
    assert list(rewritten.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert "SeriesNumber" in rewritten and rewritten.SeriesNumber == source.SeriesNumber  # the caller's own, untouched
    assert "ContributingEquipmentSequence" not in rewritten


def test_derived_series_number_is_source_plus_offset(source, tmp_path):
    assert int(reread(derive(source), tmp_path).SeriesNumber) == int(source.SeriesNumber) + 1000
    assert int(derive(source, settings=DeriveSettings(series_number_offset=7)).SeriesNumber) == int(source.SeriesNumber) + 7


def test_series_number_of_an_empty_source_number_is_the_offset():
    assert series_number("", 1000) == 1000
    assert series_number(None, 5) == 5
    assert series_number("12", 1000) == 1012


def test_derived_series_description_is_source_plus_suffix(derived, source):
    assert derived.SeriesDescription == source.SeriesDescription + SETTINGS.series_description_suffix


def test_series_description_cuts_the_source_part_to_keep_the_suffix_within_64_characters():
    out = series_description("X" * 60, " [denoised]")
    assert len(out) == 64
    assert out.endswith(" [denoised]") and out.startswith("X" * 53)


def test_series_description_without_source_is_the_suffix():
    assert series_description(None, " [ldct-node denoised]") == "[ldct-node denoised]"


def test_derivation_description_names_model_and_version(derived):
    assert "tscnet-student" in derived.DerivationDescription and "1.2.0" in derived.DerivationDescription


def test_derivation_code_is_smoothing(derived):
    (item,) = derived.DerivationCodeSequence
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == ("113087", "DCM", "Smoothing")


def test_code_item_carries_the_scheme_version_only_when_the_code_has_one():
    item = code_item(Code("113087", "DCM", "Smoothing"))
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == ("113087", "DCM", "Smoothing")
    assert "CodingSchemeVersion" not in item
    assert code_item(Code("X1", "99LOCAL", "Local", scheme_version="1.0")).CodingSchemeVersion == "1.0"


def test_source_image_sequence_points_at_the_source_slice(source, derived):
    (item,) = derived.SourceImageSequence
    assert item.ReferencedSOPClassUID == CTImageStorage
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "121322", "DCM", "Source image for image processing operation")


def test_contributing_equipment_names_ldct_node_its_version_and_the_model(derived):
    (item,) = derived.ContributingEquipmentSequence
    assert item.Manufacturer == "ldct-node"
    assert ldct_node.__version__ in list(item.SoftwareVersions)
    assert "tscnet-student 1.2.0" in list(item.SoftwareVersions)
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == ("109103", "DCM", "Modifying Equipment")
    assert item.ContributionDateTime == "20250304050607.890000+0100"
    assert "InstitutionName" not in item


def test_contributing_equipment_has_institution_when_configured(source):
    ds = derive(source, settings=DeriveSettings(institution_name="General Hospital"))
    assert ds.ContributingEquipmentSequence[-1].InstitutionName == "General Hospital"


def test_contributing_equipment_keeps_earlier_contributors(source):
    earlier = synthetic.derived_marker(synthetic.ct_dataset(rows=32, columns=32))
    earlier.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds = derive(earlier)
    assert [i.Manufacturer for i in ds.ContributingEquipmentSequence] == ["Other Vendor", "ldct-node"]


def test_creation_series_and_content_date_time_are_the_creation_time(derived):
    for prefix in ("InstanceCreation", "Series", "Content"):
        assert derived[f"{prefix}Date"].value == "20250304"
        assert derived[f"{prefix}Time"].value == "050607.890000"


def test_dates_are_given_in_the_source_timezone_when_it_declares_one():
    source = synthetic.ct_dataset(rows=8, columns=8)
    source.TimezoneOffsetFromUTC = "-0500"
    ds = derive(source)  # 05:06 at +01:00 is 23:06 the day before at -05:00
    assert (ds.ContentDate, ds.ContentTime) == ("20250303", "230607.890000")
    assert ds.ContributingEquipmentSequence[-1].ContributionDateTime == "20250303230607.890000-0500"


def test_burned_in_annotation_is_no(derived):
    assert derived.BurnedInAnnotation == "NO"


def test_pixel_value_statistics_of_the_source_are_dropped(source, derived):
    assert "SmallestImagePixelValue" in source
    assert "SmallestImagePixelValue" not in derived and "LargestImagePixelValue" not in derived


def test_attributes_the_new_pixels_would_falsify_are_dropped():
    source = synthetic.ct_dataset(rows=8, columns=8)
    source.SmallestPixelValueInSeries, source.LargestPixelValueInSeries = 0, 4095
    source.IconImageSequence = Sequence([Dataset()])
    source.DigitalSignaturesSequence = Sequence([Dataset()])
    source.InstanceCreatorUID = "1.2.3"
    ds = derive(source)
    for keyword in ("SmallestPixelValueInSeries", "LargestPixelValueInSeries", "IconImageSequence",
                    "DigitalSignaturesSequence", "InstanceCreatorUID"):
        assert keyword not in ds, keyword


def test_pixel_data_are_the_given_stored_values_as_native_little_endian(source, tmp_path):
    stored = (stored_values(source).astype(np.int32) // 2).astype(np.uint16)
    ds = reread(derive(source, stored), tmp_path)
    assert ds["PixelData"].VR == "OW"
    assert ds["PixelData"].value == stored.astype("<u2").tobytes()
    np.testing.assert_array_equal(ds.pixel_array, stored)


def test_derive_refuses_pixels_of_another_shape_or_outside_bits_stored(source):
    with pytest.raises(ValueError, match="shape"):
        derive(source, np.zeros((31, 32), dtype=np.uint16))
    with pytest.raises(ValueError, match="BitsStored"):
        derive(source, np.full((32, 32), 4096, dtype=np.uint16))


def test_signed_padding_value_from_an_implicit_vr_source_is_written_signed(tmp_path):
    source_path = synthetic.save(
        synthetic.ct_dataset(rows=16, columns=16, signed=True, bits_stored=16, padding_value=-2000,
                             transfer_syntax=ImplicitVRLittleEndian),
        tmp_path / "src.dcm",
    )
    ds = reread(derive(pydicom.dcmread(source_path)), tmp_path)
    assert ds["PixelPaddingValue"].VR == "SS"
    assert padding_values(ds) == (-2000, None)


# --- lossy compression history --------------------------------------------------------------------


def test_lossy_flag_00_stays_00_for_a_native_source(derived):
    assert derived.LossyImageCompression == "00"


def test_lossy_flag_01_is_sticky_with_its_ratio_and_method():
    source = synthetic.ct_dataset(rows=8, columns=8)
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = [8.5]
    source.LossyImageCompressionMethod = ["ISO_10918_1"]
    ds = derive(source)
    assert ds.LossyImageCompression == "01"
    assert float(ds.LossyImageCompressionRatio) == 8.5
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_lossy_flag_is_absent_when_the_source_never_stated_it_and_was_never_compressed():
    source = synthetic.ct_dataset(rows=8, columns=8)
    del source.LossyImageCompression
    assert lossy_compression(source) == {}


def test_lossy_transfer_syntax_source_makes_the_derived_flag_01_with_method_and_ratio(tmp_path):
    path = synthetic.save(synthetic.compress_j2k_lossy(synthetic.ct_dataset(rows=64, columns=64), ratio=10.0), tmp_path / "lossy.dcm")
    source = pydicom.dcmread(path)
    assert source.LossyImageCompression == "00"  # the careless sender did not say so
    ds = reread(derive(source), tmp_path)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(ds.LossyImageCompressionRatio) > 2.0
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def compressed_copy(plain_path: Path, codec: str, out: Path) -> Path:
    """plain_path re-encoded losslessly with codec into out."""
    if codec == "j2k":
        return synthetic.save(synthetic.compress_j2k_lossless(pydicom.dcmread(plain_path)), out)
    if codec == "rle":
        return synthetic.save(synthetic.compress_rle(pydicom.dcmread(plain_path)), out)
    if codec == "jpeg-ls":
        return synthetic.compress_jpeg_ls_lossless(plain_path, out)
    return synthetic.compress_jpeg_lossless(plain_path, out)


@pytest.mark.parametrize(
    ("codec", "syntax"),
    [("j2k", JPEG2000Lossless), ("jpeg-lossless", JPEGLosslessSV1), ("jpeg-ls", JPEGLSLossless), ("rle", RLELossless)],
)
@pytest.mark.parametrize("signed", [False, True])
def test_lossless_compressed_sources_decode_exactly_and_stay_lossless(tmp_path, codec, syntax, signed):
    plain_path = synthetic.save(
        synthetic.ct_dataset(rows=40, columns=40, signed=signed, bits_stored=12, intercept=0.0 if signed else -1024.0),
        tmp_path / "plain.dcm",
    )
    expected = stored_values(pydicom.dcmread(plain_path))
    source = pydicom.dcmread(compressed_copy(plain_path, codec, tmp_path / "c.dcm"))
    assert source.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(stored_values(source), expected)
    ds = reread(derive(source), tmp_path)
    assert ds.LossyImageCompression == "00"
    assert not ds["PixelData"].is_undefined_length and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, expected)


# --- writing and loop guard -----------------------------------------------------------------------


def test_write_dataset_replaces_atomically_and_leaves_no_temp_files(source, tmp_path):
    path = tmp_path / "out.dcm"
    write_dataset(derive(source), path)
    write_dataset(derive(source, settings=DeriveSettings(series_number_offset=5)), path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]
    assert int(pydicom.dcmread(path).SeriesNumber) == int(source.SeriesNumber) + 5


def test_written_file_gets_the_permissions_of_an_ordinary_file(source, tmp_path):
    """In a folder open to others (the user's output folder); the node's own are not (test_file_modes)."""
    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "shared").mkdir(mode=0o755)
    (tmp_path / "shared").chmod(0o755)
    path = tmp_path / "shared" / "out.dcm"
    write_dataset(derive(source), path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_dataset_failure_keeps_the_old_file_and_removes_the_temp_file(source, tmp_path, monkeypatch):
    path = tmp_path / "out.dcm"
    write_dataset(derive(source), path)
    before = path.read_bytes()

    def disk_error(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(OSError):
        write_dataset(derive(source, settings=DeriveSettings(series_number_offset=5)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]


def test_is_own_output_recognises_derived_instances_only(source, derived):
    assert is_own_output(derived)
    assert not is_own_output(source)
    assert not is_own_output(synthetic.derived_marker(synthetic.ct_dataset(rows=8, columns=8)))
    stripped = Dataset()
    stripped.ContributingEquipmentSequence = Sequence([Dataset()])
    assert not is_own_output(stripped)


# --- dciodvfy -------------------------------------------------------------------------------------


def test_dciodvfy_findings_count_a_kind_named_after_a_tag_and_an_abort_as_an_error():
    output = ("CTImage\n(0x0009,0x1001)  ?  - Warning - Unrecognized tag\nError - Missing attribute Type 1 <ImageType>\n"
              "Abort - File open for read failed\n")
    errors, warnings = dciodvfy_findings(output)
    assert errors == ["Error - Missing attribute Type 1 <ImageType>", "Abort - File open for read failed"]
    assert warnings == ["(0x0009,0x1001)  ?  - Warning - Unrecognized tag"]


@pytest.mark.peers
@pytest.mark.parametrize(
    "kwargs",
    [
        {"signed": False, "bits_stored": 12},
        {"signed": True, "bits_stored": 16, "padding_value": -2000, "fov_fill_hu": -3024.0},
        {"signed": False, "bits_stored": 16, "slope": 0.5, "intercept": -2048.0},
    ],
    ids=["unsigned", "signed-padding", "slope-0.5"],
)
def test_derived_synthetic_instances_pass_dciodvfy_without_errors_or_new_warnings(tmp_path, kwargs, dciodvfy):
    source_path = synthetic.save(synthetic.ct_dataset(rows=32, columns=32, **kwargs), tmp_path / "src.dcm")
    _, source_warnings = dciodvfy(source_path)
    path = tmp_path / "derived.dcm"
    write_dataset(derive(pydicom.dcmread(source_path)), path)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert set(warnings) <= set(source_warnings)


@pytest.mark.peers
def test_derived_shared_slice_passes_dciodvfy_and_round_trips_pixels(shared_series, tmp_path, dciodvfy):
    source_path = shared_series / "1-060.dcm"
    source_errors, source_warnings = dciodvfy(source_path)
    assert source_errors == []
    source = pydicom.dcmread(source_path)
    stored = stored_values(source)
    slope, intercept = rescale(source)
    hu = stored_to_hu(stored, slope, intercept)
    keep = padding_mask(stored, hu, *padding_values(source), -1500.0)
    out = restore_masked(stored, hu_to_stored(hu + 0.0, slope, intercept, int(source.BitsStored),
                                              int(source.PixelRepresentation), stored.dtype), keep)
    path = tmp_path / "derived.dcm"
    write_dataset(derive(source, out), path)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert set(warnings) <= set(source_warnings)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(ds.pixel_array, stored)
    assert ds.PatientName == source.PatientName and ds.SeriesDescription.endswith(SETTINGS.series_description_suffix)
    assert ds.private_block(0x0013, "CTP")[0x10].value is not None
