"""Folder trees as PACS exports and CDs give them (ldct_node.dicom.series)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from ldct_node.config import DeriveSettings
from ldct_node.dicom.derive import Derivation, derive_dataset
from ldct_node.dicom.pixels import stored_values
from ldct_node.dicom.series import (
    BAD_UID,
    MISMATCH,
    Instance,
    Skipped,
    VerdictKind,
    classify,
    image_problem,
    read_instance,
    scan_files,
    scan_tree,
    slice_position,
    stacks,
    uid_problem,
    vr_problem,
)
from tests import synthetic


def tilted(degrees: float) -> list[float]:
    """ImageOrientationPatient of an axial slice acquired with the gantry tilted by `degrees`."""
    t = math.radians(degrees)
    return [1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)]


def instance(name: str, rows: int = 32, position: float | None = 0.0, number: int | None = 1) -> Instance:
    return Instance(Path(name), f"sop-{name}", "1.2.3", rows, rows, position, number)


# --- classify -------------------------------------------------------------------------------------


def test_axial_original_ct_image_is_accepted():
    assert classify(synthetic.ct_dataset(rows=8, columns=8)) is None


def test_non_ct_object_is_refused_with_sop_class_and_modality():
    reason = classify(synthetic.mr_dataset(rows=8, columns=8)).reason
    assert reason == "not a CT image (SOP class MR Image Storage, modality MR)"


def test_localizer_is_refused():
    assert classify(synthetic.localizer_dataset(rows=8, columns=8)).reason == "localizer"


def test_localizer_is_refused_even_when_axial():
    ds = synthetic.ct_dataset(rows=8, columns=8, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert classify(ds).reason == "localizer"


def test_derived_image_of_another_system_is_refused():
    reason = classify(synthetic.derived_marker(synthetic.ct_dataset(rows=8, columns=8))).reason
    assert reason == "not an original/primary image (ImageType DERIVED\\SECONDARY\\AXIAL)"


def test_derived_image_is_accepted_when_asked_for_training_and_evaluation():
    assert classify(synthetic.derived_marker(synthetic.ct_dataset(rows=8, columns=8)), accept_derived=True) is None


def test_own_output_is_refused_by_the_loop_guard():
    source = synthetic.ct_dataset(rows=8, columns=8)
    derived = derive_dataset(source, stored_values(source), series_uid="1.2.3", sop_uid="1.2.3.4",
                             derivation=Derivation("m", "1", "f"), settings=DeriveSettings(),
                             created=synthetic.created_at())
    assert classify(derived).reason == "ldct-node output (loop guard)"


def test_own_output_is_refused_even_if_pacs_rewrote_image_type():
    source = synthetic.ct_dataset(rows=8, columns=8)
    derived = derive_dataset(source, stored_values(source), series_uid="1.2.3", sop_uid="1.2.3.4",
                             derivation=Derivation("m", "1", "f"), settings=DeriveSettings(),
                             created=synthetic.created_at())
    derived.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert classify(derived).reason == "ldct-node output (loop guard)"


def test_image_without_pixel_data_is_refused():
    assert classify(synthetic.without_pixels(rows=8, columns=8)).reason == "no pixel data"


def test_coronal_reformat_is_refused_as_not_axial():
    ds = synthetic.ct_dataset(rows=8, columns=8, orientation=synthetic.CORONAL)
    assert classify(ds).reason.startswith("not axial (orientation 1")


def test_missing_orientation_is_refused_as_not_axial():
    ds = synthetic.ct_dataset(rows=8, columns=8)
    del ds.ImageOrientationPatient
    assert classify(ds).reason == "not axial (orientation none)"


@pytest.mark.parametrize(("tilt", "accepted"), [(0.0, True), (-15.0, True), (30.0, True), (60.0, False), (90.0, False)])
def test_gantry_tilt_is_axial_but_oblique_reformats_are_not(tilt, accepted):
    ds = synthetic.ct_dataset(rows=8, columns=8, orientation=tilted(tilt))
    assert (classify(ds) is None) is accepted


def test_malformed_values_give_a_reason_instead_of_raising(tmp_path):
    path = synthetic.save(synthetic.ct_dataset(rows=8, columns=8), tmp_path / "bad.dcm")
    # a ContributingEquipmentSequence whose 4 bytes of content are no sequence item
    path.write_bytes(path.read_bytes() + b"\x18\x00\x01\xa0SQ\x00\x00\x04\x00\x00\x00\x01\x02\x03\x04")
    verdict = classify(pydicom.dcmread(path))
    assert verdict.kind is VerdictKind.UNREADABLE and verdict.reason.startswith("unreadable DICOM (")


def test_slice_position_is_measured_along_the_slice_normal():
    ds = synthetic.ct_dataset(rows=8, columns=8, orientation=tilted(30.0), z=10.0)
    ds.ImagePositionPatient = [0.0, 4.0, 10.0]
    normal_y, normal_z = -math.sin(math.radians(30)), math.cos(math.radians(30))
    assert slice_position(ds) == pytest.approx(4.0 * normal_y + 10.0 * normal_z)


# --- scan_tree ------------------------------------------------------------------------------------


@pytest.fixture()
def export(tmp_path) -> dict:
    """A messy export: two series in nested folders with odd names, non-DICOM and damaged files."""
    root = tmp_path / "export"
    first = synthetic.ct_series(4, rows=16, columns=16)
    second = synthetic.ct_series(3, rows=16, columns=16, signed=True, bits_stored=16, intercept=0.0)
    synthetic.write_series(root / "A", first)
    synthetic.write_series(root / "B" / "deep", second, names=[f"slice.{i}" for i in range(3)])
    files = {
        "mr": synthetic.save(synthetic.mr_dataset(rows=8, columns=8), root / "mr.dcm"),
        "scout": synthetic.save(synthetic.localizer_dataset(rows=8, columns=8), root / "A" / "scout"),
        "nopixels": synthetic.save(synthetic.without_pixels(rows=8, columns=8), root / "nopixels.dcm"),
        "cut": synthetic.truncate(synthetic.save(synthetic.ct_dataset(rows=16, columns=16), root / "cut.dcm")),
        "text": root / "README.TXT",
        "empty": root / "EMPTY",
    }
    files["text"].write_text("Exported by a PACS\n")
    files["empty"].write_bytes(b"")
    return {"root": root, "first": first, "second": second, "files": files}


def test_scan_tree_groups_images_by_series(export):
    result = scan_tree(export["root"])
    assert set(result.series) == {export["first"][0].SeriesInstanceUID, export["second"][0].SeriesInstanceUID}
    assert len(result.series[export["first"][0].SeriesInstanceUID]) == 4
    assert len(result.series[export["second"][0].SeriesInstanceUID]) == 3


def test_scan_tree_reports_every_other_file_with_its_reason(export):
    reasons = {s.path: s.reason for s in scan_tree(export["root"]).skipped}
    files = export["files"]
    assert reasons[files["mr"]].startswith("not a CT image")
    assert reasons[files["scout"]] == "localizer"
    assert reasons[files["nopixels"]] == "no pixel data"
    assert reasons[files["cut"]].startswith("unreadable DICOM (truncated")
    assert reasons[files["text"]] == "not DICOM"
    assert reasons[files["empty"]] == "not DICOM"
    assert len(reasons) == 6


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the half values it reads
def test_a_file_cut_at_any_byte_is_never_accepted_and_never_raises(tmp_path):
    whole = synthetic.save(synthetic.ct_dataset(rows=8, columns=8), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    reasons = Counter()
    for size in range(len(whole)):
        cut.write_bytes(whole[:size])
        found = read_instance(cut)
        assert isinstance(found, Skipped), f"file cut to {size} bytes accepted"
        reasons[found.reason.split(" (")[0]] += 1
    # only a cut exactly between two elements before PixelData reads as a complete file without pixels
    assert set(reasons) == {"not DICOM", "unreadable DICOM", "no pixel data"}
    assert reasons["no pixel data"] < reasons["unreadable DICOM"] / 10


def test_truncated_encapsulated_file_is_unreadable(tmp_path):
    ds = synthetic.compress_j2k_lossless(synthetic.ct_dataset(rows=32, columns=32))
    path = synthetic.truncate(synthetic.save(ds, tmp_path / "j2k.dcm"), 0.7)
    with pytest.warns(UserWarning):
        (skipped,) = scan_files([path]).skipped
    assert skipped.reason.startswith("unreadable DICOM")


def test_compressed_images_are_accepted(tmp_path):
    path = synthetic.save(synthetic.compress_j2k_lossless(synthetic.ct_dataset(rows=32, columns=32)), tmp_path / "j2k.dcm")
    assert len(scan_files([path]).series) == 1


def test_duplicate_sop_instance_is_kept_once_and_the_copy_names_the_kept_file(tmp_path):
    ds = synthetic.ct_dataset(rows=8, columns=8)
    original = synthetic.save(ds, tmp_path / "a" / "IM1")
    copy = synthetic.save(ds, tmp_path / "b" / "IM1")
    result = scan_tree(tmp_path)
    (kept,) = result.series[ds.SeriesInstanceUID]
    assert kept.path == original
    (skipped,) = result.skipped
    assert skipped.path == copy
    assert skipped.reason == f"duplicate SOP Instance UID (kept {original})"


def test_dicomdir_is_skipped_and_its_images_found(tmp_path):
    fileset = FileSet()
    datasets = synthetic.ct_series(3, rows=8, columns=8)
    for ds in datasets:
        fileset.add(ds)
    fileset.write(tmp_path / "cd")
    result = scan_tree(tmp_path / "cd")
    assert len(result.series[datasets[0].SeriesInstanceUID]) == 3
    (skipped,) = result.skipped
    assert skipped.path.name == "DICOMDIR" and "Media Storage Directory" in skipped.reason


def test_empty_folder_gives_empty_result(tmp_path):
    result = scan_tree(tmp_path)
    assert result.series == {} and result.skipped == []


def test_missing_folder_gives_empty_result(tmp_path):
    result = scan_tree(tmp_path / "nowhere")
    assert result.series == {} and result.skipped == []


def test_scan_reads_headers_only(export, monkeypatch):
    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel data decoded during scan")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_pixels))
    assert len(scan_tree(export["root"]).series) == 2


def test_instance_records_geometry_and_numbers(tmp_path):
    datasets = synthetic.ct_series(2, rows=16, columns=24, z0=-50.0, spacing=2.5)
    paths = synthetic.write_series(tmp_path, datasets)
    instances = scan_files(paths).series[datasets[0].SeriesInstanceUID]
    assert [(i.rows, i.columns, i.position, i.instance_number) for i in instances] == [(16, 24, -50.0, 1), (16, 24, -47.5, 2)]
    assert instances[1].sop_uid == datasets[1].SOPInstanceUID and instances[1].path == paths[1]


# --- stacks ---------------------------------------------------------------------------------------


def test_stacks_sort_by_position_not_by_file_name_or_instance_number(tmp_path):
    datasets = synthetic.ct_series(5, rows=8, columns=8)
    for ds, number in zip(datasets, [5, 1, 4, 2, 3]):
        ds.InstanceNumber = number
    paths = synthetic.write_series(tmp_path, datasets, names=["e", "c", "a", "d", "b"])
    (stack,) = stacks(scan_tree(tmp_path).series[datasets[0].SeriesInstanceUID])
    assert [i.path for i in stack] == paths
    assert [i.position for i in stack] == sorted(i.position for i in stack)


def test_stacks_split_mixed_matrix_sizes_each_sorted():
    instances = [instance("a", 64, 3.0), instance("b", 32, 9.0), instance("c", 64, 1.0), instance("d", 32, 6.0),
                 instance("e", 64, 2.0)]
    big, small = stacks(instances)
    assert [i.path.name for i in big] == ["c", "e", "a"]
    assert [i.path.name for i in small] == ["d", "b"]


def test_stacks_fall_back_to_instance_number_when_a_position_is_missing():
    instances = [instance("a", position=None, number=3), instance("b", position=5.0, number=1), instance("c", position=1.0, number=2)]
    (stack,) = stacks(instances)
    assert [i.path.name for i in stack] == ["b", "c", "a"]


def test_stacks_fall_back_to_file_name_when_positions_and_numbers_are_missing():
    instances = [instance("c", position=None, number=None), instance("a", position=None, number=2), instance("b", position=1.0, number=None)]
    (stack,) = stacks(instances)
    assert [i.path.name for i in stack] == ["a", "b", "c"]


def test_stacks_of_nothing_is_empty():
    assert stacks([]) == []


def test_shared_series_scans_as_one_sorted_contiguous_stack(shared_series):
    result = scan_tree(shared_series)
    (instances,) = result.series.values()
    assert len(instances) == 134
    assert {s.reason for s in result.skipped} == {"not DICOM"}  # LICENSE.txt, Citations.txt, README.md
    (stack,) = stacks(instances)
    gaps = {round(b.position - a.position, 3) for a, b in zip(stack, stack[1:])}
    assert gaps == {3.0}
    assert stack[0].instance_number == 134 and stack[-1].instance_number == 1


# --- unusable images: the rules the receiver answers a failure for and the worker sets aside --------


@pytest.mark.parametrize(("uid", "found"), [
    ("1.2.840.10008.5.1.4.1.1.2", None), ("1.2.0.3", None), ("0.1", None),
    ("1.2.03.4", "has a component with a leading zero"), ("01.2", "has a component with a leading zero"),
    ("", "missing"), ("1.2.a", "not a valid UID"), ("1." + "2" * 63, "not a valid UID"),
])
def test_uid_problem_refuses_leading_zeros_and_malformed_uids(uid, found):
    assert uid_problem(uid) == found


def with_vr_bytes(path: Path, keyword_tag: bytes, vr: bytes) -> Path:
    data = bytearray(path.read_bytes())
    at = data.index(keyword_tag, 132)
    data[at + 4:at + 6] = vr
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("tag", [b"\x08\x00\x60\x00", b"\x08\x00\x00\x01"])  # Modality; CodeValue in a sequence
def test_vr_problem_finds_vr_bytes_that_are_no_dicom_vr(tmp_path, tag):
    path = synthetic.save(synthetic.ct_dataset(rows=8, columns=8), tmp_path / "ct.dcm")
    assert vr_problem(pydicom.dcmread(path)) is None
    with_vr_bytes(path, tag, b"ZZ")
    assert "'ZZ'" in vr_problem(pydicom.dcmread(path))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(("change", "kind", "reason"), [
    (lambda ds: setattr(ds, "RescaleSlope", "0"), MISMATCH, "RescaleSlope is 0"),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData * 2), MISMATCH, "pixel data has 256 bytes"),
    (lambda ds: setattr(ds, "SamplesPerPixel", 3), MISMATCH, "SamplesPerPixel is 3"),
    (lambda ds: setattr(ds, "BitsStored", 17), MISMATCH, "BitsStored 17"),
    (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.03"), BAD_UID, "SeriesInstanceUID has a component"),
    (lambda ds: delattr(ds, "Rows"), MISMATCH, "image attributes unusable"),
])
def test_image_problem_gives_the_kind_and_reason_of_the_first_rule_broken(change, kind, reason):
    ds = synthetic.ct_dataset(rows=8, columns=8)
    assert image_problem(ds) is None
    change(ds)
    problem = image_problem(ds)
    assert problem.kind == kind and problem.reason.startswith(reason), problem


def test_image_problem_reads_the_length_of_deferred_pixel_data_without_loading_it(tmp_path):
    ds = synthetic.ct_dataset(rows=8, columns=8)
    ds.PixelData = ds.PixelData * 2
    path = synthetic.save(ds, tmp_path / "long.dcm")
    deferred = pydicom.dcmread(path, defer_size=64)
    assert image_problem(deferred).reason == "pixel data has 256 bytes, Rows x Columns x BitsAllocated/8 is 128"
    assert deferred.get_item("PixelData", keep_deferred=True).value is None


def test_read_instance_sets_an_unusable_image_aside_with_its_reason(tmp_path):
    ds = synthetic.ct_dataset(rows=8, columns=8)
    ds.RescaleSlope = "0"
    found = read_instance(synthetic.save(ds, tmp_path / "slope0.dcm"))
    assert isinstance(found, Skipped) and found.reason.startswith("RescaleSlope is 0")
