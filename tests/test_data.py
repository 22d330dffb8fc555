"""Pairs file, volume loading, slice matching, splits and the training datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ldct_node.errors import CommandError
from ldct_node.net.weights import InputScaling
from ldct_train import data
from ldct_train.data import (
    PairedSlices,
    PairSpec,
    allowed_turns,
    assign_splits,
    augment,
    crop_to_multiple,
    load_pair,
    load_pairs,
    load_volume,
    match_positions,
    neighbour_stack,
    scale_pair,
    slab_ranges,
    split_counts,
    split_pairs,
)


def write_series(folder: Path, hu: np.ndarray, z0: float = 10.0, dz: float = 2.5, intercept: float = -1024.0,
                 series_uid: str | None = None, names: list[str] | None = None) -> Path:
    """A tiny CT series, one file per slice, with stored = HU − intercept."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    for k, plane in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, z0 + k * dz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.7]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = (plane - intercept).astype(np.uint16).tobytes()
        name = names[k] if names else f"im{k:03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    return folder


def write_itk(path: Path, hu: np.ndarray, z0: float = 10.0, dz: float = 2.5) -> Path:
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing((0.7, 0.8, dz))
    image.SetOrigin((0.0, 0.0, z0))
    sitk.WriteImage(image, str(path))
    return path


def ramp(slices: int = 4, size: int = 8) -> np.ndarray:
    """Each slice a constant HU that encodes its index, so order mistakes are visible."""
    return np.stack([np.full((size, size), -1000.0 + 100 * k, np.float32) for k in range(slices)])


def write_pairs(folder: Path, text: str) -> Path:
    path = folder / "pairs.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- pairs file


