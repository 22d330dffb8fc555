"""Stored values <-> HU, padding rules and decoding (ldct_node.dicom.pixels)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from ldct_node.dicom.pixels import (
    bits_problem,
    decode_problem,
    frames_problem,
    grayscale_problem,
    hu_to_stored,
    matrix_problem,
    native_length_problem,
    padding_mask,
    padding_values,
    rescale,
    rescale_problem,
    restore_masked,
    stored_range,
    stored_to_hu,
    stored_values,
)
from tests.synthetic import broken_jpeg_ls, compress_jpeg_ls_lossless, ct_dataset, phantom_hu, save, to_stored


@pytest.mark.parametrize(
    ("bits", "representation", "expected"),
    [(12, 0, (0, 4095)), (16, 0, (0, 65535)), (12, 1, (-2048, 2047)), (16, 1, (-32768, 32767)), (1, 0, (0, 1))],
)
def test_stored_range_follows_bits_stored_and_sign(bits, representation, expected):
    assert stored_range(bits, representation) == expected


def test_stored_range_rejects_impossible_header_values():
    with pytest.raises(ValueError):
        stored_range(12, 2)
    with pytest.raises(ValueError):
        stored_range(0, 0)


def test_rescale_defaults_to_identity_when_absent():
    assert rescale(Dataset()) == (1.0, 0.0)
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    assert rescale(ds) == (0.5, -1024.0)


@pytest.mark.parametrize("slope", [1.0, 0.5, 2.0, 1.25, 0.1])
@pytest.mark.parametrize(("bits", "representation", "intercept"), [(12, 0, -1024.0), (16, 0, -8192.0), (12, 1, 0.0), (16, 1, -1024.0)])
def test_stored_to_hu_to_stored_is_bit_exact_over_the_whole_range(slope, bits, representation, intercept):
    lo, hi = stored_range(bits, representation)
    dtype = np.int16 if representation else np.uint16
    stored = np.arange(lo, hi + 1, dtype=np.int64).astype(dtype)
    back = hu_to_stored(stored_to_hu(stored, slope, intercept), slope, intercept, bits, representation, dtype)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, stored)


def test_stored_to_hu_applies_slope_and_intercept_in_float64():
    hu = stored_to_hu(np.array([0, 1000, 4095], dtype=np.uint16), 0.5, -1024.0)
    assert hu.dtype == np.float64
    np.testing.assert_array_equal(hu, [-1024.0, -524.0, 1023.5])


def test_hu_to_stored_rounds_to_nearest():
    out = hu_to_stored(np.array([-1023.6, -1023.4, 0.4]), 1.0, -1024.0, 12, 0, np.uint16)
    np.testing.assert_array_equal(out, [0, 1, 1024])


def test_hu_to_stored_clips_to_bits_stored_not_to_dtype():
    out = hu_to_stored(np.array([-5000.0, 10000.0]), 1.0, -1024.0, 12, 0, np.uint16)
    np.testing.assert_array_equal(out, [0, 4095])
    signed = hu_to_stored(np.array([-5000.0, 10000.0]), 1.0, 0.0, 12, 1, np.int16)
    np.testing.assert_array_equal(signed, [-2048, 2047])


def test_hu_to_stored_refuses_non_finite_values():
    with pytest.raises(ValueError, match="NaN"):
        hu_to_stored(np.array([0.0, np.nan]), 1.0, 0.0, 12, 1, np.int16)


@pytest.mark.parametrize(("signed", "bits"), [(False, 12), (True, 12), (True, 16), (False, 16)])
def test_stored_values_decode_the_written_pixels(tmp_path, signed, bits):
    ds = ct_dataset(rows=16, columns=20, signed=signed, bits_stored=bits, intercept=-1024.0 if not signed else 0.0)
    expected = np.frombuffer(ds.PixelData, dtype=np.int16 if signed else np.uint16).reshape(16, 20)
    got = stored_values(pydicom.dcmread(save(ds, tmp_path / "a.dcm")))
    assert got.shape == (16, 20)
    assert got.dtype.kind == ("i" if signed else "u")
    np.testing.assert_array_equal(got, expected)


def test_stored_values_sign_extends_signed_data_with_unused_high_bits(tmp_path):
    values = np.array([[-2000, -1, 0, 2047]], dtype=np.int16)
    ds = ct_dataset(rows=1, columns=4, signed=True, bits_stored=12)
    # a scanner may leave the 4 unused high bits zero instead of repeating the sign bit
    ds.PixelData = (values.view(np.uint16) & 0x0FFF).astype(np.uint16).tobytes()
    got = stored_values(pydicom.dcmread(save(ds, tmp_path / "a.dcm")))
    np.testing.assert_array_equal(got, values)


def test_stored_values_ignores_garbage_in_unused_high_bits_of_unsigned_data(tmp_path):
    ds = ct_dataset(rows=1, columns=2, bits_stored=12)
    ds.PixelData = np.array([[0x1000 | 5, 0xF000 | 4095]], dtype=np.uint16).tobytes()
    got = stored_values(pydicom.dcmread(save(ds, tmp_path / "a.dcm")))
    np.testing.assert_array_equal(got, [[5, 4095]])


def test_padding_values_absent_are_none():
    assert padding_values(ct_dataset(rows=4, columns=4)) == (None, None)


def test_padding_values_keep_their_sign_from_an_implicit_vr_file(tmp_path):
    ds = ct_dataset(rows=4, columns=4, signed=True, padding_value=-2000, padding_range_limit=-1000,
                    transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    assert padding_values(pydicom.dcmread(save(ds, tmp_path / "a.dcm"))) == (-2000, -1000)


def test_padding_values_reinterpret_raw_unsigned_as_signed():
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.add_new("PixelPaddingValue", "US", 63536)  # -2000 as 16-bit two's complement
    ds.add_new("PixelPaddingRangeLimit", "OB", (-1000).to_bytes(2, "little", signed=True))
    assert padding_values(ds) == (-2000, -1000)


def test_padding_values_stay_unsigned_for_unsigned_pixels():
    ds = Dataset()
    ds.PixelRepresentation = 0
    ds.add_new("PixelPaddingValue", "US", 63536)
    assert padding_values(ds) == (63536, None)


def test_padding_mask_marks_the_padding_value_only():
    stored = np.array([-2000, -1999, 0, -2000], dtype=np.int16)
    hu = stored_to_hu(stored, 1.0, 0.0)
    np.testing.assert_array_equal(padding_mask(stored, hu, -2000, None, None), [True, False, False, True])


@pytest.mark.parametrize(("value", "limit"), [(-2000, -1990), (-1990, -2000)])
def test_padding_mask_range_is_inclusive_in_either_order(value, limit):
    stored = np.array([-2001, -2000, -1995, -1990, -1989], dtype=np.int16)
    hu = stored_to_hu(stored, 1.0, 0.0)
    np.testing.assert_array_equal(padding_mask(stored, hu, value, limit, None), [False, True, True, True, False])


def test_padding_mask_marks_vendor_fill_at_or_below_the_threshold():
    stored = np.array([0, 524, 525, 1024], dtype=np.uint16)
    hu = stored_to_hu(stored, 1.0, -2024.0)  # -2024, -1500, -1499, -1000 HU
    np.testing.assert_array_equal(padding_mask(stored, hu, None, None, -1500.0), [True, True, False, False])


def test_padding_mask_leaves_air_and_lung_alone():
    hu = phantom_hu(32, 32, fov_fill_hu=None)
    stored = to_stored(hu, 1.0, -1024.0, 12, signed=False)
    assert not padding_mask(stored, stored_to_hu(stored, 1.0, -1024.0), None, None, -1500.0).any()


def test_padding_mask_finds_the_field_of_view_circle_of_a_phantom():
    hu = phantom_hu(32, 32, fov_fill_hu=-3024.0)
    stored = to_stored(hu, 1.0, -1024.0, 16, signed=True)
    mask = padding_mask(stored, stored_to_hu(stored, 1.0, -1024.0), None, None, -1500.0)
    np.testing.assert_array_equal(mask, hu == -3024.0)
    assert mask[0, 0] and not mask[16, 16]


def test_restore_masked_takes_masked_pixels_from_the_original():
    original = np.array([1, 2, 3], dtype=np.int16)
    new = np.array([10, 20, 30], dtype=np.int16)
    out = restore_masked(original, new, np.array([True, False, True]))
    np.testing.assert_array_equal(out, [1, 20, 3])
    assert out.dtype == np.int16


def test_restore_masked_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        restore_masked(np.zeros(3), np.zeros(4), np.zeros(3, dtype=bool))


# --- what makes an image unusable: one rule each ----------------------------------------------------


@pytest.mark.parametrize(("slope", "intercept", "found"), [
    ("1", "-1024", None), ("0.5", "0", None), ("", "", None),  # empty: the identity rescale
    ("0", "-1024", "RescaleSlope is 0"), ("NaN", "0", "RescaleSlope is nan"), ("inf", "0", "RescaleSlope is inf"),
    ("1", "NaN", "RescaleIntercept is nan"),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_rescale_problem_names_a_slope_or_intercept_that_cannot_give_hu(slope, intercept, found):
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    problem = rescale_problem(ds)
    assert (problem is None) if found is None else problem.startswith(found)


def test_grayscale_problem_refuses_colour_and_other_photometrics():
    ds = ct_dataset(rows=4, columns=4)
    assert grayscale_problem(ds) is None
    ds.SamplesPerPixel = 3
    assert grayscale_problem(ds).startswith("SamplesPerPixel is 3")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    assert "PALETTE COLOR" in grayscale_problem(ds)


def test_frames_problem_refuses_more_than_one_frame():
    ds = ct_dataset(rows=4, columns=4)
    assert frames_problem(ds) is None
    ds.NumberOfFrames = 1
    assert frames_problem(ds) is None
    ds.NumberOfFrames = 2
    assert frames_problem(ds).startswith("NumberOfFrames is 2")


@pytest.mark.parametrize(("allocated", "stored", "representation", "ok"), [
    (16, 12, 0, True), (16, 16, 1, True), (8, 8, 0, True),
    (16, 17, 0, False), (16, 0, 0, False), (12, 12, 0, False), (16, 12, 2, False),
])
def test_bits_problem_needs_bits_stored_within_a_supported_bits_allocated(allocated, stored, representation, ok):
    ds = Dataset()
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = allocated, stored, representation
    assert (bits_problem(ds) is None) is ok


def test_matrix_problem_refuses_zero_rows_or_columns():
    ds = Dataset()
    ds.Rows, ds.Columns = 16, 16
    assert matrix_problem(ds) is None
    ds.Rows = 0
    assert "0 x 16" in matrix_problem(ds)


@pytest.mark.parametrize(("rows", "columns", "bits", "length", "ok"), [
    (16, 16, 16, 512, True), (16, 16, 16, 511, False), (16, 16, 16, 1024, False), (16, 16, 16, 514, False),
    (3, 3, 8, 10, True),  # 9 bytes padded to even length
    (3, 3, 8, 9, True), (3, 3, 8, 11, False),
])
def test_native_length_problem_wants_exactly_rows_columns_bits(rows, columns, bits, length, ok):
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated = rows, columns, bits
    assert (native_length_problem(ds, length) is None) is ok


def test_decode_problem_finds_a_codestream_no_decoder_takes(tmp_path):
    good = save(ct_dataset(rows=16, columns=16), tmp_path / "good.dcm")
    assert decode_problem(pydicom.dcmread(compress_jpeg_ls_lossless(good, tmp_path / "jls.dcm"))) is None
    broken = pydicom.dcmread(broken_jpeg_ls(good, tmp_path / "broken.dcm"))
    assert decode_problem(broken).startswith("pixel data cannot be decoded")
