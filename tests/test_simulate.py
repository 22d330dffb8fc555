"""Projection-domain low-dose simulation: the projector, the noise it inserts, and the DICOM round trip."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ldct_node.cli import main
from ldct_node.dicom.derive import IMPLEMENTATION_CLASS_UID, is_own_output, write_dataset
from ldct_node.dicom.pixels import hu_to_stored, rescale, stored_to_hu, stored_values
from ldct_node.dicom.series import classify
from ldct_node.errors import CommandError
from ldct_train.data import load_pair, load_pairs
from ldct_train.simulate import (
    SIMULATION_CODE,
    Kernel,
    ParallelBeamProjector,
    SimulationSettings,
    _upsample_sinogram,
    derivation_text,
    detector_coordinates,
    dose_weights,
    fbp,
    kernel_window,
    simulate_low_dose,
    simulated_dataset,
    simulated_description,
    simulated_uid,
    view_angles,
)
from tests.synthetic import compress_j2k_lossy, ct_dataset, ct_series, save, write_series

PIXEL_MM = 0.8
SIZE = 256
# Half the default views: a 256² slice needs no more, and the tests run twice as fast.
CPU = SimulationSettings(device="cpu", views=256)


def radius_mm(size: int = SIZE, pixel_mm: float = PIXEL_MM) -> np.ndarray:
    u = detector_coordinates(size, "cpu").numpy() * size * pixel_mm / 2
    return np.hypot(u[None, :], u[:, None])


def water_cylinder(radius: float = 80.0) -> np.ndarray:
    """A 16 cm water cylinder in air on a 20 cm field of view."""
    return np.where(radius_mm() < radius, 0.0, -1000.0).astype(np.float32)


def inserted_noise(hu: np.ndarray, dose: float, settings: SimulationSettings = CPU, seed: int = 1) -> np.ndarray:
    return simulate_low_dose(hu, PIXEL_MM, dose, settings, torch.Generator().manual_seed(seed)) - hu


def central_roi() -> np.ndarray:
    return radius_mm() < 30.0


def direct_projection(image: torch.Tensor, views: int) -> torch.Tensor:
    """Reference: each view rotated on its own, no symmetry shortcut."""
    size = image.shape[-1]
    u = detector_coordinates(size, "cpu")
    angles = view_angles(views).float()
    c, s = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    x, y = u[None, None, :], u[None, :, None]
    grid = torch.stack((c * x - s * y, s * x + c * y), dim=-1)
    return torch.stack([F.grid_sample(im.expand(views, 1, size, size), grid, align_corners=False).sum(2)[:, 0] for im in image])


def direct_backprojection(sino: torch.Tensor) -> torch.Tensor:
    views, size = sino.shape[1:]
    u = detector_coordinates(size, "cpu")
    angles = view_angles(views).float()
    t = torch.cos(angles)[:, None, None] * u[None, None, :] + torch.sin(angles)[:, None, None] * u[None, :, None]
    grid = torch.stack((t, torch.zeros_like(t)), dim=-1)
    return torch.stack([F.grid_sample(q[:, None, None, :], grid, align_corners=False).sum(0)[0] for q in sino])


# ---------------------------------------------------------------- projector


def test_symmetric_projection_equals_projecting_every_view_on_its_own():
    image = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    projector = ParallelBeamProjector(32, 24, "cpu")
    assert torch.allclose(projector.project(image), direct_projection(image, 24), atol=1e-4)


def test_symmetric_backprojection_equals_backprojecting_every_view_on_its_own():
    sino = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    projector = ParallelBeamProjector(32, 24, "cpu", memory_budget_mb=1)
    assert torch.allclose(projector.backproject(sino), direct_backprojection(sino), atol=1e-4)


@pytest.mark.parametrize("kind", ["ramp", "shepp-logan", "hann"])
def test_filtered_backprojection_recovers_the_attenuation_of_water(kind):
    mu_water = CPU.mu_water_per_mm
    disc = torch.from_numpy(np.where(radius_mm() < 60.0, mu_water, 0.0).astype(np.float32))[None]
    projector = ParallelBeamProjector(SIZE, 256, "cpu")
    image = fbp(projector, projector.project(disc) * PIXEL_MM, kind, PIXEL_MM)[0].numpy()
    centre_hu = 1000.0 * (image[radius_mm() < 40.0].mean() / mu_water - 1.0)
    assert abs(centre_hu) < 5.0
    air = (radius_mm() > 80.0) & (radius_mm() < 100.0)  # inside the reconstruction circle
    assert abs(image[air].mean()) < 0.01 * mu_water


def test_reduced_resolution_attenuation_sinogram_matches_the_full_one():
    mu = torch.from_numpy((np.where(radius_mm() < 80.0, 0.02, 0.0) + np.where(radius_mm() < 20.0, 0.02, 0.0)).astype(np.float32))[None]
    full = ParallelBeamProjector(SIZE, 128, "cpu").project(mu) * PIXEL_MM
    coarse = ParallelBeamProjector(SIZE // 2, 64, "cpu").project(F.avg_pool2d(mu[None], 2)[0]) * (2 * PIXEL_MM)
    upsampled = _upsample_sinogram(coarse, 2)
    assert upsampled.shape == full.shape
    error = (upsampled - full).abs()
    # Only exp(−p) is used, so an error of 0.1 misstates a ray's expected photon count by 10 %;
    # that happens only at sharp edges, typical rays are far closer.
    assert float(error.max()) < 0.15
    inside = full > 0.5
    assert float((error[inside] / full[inside]).median()) < 0.005


# ---------------------------------------------------------------- noise


def test_added_noise_sd_follows_the_dose_law_within_15_percent():
    """A scan at dose d has 1/d the variance of its full dose; the simulation adds the difference."""
    phantom = water_cylinder()
    sd = {dose: float(inserted_noise(phantom, dose)[central_roi()].std()) for dose in (0.5, 0.25, 0.1, 0.05)}
    for dose in (0.25, 0.1, 0.05):
        ratio = (sd[dose] / sd[0.5]) / math.sqrt((1 - dose) / dose)
        assert 0.85 < ratio < 1.15, (dose, sd)


@pytest.mark.parametrize("dose", [0.05, 0.1, 0.25, 0.5])
def test_simulated_low_dose_has_the_normal_dose_mean_in_soft_tissue_at_every_dose(dose):
    """The bias −log(Poisson) would add grows as 1/dose; the Gaussian post-log draw has none."""
    phantom = np.where(radius_mm() < 80.0, 40.0, -1000.0).astype(np.float32)
    tissue = radius_mm() < 70.0
    means = [float(inserted_noise(phantom, dose, seed=seed)[tissue].mean()) for seed in range(4)]
    assert abs(np.mean(means)) <= 1.0, means


def test_full_dose_adds_no_noise():
    assert np.array_equal(inserted_noise(water_cylinder(), 1.0), np.zeros((SIZE, SIZE), np.float32))


def test_kernels_order_the_noise_texture_from_sharp_to_smooth():
    centre = (slice(SIZE // 2 - 48, SIZE // 2 + 48),) * 2
    ratios = [_band_power_ratio(inserted_noise(water_cylinder(), 0.1, dataclasses.replace(CPU, kernel=k))[centre])
              for k in ("ramp", "hamming", "smooth")]
    assert ratios[0] < ratios[1] < ratios[2], ratios


def test_kernel_window_is_one_at_zero_frequency_and_zero_beyond_its_cutoff():
    window = kernel_window(64, 64, Kernel(0.5, 0.3), "cpu")
    assert float(window[0, 0]) == 1.0
    f = torch.sqrt(torch.fft.fftfreq(64)[:, None] ** 2 + torch.fft.rfftfreq(64)[None, :] ** 2)
    assert float(window[f >= 0.3].abs().max()) == 0.0


def test_dose_weights_vanish_at_full_dose_and_grow_as_dose_falls():
    assert dose_weights(1.0) == (0.0, 0.0)
    quantum, electronic = zip(*(dose_weights(d) for d in (0.5, 0.25, 0.05)))
    assert list(quantum) == sorted(quantum) and list(electronic) == sorted(electronic)


def test_electronic_noise_adds_noise_beyond_photon_statistics_at_very_low_dose():
    phantom = water_cylinder(radius=95.0)
    quantum = inserted_noise(phantom, 0.02, dataclasses.replace(CPU, electronic_noise=0.0))[central_roi()].std()
    with_electronics = inserted_noise(phantom, 0.02, dataclasses.replace(CPU, electronic_noise=30.0))[central_roi()].std()
    assert with_electronics > 1.1 * quantum


def _band_power_ratio(noise: np.ndarray) -> float:
    """Power below 0.15 cycles/pixel (DC excluded) over power above 0.3, from the 2-D noise power spectrum."""
    power = np.abs(np.fft.fft2(noise - noise.mean())) ** 2
    f = np.fft.fftfreq(noise.shape[0])
    radius = np.hypot(f[None, :], f[:, None])
    low = power[(radius > 0) & (radius < 0.15)].mean()
    high = power[radius > 0.3].mean()
    return float(low / high)


def test_inserted_noise_is_spatially_correlated_unlike_white_noise_of_the_same_sd():
    noise = inserted_noise(water_cylinder(), 0.05)[SIZE // 2 - 48: SIZE // 2 + 48, SIZE // 2 - 48: SIZE // 2 + 48]
    white = np.random.default_rng(0).normal(0.0, noise.std(), noise.shape)
    assert 0.7 < _band_power_ratio(white) < 1.4
    assert _band_power_ratio(noise) > 10.0


def test_same_seed_gives_the_same_noise_and_another_seed_other_noise():
    phantom = water_cylinder()
    first, again, other = (inserted_noise(phantom, 0.1, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_outside_the_field_of_view_comes_back_unchanged_in_shape_and_type():
    slices = np.stack([water_cylinder()] * 2)
    slices[:, radius_mm() > 100.0] = -3024.0  # vendor fill outside the reconstruction circle
    out = simulate_low_dose(slices, PIXEL_MM, 0.1, CPU, torch.Generator().manual_seed(0))
    assert out.shape == slices.shape and out.dtype == np.float32
    outside = radius_mm() > 100.0
    np.testing.assert_array_equal(out[:, outside], slices[:, outside])
    tensor = simulate_low_dose(torch.from_numpy(slices[0]), PIXEL_MM, 0.1, CPU, torch.Generator().manual_seed(0))
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (SIZE, SIZE)


def test_non_square_slices_are_simulated_in_their_own_shape():
    out = simulate_low_dose(water_cylinder()[:, 16:-16], PIXEL_MM, 0.1, CPU)
    assert out.shape == (SIZE, SIZE - 32)


@pytest.mark.parametrize("dose", [0.0, -0.1, 1.5])
def test_a_dose_fraction_outside_zero_to_one_is_refused(dose):
    with pytest.raises(CommandError, match="dose fraction"):
        simulate_low_dose(water_cylinder(), PIXEL_MM, dose, CPU)


def test_views_that_break_the_projector_symmetry_are_refused():
    with pytest.raises(CommandError, match="views"):
        simulate_low_dose(water_cylinder(), PIXEL_MM, 0.1, dataclasses.replace(CPU, views=100))


def test_simulated_uids_never_change_between_versions():
    """A re-run of the same simulation replaces its earlier series: these values are pinned."""
    assert simulated_uid("series", "1.2.3", 0.25, 7, SimulationSettings()) == "2.25.206137979695189363698192303318661589908"
    assert simulated_uid("instance", "1.2.3.4", 0.05, 0, CPU) == "2.25.267129123109121597380548424061700194474"
    assert simulated_uid("instance", "1.2.3.4", 0.05, 1, CPU) != simulated_uid("instance", "1.2.3.4", 0.05, 0, CPU)


def test_series_description_names_the_dose_within_64_characters():
    assert simulated_description("Abdomen", 0.05) == "Abdomen simulated 5 % dose"
    long = simulated_description("x" * 80, 0.25)
    assert len(long) == 64 and long.endswith(" simulated 25 % dose")


# ---------------------------------------------------------------- DICOM round trip


@pytest.fixture
def nd_tree(tmp_path):
    series = ct_series(3, rows=64, columns=64, signed=True)  # signed: the −3024 HU vendor fill is stored as is
    write_series(tmp_path / "nd" / "abdomen", series, names=["a.dcm", "b.dcm", "c.dcm"])
    return tmp_path


def _simulate(tree, *extra) -> int:
    return main(["simulate", str(tree / "nd"), str(tree / "ld"), "--dose", "0.05", "--device", "cpu", *extra])


def test_simulated_series_is_written_as_dicom_with_new_uids_and_everything_else_kept(nd_tree):
    assert _simulate(nd_tree) == 0
    names = sorted(p.name for p in (nd_tree / "ld" / "abdomen").iterdir())
    assert names == ["a.dcm", "b.dcm", "c.dcm"]
    sources = [pydicom.dcmread(nd_tree / "nd" / "abdomen" / n) for n in names]
    outputs = [pydicom.dcmread(nd_tree / "ld" / "abdomen" / n) for n in names]
    assert len({o.SeriesInstanceUID for o in outputs}) == 1
    assert outputs[0].SeriesInstanceUID != sources[0].SeriesInstanceUID
    for src, out in zip(sources, outputs):
        assert out.SOPInstanceUID != src.SOPInstanceUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.SeriesDescription == f"{src.SeriesDescription} simulated 5 % dose"
        assert out.DerivationDescription.startswith("Simulated 5 % dose by ldct-node")
        assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        for keyword in ("PatientName", "StudyInstanceUID", "ImagePositionPatient", "PixelSpacing", "RescaleIntercept", "InstanceNumber"):
            assert out[keyword].value == src[keyword].value, keyword
        fill = src.pixel_array == -3024 + 1024  # intercept −1024
        inside = ~fill
        assert np.abs(out.pixel_array[inside].astype(int) - src.pixel_array[inside]).mean() > 2  # a 4.5 cm phantom: little noise
        np.testing.assert_array_equal(out.pixel_array[fill], src.pixel_array[fill])


def test_simulation_is_deterministic_for_a_seed(nd_tree):
    _simulate(nd_tree, "--seed", "7")
    first = (nd_tree / "ld" / "abdomen" / "b.dcm").read_bytes()
    _simulate(nd_tree, "--seed", "7")
    assert (nd_tree / "ld" / "abdomen" / "b.dcm").read_bytes() == first


def test_pairs_file_names_the_new_pair_once_and_loads_slice_matched(nd_tree):
    pairs_file = nd_tree / "pairs.toml"
    for _ in range(2):
        assert _simulate(nd_tree, "--pairs", str(pairs_file), "--patient", "P1") == 0
    (pair,) = load_pairs(pairs_file)
    assert (pair.patient, pair.low, pair.normal) == ("P1", nd_tree / "ld" / "abdomen", nd_tree / "nd" / "abdomen")
    low, normal = load_pair(pair)
    assert low.hu.shape == normal.hu.shape == (3, 64, 64)


def test_output_inside_the_input_folder_is_refused_and_nothing_written(nd_tree, capsys):
    assert main(["simulate", str(nd_tree / "nd"), str(nd_tree / "nd" / "ld"), "--dose", "0.05"]) == 2
    assert "inside the normal-dose folder" in capsys.readouterr().err
    assert not (nd_tree / "nd" / "ld").exists()


def test_pairs_without_a_patient_is_refused(nd_tree, capsys):
    assert _simulate(nd_tree, "--pairs", str(nd_tree / "pairs.toml")) == 2
    assert "--patient" in capsys.readouterr().err


def test_default_flux_implies_routine_noise_for_the_real_series(shared_series):
    """The calibration the default incident flux documents: half the dose adds the full dose's own
    noise again, about 12 HU over the liver."""
    ds = pydicom.dcmread(shared_series / "1-061.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    noise = simulate_low_dose(hu, float(ds.PixelSpacing[0]), 0.5, dataclasses.replace(CPU, views=512),
                              torch.Generator().manual_seed(0)) - hu
    assert 8.0 < noise[200:260, 120:180].std() < 18.0


# ---------------------------------------------------------------- rules of rewritten pixels


def _rewritten_source(**kwargs) -> pydicom.Dataset:
    """A slice carrying everything a rewrite of its pixels must drop or replace, read back from a file."""
    source = ct_dataset(rows=32, columns=32, **kwargs)
    source.SmallestImagePixelValue, source.LargestImagePixelValue = 0, 4095
    source.SmallestPixelValueInSeries, source.LargestPixelValueInSeries = 0, 4095
    source.IconImageSequence = Sequence([Dataset()])
    source.DigitalSignaturesSequence = Sequence([Dataset()])
    source.InstanceCreatorUID = "1.2.3"
    source.file_meta.SourceApplicationEntityTitle = "SCANNER"
    return source


def _simulated(source: pydicom.Dataset, tmp_path, dose: float = 0.25, seed: int = 3) -> pydicom.Dataset:
    hu = stored_to_hu(stored_values(source), *rescale(source)) + 5.0
    path = tmp_path / "simulated.dcm"
    write_dataset(simulated_dataset(source, hu, "1.2.3", "1.2.3.4", dose, seed, CPU), path)
    return pydicom.dcmread(path)


def test_simulated_slice_drops_what_its_rewritten_pixels_make_false(tmp_path):
    out = _simulated(_rewritten_source(), tmp_path)
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                    "LargestPixelValueInSeries", "IconImageSequence", "DigitalSignaturesSequence", "InstanceCreatorUID"):
        assert keyword not in out, keyword


def test_simulated_slice_names_its_derivation_and_its_source(tmp_path):
    source = _rewritten_source()
    out = _simulated(source, tmp_path)
    assert out.DerivationDescription == derivation_text(0.25, 3, CPU)
    for part in ("Simulated 25 % dose", "kernel hann", "256 views", "seed 3"):
        assert part in out.DerivationDescription, part
    (code,) = out.DerivationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        SIMULATION_CODE.value, SIMULATION_CODE.scheme_designator, SIMULATION_CODE.meaning)
    (item,) = out.SourceImageSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (CTImageStorage, source.SOPInstanceUID)
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert (out.SeriesInstanceUID, out.SOPInstanceUID) == ("1.2.3", "1.2.3.4")


def test_simulated_slice_is_derived_so_the_node_leaves_it_alone_but_training_reads_it(tmp_path):
    out = _simulated(_rewritten_source(), tmp_path)
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert classify(out).label == "not an original/primary image"
    assert classify(out, accept_derived=True) is None and not is_own_output(out)


def test_simulated_slice_gets_new_file_meta_and_native_explicit_little_endian_pixels(tmp_path):
    source = _rewritten_source(transfer_syntax=ImplicitVRLittleEndian)
    out = _simulated(source, tmp_path)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out["PixelData"].VR == "OW"
    expected = hu_to_stored(stored_to_hu(stored_values(source), *rescale(source)) + 5.0, *rescale(source),
                            int(source.BitsStored), int(source.PixelRepresentation), np.uint16)
    np.testing.assert_array_equal(out.pixel_array, expected)
    assert out.LossyImageCompression == "00"


def test_simulated_slice_of_a_lossy_source_records_the_lossy_history(tmp_path):
    source = pydicom.dcmread(save(compress_j2k_lossy(ct_dataset(rows=64, columns=64), ratio=10.0), tmp_path / "lossy.dcm"))
    out = _simulated(source, tmp_path)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_15444_1"
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.peers
def test_simulated_slice_passes_dciodvfy_without_errors_or_new_warnings_but_its_local_code(tmp_path, dciodvfy):
    source_path = save(ct_dataset(rows=32, columns=32, signed=True, bits_stored=16, padding_value=-2000), tmp_path / "src.dcm")
    _, source_warnings = dciodvfy(source_path)
    _simulated(pydicom.dcmread(source_path), tmp_path)
    errors, warnings = dciodvfy(tmp_path / "simulated.dcm")
    assert errors == []
    # The one new warning: dciodvfy knows no local ("99") coding scheme, and DICOM has no code for a simulation.
    assert {w for w in warnings if SIMULATION_CODE.scheme_designator not in w} <= set(source_warnings)