def test_pairs_file_paths_are_relative_to_its_folder(tmp_path):
    (tmp_path / "ld").mkdir()
    (tmp_path / "nd").mkdir()
    path = write_pairs(tmp_path, '[[pair]]\npatient = "P1"\nlow = "ld"\nnormal = "nd"\nsplit = "val"\nslices = [2, 5]\n')
    (pair,) = load_pairs(path)
    assert pair == PairSpec("P1", tmp_path / "ld", tmp_path / "nd", "val", (2, 5))


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[pair]]\npatient = "P"\nlow = "ld"\nnormal = "nd"\ncolour = 1\n', "unknown keys colour"),
        ('[[pair]]\npatient = "P"\nlow = "ld"\n', "needs normal"),
        ('[[pair]]\npatient = "P"\nlow = "ld"\nnormal = "nd"\nsplit = "dev"\n', "split = 'dev'"),
        ('[[pair]]\npatient = "P"\nlow = "ld"\nnormal = "nd"\nslices = [5, 2]\n', r"slices = \[5, 2\]"),
        ('[[pair]]\npatient = "P"\nlow = "ld"\nnormal = "missing"\n', "does not exist"),
        ('[[pair]\npatient = "P"\n', "not valid TOML"),
        ('title = "x"\n', "unknown top-level keys title"),
        ("", "names no pairs"),
    ],
)
def test_bad_pairs_file_gives_one_line_error(tmp_path, text, message):
    (tmp_path / "ld").mkdir()
    (tmp_path / "nd").mkdir()
    with pytest.raises(CommandError, match=message) as err:
        load_pairs(write_pairs(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_pairs_file_names_it(tmp_path):
    with pytest.raises(CommandError, match="not found"):
        load_pairs(tmp_path / "nope.toml")


def test_pairs_may_name_volumes_not_yet_made_when_asked(tmp_path):
    path = write_pairs(tmp_path, '[[pair]]\npatient = "P"\nlow = "ld-5pct"\nnormal = "nd"\n')
    assert load_pairs(path, require_existing=False)[0].low == tmp_path / "ld-5pct"


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize(
    "n, expected",
    [(10, (8, 1, 1)), (3, (1, 1, 1)), (2, (1, 1, 0)), (1, (1, 0, 0)), (0, (0, 0, 0)), (20, (16, 2, 2))],
)
def test_split_counts_keep_a_training_patient_and_give_each_split_one(n, expected):
    assert split_counts(n, 0.1, 0.1) == expected


def test_assign_splits_never_splits_a_patient_and_keeps_explicit_splits():
    pairs = [PairSpec(f"P{p}", Path(f"l{p}{s}"), Path(f"n{p}{s}")) for p in range(10) for s in range(3)]
    pairs.append(PairSpec("P0", Path("x"), Path("y"), split="test", slices=(0, 4)))
    out = assign_splits(pairs, seed=3)
    by_patient = {}
    for pair in out[:-1]:
        by_patient.setdefault(pair.patient, set()).add(pair.split)
    assert all(len(s) == 1 for s in by_patient.values())
    assert sorted(next(iter(s)) for s in by_patient.values()) == ["test"] + ["train"] * 8 + ["val"]
    assert out[-1].split == "test"
    assert assign_splits(pairs, seed=3) == out


@pytest.mark.parametrize(
    "n, fractions, expected",
    [
        (100, (0.1, 0.1), {"train": (0, 70), "val": (75, 85), "test": (90, 100)}),
        (30, (0.1, 0.1), {"train": (0, 14), "val": (19, 22), "test": (27, 30)}),
        (13, (0.1, 0.1), {"train": (0, 1), "val": (6, 7), "test": (12, 13)}),  # the shortest that cuts: one slice each
        (20, (0.1, 0.0), {"train": (0, 13), "val": (18, 20)}),  # no test slab, no second gap
        (20, (0.5, 0.4), {"train": (0, 1), "val": (6, 14), "test": (19, 20)}),  # held-out slabs shrink, test first
    ],
)
def test_slab_ranges_cut_train_val_test_in_order_with_gaps(n, fractions, expected):
    ranges = slab_ranges(n, *fractions)
    assert ranges == expected and list(ranges) == list(expected)
    bounds = list(ranges.values())
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(later[0] - earlier[1] == data.SLAB_GAP_SLICES for earlier, later in zip(bounds, bounds[1:]))
    # a network fed in_slices = 5 (two neighbours each side) reads no slice of another slab
    assert data.SLAB_GAP_SLICES >= 4


def test_slab_ranges_refuse_a_volume_too_short_to_cut_in_one_line():
    with pytest.raises(CommandError, match=r"12 matched slices are too few .*\(at least 13 needed\)") as err:
        slab_ranges(12, 0.1, 0.1)
    assert "\n" not in str(err.value)
    assert slab_ranges(12, 0.0, 0.0) == {"train": (0, 12)}


def test_single_patient_without_splits_is_cut_into_slabs(tmp_path):
    write_itk(tmp_path / "nd.mha", ramp(30))
    write_itk(tmp_path / "ld.mha", ramp(30) + 5)
    (pair,) = load_pairs(write_pairs(tmp_path, '[[pair]]\npatient = "P"\nlow = "ld.mha"\nnormal = "nd.mha"\n'))
    specs, cuts = split_pairs([pair], 0.1, 0.1)
    assert [(s.split, s.slices) for s in specs] == [("train", (0, 14)), ("val", (19, 22)), ("test", (27, 30))]
    assert cuts[0].line() == "single patient P cut into slabs of its 30 matched slices: train [0, 14), val [19, 22), test [27, 30) (5-slice gaps)"
    assert [load_pair(s)[1].hu[:, 0, 0].tolist() for s in specs[1:]] == [[900, 1000, 1100], [1700, 1800, 1900]]
    # an explicit split elsewhere is kept, and the open patient gives only the splits nobody fills
    other = PairSpec("Q", pair.low, pair.normal, "test")
    specs, _ = split_pairs([pair, other], 0.1, 0.1)
    assert [(s.patient, s.split, s.slices) for s in specs] == [("P", "train", (0, 22)), ("P", "val", (27, 30)), ("Q", "test", None)]


def test_too_short_single_patient_names_the_pair(tmp_path):
    write_itk(tmp_path / "nd.mha", ramp(8))
    with pytest.raises(CommandError, match=r"pair P \(nd.mha\).*8 matched slices are too few"):
        split_pairs([PairSpec("P", tmp_path / "nd.mha", tmp_path / "nd.mha")], 0.1, 0.1)


def test_split_by_patient_is_unchanged_when_slabs_do_not_apply():
    missing = Path("/nonexistent")  # nothing may be read
    two = [PairSpec("P", missing, missing), PairSpec("Q", missing, missing)]
    assert split_pairs(two, 0.5, 0.0) == (assign_splits(two, 0.5, 0.0), [])
    stated = [PairSpec("P", missing, missing), PairSpec("P", missing, missing, "val", (10, 20))]
    assert split_pairs(stated, 0.1, 0.1) == (assign_splits(stated, 0.1, 0.1), [])
    filled = [PairSpec("P", missing, missing), PairSpec("Q", missing, missing, "val"), PairSpec("R", missing, missing, "test")]
    assert split_pairs(filled, 0.1, 0.1)[0][0].split == "train"


# ---------------------------------------------------------------- volumes


def test_dicom_series_sorted_by_position_not_file_name_and_converted_to_hu(tmp_path):
    hu = ramp(4)
    # file names in reverse order of position
    folder = write_series(tmp_path / "s", hu, intercept=-1000.0, names=["d.dcm", "c.dcm", "b.dcm", "a.dcm"])
    (folder / "LICENSE.txt").write_text("not DICOM")
    vol = load_volume(folder)
    np.testing.assert_array_equal(vol.hu, hu)
    np.testing.assert_allclose(vol.positions, [10.0, 12.5, 15.0, 17.5])
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.hu.dtype == np.float32


def test_folder_with_two_series_is_refused(tmp_path):
    write_series(tmp_path / "s", ramp(2), names=["a1.dcm", "a2.dcm"])
    write_series(tmp_path / "s", ramp(2), names=["b1.dcm", "b2.dcm"])
    with pytest.raises(CommandError, match="holds 2 series"):
        load_volume(tmp_path / "s")


def test_nifti_and_mha_volumes_load_with_positions(tmp_path):
    hu = ramp(3)
    for name in ("v.nii.gz", "v.mha"):
        vol = load_volume(write_itk(tmp_path / name, hu))
        np.testing.assert_array_equal(vol.hu, hu)
        np.testing.assert_allclose(vol.positions, [10.0, 12.5, 15.0])
        assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))


