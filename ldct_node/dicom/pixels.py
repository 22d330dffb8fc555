"""Stored pixel values <-> Hounsfield units, and which pixels must come back untouched.

Pure numpy apart from the three readers that take a pydicom data set. HU are float64 here so that
stored -> HU -> stored is exact bit for bit; the engine may narrow them to float32 for the network.
"""

from __future__ import annotations

import math

import numpy as np
import pydicom

# PixelPaddingValue and PixelPaddingRangeLimit are "US or SS": always 16 bits on the wire.
_PADDING_BITS = 16


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int]:
    """The smallest and largest value BitsStored bits hold, two's complement when PixelRepresentation is 1."""
    if not 1 <= bits_stored <= 32:
        raise ValueError(f"BitsStored must be 1-32, got {bits_stored}")
    if pixel_representation == 1:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    if pixel_representation == 0:
        return 0, (1 << bits_stored) - 1
    raise ValueError(f"PixelRepresentation must be 0 or 1, got {pixel_representation}")


def rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept); 1 and 0 when absent or empty, as the standard's identity rescale."""
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def stored_values(ds: pydicom.Dataset) -> np.ndarray:
    """The decoded stored values of a single-frame image as a 2-D int array of the data set's signedness.

    pydicom decodes every compressed syntax through the installed plugins, masks unused high bits of
    unsigned data and sign-extends signed data with BitsStored < BitsAllocated; the check below makes
    a plugin that forgets either fail loudly instead of shifting HU.
    """
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError(f"expected a single-frame grayscale image, got pixel array of shape {arr.shape}")
    signed = int(ds.PixelRepresentation) == 1
    if arr.dtype.kind not in "iu" or (arr.dtype.kind == "i") != signed:
        raise ValueError(f"decoded pixels have dtype {arr.dtype}, PixelRepresentation is {int(ds.PixelRepresentation)}")
    lo, hi = stored_range(int(ds.BitsStored), int(ds.PixelRepresentation))
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ValueError(f"decoded pixels {int(arr.min())}..{int(arr.max())} exceed BitsStored range {lo}..{hi}")
    return arr


# --- what makes an image unusable --------------------------------------------------------------------
# One rule each, (data set) -> a one-line reason or None. They read header values only (never pixel
# data, except decode_problem), may raise on malformed values, and are shared by the receiver (which
# answers a failure status) and the worker (which sets the instance aside): series.image_problem
# runs them in order.

SUPPORTED_BITS_ALLOCATED = (8, 16, 32)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def rescale_problem(ds: pydicom.Dataset) -> str | None:
    """RescaleSlope 0, NaN or infinite, or RescaleIntercept not finite: HU cannot be computed or recovered."""
    slope, intercept = rescale(ds)
    if not math.isfinite(slope) or slope == 0:
        return f"RescaleSlope is {slope:g}: HU cannot be computed from it"
    if not math.isfinite(intercept):
        return f"RescaleIntercept is {intercept:g}: HU cannot be computed from it"
    return None


def grayscale_problem(ds: pydicom.Dataset) -> str | None:
    """Anything but one sample per pixel in MONOCHROME1/2 (RGB, palette, YBR) is not a CT image to denoise."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        return f"SamplesPerPixel is {samples} (colour): a CT image has 1"
    photometric = str(ds.get("PhotometricInterpretation") or "")
    if photometric and photometric not in GRAYSCALE:
        return f"PhotometricInterpretation is {photometric}: a CT image is MONOCHROME1 or MONOCHROME2"
    return None


def frames_problem(ds: pydicom.Dataset) -> str | None:
    """CT Image Storage holds one frame; NumberOfFrames over 1 is another IOD in this SOP class."""
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) != 1:
        return f"NumberOfFrames is {int(frames)}: a CT image has one frame"
    return None


def bits_problem(ds: pydicom.Dataset) -> str | None:
    """BitsAllocated 8, 16 or 32, 1 <= BitsStored <= BitsAllocated, PixelRepresentation 0 or 1."""
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if allocated not in SUPPORTED_BITS_ALLOCATED:
        return f"BitsAllocated is {allocated}: 8, 16 or 32 expected"
    if not 1 <= stored <= allocated:
        return f"BitsStored {stored} does not fit BitsAllocated {allocated}"
    representation = int(ds.get("PixelRepresentation", 0))
    if representation not in (0, 1):
        return f"PixelRepresentation is {representation}: 0 or 1 expected"
    return None


def matrix_problem(ds: pydicom.Dataset) -> str | None:
    """Rows and Columns at least 1."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows < 1 or columns < 1:
        return f"image of {rows} x {columns} pixels (Rows x Columns): no pixel to denoise"
    return None