def test_unknown_volume_kind_is_refused(tmp_path):
    (tmp_path / "v.png").write_bytes(b"x")
    with pytest.raises(CommandError, match="neither a DICOM folder"):
        load_volume(tmp_path / "v.png")


# ---------------------------------------------------------------- pairing


def test_match_positions_within_tolerance_and_reports_leftovers():
    li, ni, lost_low, lost_normal = match_positions(np.array([0.0, 1.0, 2.05, 9.0]), np.array([1.02, 2.0, 3.0]))
    assert li.tolist() == [1, 2] and ni.tolist() == [0, 1]
    assert lost_low == [0.0, 9.0] and lost_normal == [3.0]


def test_pair_of_dicom_and_nifti_matched_by_position_and_cut_to_slices(tmp_path):
    hu = ramp(6)
    write_series(tmp_path / "nd", hu)
    write_itk(tmp_path / "ld.nii.gz", hu + 5)
    low, normal = load_pair(PairSpec("P", tmp_path / "ld.nii.gz", tmp_path / "nd", slices=(1, 4)))
    np.testing.assert_array_equal(normal.hu, hu[1:4])
    np.testing.assert_array_equal(low.hu, hu[1:4] + 5)
    np.testing.assert_allclose(low.positions, normal.positions)


def test_unmatched_slices_are_listed(tmp_path):
    write_series(tmp_path / "nd", ramp(4))
    write_series(tmp_path / "ld", ramp(3), z0=12.5)  # misses the slice at 10.0 mm
    with pytest.raises(CommandError, match=r"unmatched normal-dose slices at mm \[10.00\] \(1\)"):
        load_pair(PairSpec("P", tmp_path / "ld", tmp_path / "nd"))


def test_slices_range_beyond_the_volume_is_refused(tmp_path):
    write_series(tmp_path / "nd", ramp(3))
    with pytest.raises(CommandError, match="3 matched slices"):
        load_pair(PairSpec("P", tmp_path / "nd", tmp_path / "nd", slices=(0, 5)))