def native_pixel_bytes(ds: pydicom.Dataset) -> int:
    """What uncompressed PixelData of one grayscale frame holds: Rows x Columns x BitsAllocated / 8."""
    return int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8


def native_length_problem(ds: pydicom.Dataset, length: int) -> str | None:
    """Uncompressed PixelData of `length` bytes must be exactly what the header says (one pad byte to even length allowed)."""
    expected = native_pixel_bytes(ds)
    if length == expected or (expected % 2 and length == expected + 1):
        return None
    return f"pixel data has {length} bytes, Rows x Columns x BitsAllocated/8 is {expected}"


def decode_problem(ds: pydicom.Dataset) -> str | None:
    """Decode the pixel data (compressed ones: the codestream) as the worker will; None when it gives one
    Rows x Columns image within BitsStored. Costs a full decode: the receiver calls it for compressed
    instances only, whose header says nothing about whether their codestream is sound."""
    try:
        arr = stored_values(ds)
    except Exception as exc:  # noqa: BLE001 - every plugin raises its own types
        return f"pixel data cannot be decoded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        return f"pixel data decodes to {arr.shape}, header says {int(ds.Rows)} x {int(ds.Columns)}"
    return None


HEADER_RULES = (matrix_problem, grayscale_problem, frames_problem, bits_problem, rescale_problem)


def stored_to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU = stored x slope + intercept, in float64."""
    return stored.astype(np.float64) * slope + intercept


def hu_to_stored(
    hu: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int, dtype: np.dtype
) -> np.ndarray:
    """round((HU - intercept) / slope), clipped to what BitsStored/PixelRepresentation hold, as dtype."""
    if slope == 0:
        raise ValueError("RescaleSlope is 0: stored values cannot be recovered from HU")
    values = np.asarray(hu, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("HU image has NaN or infinite values: refusing to write them as pixels")
    lo, hi = stored_range(bits_stored, pixel_representation)
    return np.clip(np.rint((values - intercept) / slope), lo, hi).astype(dtype)


def _as_stored_padding(value: object, pixel_representation: int) -> int | None:
    """A "US or SS" padding element as a stored value: files read as unsigned give signed values as raw 16 bits."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        number = int.from_bytes(value[:2], "little", signed=pixel_representation == 1)
    else:
        number = int(value)
    if pixel_representation == 1 and number >= 1 << (_PADDING_BITS - 1):
        number -= 1 << _PADDING_BITS
    return number


def padding_values(ds: pydicom.Dataset) -> tuple[int | None, int | None]:
    """(PixelPaddingValue, PixelPaddingRangeLimit) as stored values with the sign PixelRepresentation gives them."""
    representation = int(ds.get("PixelRepresentation", 0))
    value = ds["PixelPaddingValue"].value if "PixelPaddingValue" in ds else None
    limit = ds["PixelPaddingRangeLimit"].value if "PixelPaddingRangeLimit" in ds else None
    return _as_stored_padding(value, representation), _as_stored_padding(limit, representation)


def padding_mask(
    stored: np.ndarray,
    hu: np.ndarray,
    padding_value: int | None,
    padding_range_limit: int | None,
    outside_fov_below_hu: float | None,
) -> np.ndarray:
    """True where a pixel must come back unchanged: padding value or range (inclusive, either order) or HU <= threshold."""
    mask = np.zeros(stored.shape, dtype=bool)
    if padding_value is not None:
        if padding_range_limit is None:
            mask |= stored == padding_value
        else:
            lo, hi = sorted((padding_value, padding_range_limit))
            mask |= (stored >= lo) & (stored <= hi)
    if outside_fov_below_hu is not None:
        mask |= hu <= outside_fov_below_hu
    return mask


def restore_masked(original: np.ndarray, new: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """new, with the pixels under mask taken from original (dtype of new)."""
    if not original.shape == new.shape == mask.shape:
        raise ValueError(f"shapes differ: original {original.shape}, new {new.shape}, mask {mask.shape}")
    return np.where(mask, original, new).astype(new.dtype, copy=False)