def test_real_series_pairs_with_itself(shared_series):
    low, normal = load_pair(PairSpec("CB001", shared_series, shared_series, slices=(0, 2)))
    assert low.hu.shape == (2, 512, 512)
    assert low.hu.min() >= -1024 and normal.hu.max() > 500


# ---------------------------------------------------------------- slices for the network


def test_neighbour_stack_repeats_end_slices():
    vol = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    assert neighbour_stack(vol, 0, 3)[:, 0, 0].tolist() == [0, 0, 1]
    assert neighbour_stack(vol, 3, 3)[:, 0, 0].tolist() == [2, 3, 3]
    assert neighbour_stack(vol, 2, 1)[:, 0, 0].tolist() == [2]


def test_crop_to_multiple_trims_only_the_remainder():
    assert crop_to_multiple(np.zeros((3, 10, 13))).shape == (3, 8, 12)
    assert crop_to_multiple(np.zeros((1, 8, 8))).shape == (1, 8, 8)


def test_augmentations_are_eight_distinct_shape_preserving_transforms():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    outputs = {augment(image, k, f).tobytes() for k in range(4) for f in (False, True)}
    assert len(outputs) == 8
    assert augment(image, 1, True).shape == image.shape
    assert allowed_turns(4, 6) == (0, 2)


def synthetic_pairs(slices: int = 5, size: int = 12) -> list:
    rng = np.random.default_rng(0)
    normal = rng.uniform(-1000, 500, (slices, size, size)).astype(np.float32)
    low = normal + rng.normal(0, 50, normal.shape).astype(np.float32)
    from ldct_train.data import Volume

    pos = np.arange(slices, dtype=float)
    return [scale_pair(Volume(low, (1, 1, 1), pos), Volume(normal, (1, 1, 1), pos), "P", InputScaling())]


def test_full_slice_dataset_gives_every_slice_cropped_with_neighbours():
    ds = PairedSlices(synthetic_pairs(size=14), in_slices=3)
    assert len(ds) == 5
    item = ds[0]
    assert item["low"].shape == (3, 12, 12) and item["normal"].shape == (3, 12, 12)
    np.testing.assert_array_equal(item["normal"][1].numpy(), ds.pairs[0].normal[0, :12, :12])


def test_patch_dataset_is_reproducible_per_epoch_and_augments_low_and_normal_alike():
    pairs = synthetic_pairs()
    ds = PairedSlices(pairs, patch_size=8, patches_per_epoch=7, augment=True, seed=1)
    again = PairedSlices(pairs, patch_size=8, patches_per_epoch=7, augment=True, seed=1)
    assert len(ds) == 7
    first = [ds[i]["low"] for i in range(7)]
    assert all((a == again[i]["low"]).all() for i, a in enumerate(first))
    ds.set_epoch(1)
    assert any(not (a == ds[i]["low"]).all() for i, a in enumerate(first))
    item = ds[3]
    assert item["low"].shape == (1, 8, 8)
    # the same crop and transform: low − normal is the scaled noise, never a misaligned image
    assert (item["low"] - item["normal"]).abs().mean() < 0.05


def test_patch_larger_than_the_slice_is_refused():
    with pytest.raises(CommandError, match="--patch-size 16"):
        PairedSlices(synthetic_pairs(size=12), patch_size=16)


def test_slabs_of_one_volume_read_it_once(tmp_path, monkeypatch):
    import ldct_train.data as data

    write_series(tmp_path / "nd", ramp(6))
    reads = []
    original = data.load_volume
    monkeypatch.setattr(data, "load_volume", lambda path: reads.append(path) or original(path))
    specs = [PairSpec("P", tmp_path / "nd", tmp_path / "nd", "train", (0, 4)), PairSpec("P", tmp_path / "nd", tmp_path / "nd", "val", (4, 6))]
    scaled = data.load_scaled_pairs(specs, InputScaling())
    assert reads == [tmp_path / "nd"]
    assert [p.normal.shape[0] for p in scaled] == [4, 2]
    np.testing.assert_allclose(scaled[1].normal[0], InputScaling().to_unit(ramp(6)[4]))
