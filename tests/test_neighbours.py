"""Neighbour slices enter a multi-slice model's input only when they are adjacent along the slice normal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ldct_node.config import Config, ConfigError, DeriveSettings, InferenceSettings, validate
from ldct_node.dicom.series import scan_files
from ldct_node.net.inference import DenoiseEngine, neighbour_indices, slice_spacing
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import ModelCard, save_weights
from ldct_node.node.denoise_series import chunk_bounds, denoise_instances, derivation_for
from tests import synthetic

SIZE = 32


def test_a_count_keeps_the_old_contract_index_plus_minus_k_with_ends_repeated():
    assert neighbour_indices(4, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert neighbour_indices(3, 5).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]
    assert neighbour_indices(2, 1).tolist() == [[0], [1]]


@pytest.mark.parametrize("in_slices", [1, 3, 5])
def test_regular_positions_give_what_a_contiguous_count_gives(in_slices):
    positions = [10.0 + 2.5 * i for i in range(7)]
    np.testing.assert_array_equal(neighbour_indices(positions, in_slices), neighbour_indices(7, in_slices))


def test_spacing_is_the_median_positive_step_between_sorted_positions():
    assert slice_spacing([0.0, 3.0, 6.0, 46.0, 49.0]) == 3.0
    assert slice_spacing([6.0, 0.0, 3.0, 3.0]) == 3.0  # unsorted, a duplicate (step 0) ignored
    assert slice_spacing([0.0, 3.0, None, 6.0]) == 3.0
    assert slice_spacing([5.0]) is None
    assert slice_spacing([5.0, 5.0]) is None
    assert slice_spacing([None, None]) is None


def test_across_a_gap_the_middle_slice_stands_in():
    # 6 -> 46 mm is a gap of 40 mm in a 3 mm stack: neither side may see the other.
    table = neighbour_indices([0.0, 3.0, 6.0, 46.0, 49.0], 3)
    assert table.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 4]]


def test_a_duplicated_position_is_no_neighbour_of_its_twin():
    table = neighbour_indices([0.0, 3.0, 3.0, 6.0], 3)
    assert table.tolist() == [[0, 0, 1], [0, 1, 3], [0, 2, 3], [1, 3, 3]]


def test_unsorted_input_finds_neighbours_by_position_not_by_index():
    table = neighbour_indices([6.0, 0.0, 3.0], 3)
    assert table.tolist() == [[2, 0, 0], [1, 1, 2], [1, 2, 0]]


def test_a_single_slice_and_an_empty_stack():
    assert neighbour_indices([12.0], 3).tolist() == [[0, 0, 0]]
    assert neighbour_indices([], 3).shape == (0, 3)


def test_slices_without_a_position_have_no_neighbours_and_are_nobodys_neighbour():
    table = neighbour_indices([0.0, None, 6.0, 9.0], 3, spacing=3.0)
    assert table.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 3], [2, 3, 3]]
    assert neighbour_indices([None, None, None], 3).tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]


def test_a_neighbour_within_the_tolerance_counts_and_one_beyond_does_not():
    positions = [0.0, 3.0, 6.0 + 0.6, 9.0]  # 0.6 mm = 20 % of the 3 mm spacing
    assert neighbour_indices(positions, 3, tolerance=0.25)[1].tolist() == [0, 1, 2]
    assert neighbour_indices(positions, 3, tolerance=0.1)[1].tolist() == [0, 1, 1]


def test_with_five_slices_an_outer_neighbour_needs_the_inner_one():
    # From 6 mm: 3 and 0 are adjacent below; 9 is missing above, so 12 must not enter either.
    table = neighbour_indices([0.0, 3.0, 6.0, 12.0, 15.0], 5)
    assert table[2].tolist() == [0, 1, 2, 2, 2]


def test_a_chunk_given_the_stack_spacing_chooses_what_the_whole_stack_chooses():
    positions = [0.0, 3.0, 3.0, 6.0, 9.0, 49.0, 52.0, 55.0]
    whole = neighbour_indices(positions, 3)
    for read_start, read_stop, keep_start, keep_stop in chunk_bounds(whole, 2):
        part = neighbour_indices(positions[read_start:read_stop], 3, spacing=slice_spacing(positions))
        np.testing.assert_array_equal(part[keep_start - read_start : keep_stop - read_start] + read_start,
                                      whole[keep_start:keep_stop])


def test_chunks_read_every_slice_their_kept_slices_need():
    # Slice 1's upper neighbour is slice 3 (its twin 2 is no neighbour): a fixed halo of 1 would miss it.
    table = neighbour_indices([0.0, 3.0, 3.0, 6.0], 3)
    assert list(chunk_bounds(table, 2)) == [(0, 4, 0, 2), (0, 4, 2, 4)]
    assert list(chunk_bounds(neighbour_indices(5, 3), 2)) == [(0, 3, 0, 2), (1, 5, 2, 4), (3, 5, 4, 5)]


@pytest.mark.parametrize("value", [-0.1, 0.5, 0.7])
def test_a_tolerance_outside_zero_to_a_half_is_a_one_line_error(value):
    cfg = Config(inference=InferenceSettings(neighbour_tolerance=value))
    with pytest.raises(ConfigError, match="inference.neighbour_tolerance"):
        validate(cfg)


class NeighbourMean(torch.nn.Module):
    """Returns the mean of the input channels: every neighbour shows in the output."""

    def forward(self, x):
        return x.mean(dim=1, keepdim=True)


def engine_for(model, in_slices=3, **settings):
    from ldct_node.net.weights import LoadedModel

    card = ModelCard(name="t", version="0", architecture="tscnet", settings={"in_slices": in_slices})
    return DenoiseEngine(LoadedModel(model, card, path=None), InferenceSettings(device="cpu", **settings))


def test_engine_uses_positions_so_a_far_slice_does_not_leak_in():
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 30.0, size=(4, 8, 8)).round()
    engine = engine_for(NeighbourMean())
    out = engine.denoise_hu(hu, positions=[0.0, 3.0, 6.0, 46.0])
    np.testing.assert_allclose(out[2], (hu[1] + 2 * hu[2]) / 3, atol=1e-2)  # slice 3 is 40 mm away
    np.testing.assert_allclose(out[3], hu[3], atol=1e-2)
    legacy = engine.denoise_hu(hu)  # positions unknown to the caller: contiguous, as before
    np.testing.assert_allclose(legacy[2], hu[1:].mean(axis=0), atol=1e-2)


def test_engine_refuses_positions_that_do_not_match_the_slices():
    with pytest.raises(ValueError, match="2 positions for 3 slices"):
        engine_for(NeighbourMean()).denoise_hu(np.zeros((3, 8, 8)), positions=[0.0, 3.0])


def test_only_a_non_default_tolerance_changes_the_derived_uids():
    default = derivation_for(engine_for(NeighbourMean()), DeriveSettings())
    assert derivation_for(engine_for(NeighbourMean(), neighbour_tolerance=0.25), DeriveSettings()) == default
    assert derivation_for(engine_for(NeighbourMean(), neighbour_tolerance=0.1), DeriveSettings()) != default
    single = derivation_for(engine_for(NeighbourMean(), in_slices=1), DeriveSettings())
    assert derivation_for(engine_for(NeighbourMean(), in_slices=1, neighbour_tolerance=0.1), DeriveSettings()) == single


@pytest.fixture(scope="module")
def three_slice_weights(tmp_path_factory) -> Path:
    """A tiny TSC-Net that sees 3 slices and, with a random head, is far from the identity."""
    torch.manual_seed(0)
    settings = TSCNetConfig(width=4, num_dems=2, in_slices=3)
    net = TSCNet(settings)
    torch.nn.init.normal_(net.head.weight, std=0.05)
    card = ModelCard(name="three", version="0", architecture="tscnet", settings=settings.to_dict())
    return save_weights(net, card, tmp_path_factory.mktemp("w3") / "three.safetensors")


def run_series(folder: Path, datasets, weights: Path, **settings) -> dict[str, np.ndarray]:
    """Denoise through process.denoise_instances; derived pixels by source SOP Instance UID."""
    paths = synthetic.write_series(folder / "in", datasets)
    (series_uid, instances), = scan_files(paths).series.items()
    engine = DenoiseEngine.from_path(weights, InferenceSettings(device="cpu", threads=1, **settings))
    result = denoise_instances(series_uid, instances, folder / "out", engine, DeriveSettings())
    out = {}
    for path in result.files:
        derived = pydicom.dcmread(path)
        out[derived.SourceImageSequence[0].ReferencedSOPInstanceUID] = derived.pixel_array.astype(int)
    return out


def series_at(zs, seeds, uid_seed=""):
    shared = dict(series_uid=f"1.2.3.{uid_seed}4", study_uid="1.2.3.5", frame_of_reference_uid="1.2.3.6")
    return [synthetic.ct_dataset(rows=SIZE, columns=SIZE, z=z, instance_number=i + 1, seed=s,
                                 sop_uid=f"1.2.3.7.{i + 1}", **shared)
            for i, (z, s) in enumerate(zip(zs, seeds))]


def test_end_to_end_a_slice_40_mm_away_does_not_influence_the_output(tmp_path, three_slice_weights):
    zs = [0.0, 3.0, 6.0, 46.0]  # a subset re-send: three adjacent slices and one 40 mm away
    base = run_series(tmp_path / "a", series_at(zs, [0, 1, 2, 3]), three_slice_weights)
    far_changed = run_series(tmp_path / "b", series_at(zs, [0, 1, 2, 99]), three_slice_weights)
    near_changed = run_series(tmp_path / "c", series_at(zs, [0, 99, 2, 3]), three_slice_weights)
    at_6mm = "1.2.3.7.3"
    np.testing.assert_array_equal(base[at_6mm], far_changed[at_6mm])  # 46 mm never reached the slice at 6 mm
    assert not np.array_equal(base[at_6mm], near_changed[at_6mm])  # while its real neighbour at 3 mm does


def test_end_to_end_chunking_gives_the_same_pixels_as_one_chunk(tmp_path, three_slice_weights):
    # Unsorted files, a duplicated position and a gap: every chunk size must agree with one chunk.
    zs = [9.0, 0.0, 3.0, 3.0, 6.0, 49.0, 52.0]
    datasets = series_at(zs, range(len(zs)))
    whole = run_series(tmp_path / "whole", datasets, three_slice_weights)
    for chunk in (1, 2, 3):
        chunked = run_series(tmp_path / f"c{chunk}", datasets, three_slice_weights, chunk_slices=chunk)
        assert whole.keys() == chunked.keys()
        for sop in whole:
            np.testing.assert_array_equal(whole[sop], chunked[sop], err_msg=f"{sop} chunk={chunk}")


@pytest.mark.parametrize("chunk", [1, 64])
def test_a_slice_set_aside_is_never_a_neighbour_the_others_come_out_as_if_it_never_came(
        tmp_path, three_slice_weights, chunk):
    zs = [0.0, 3.0, 6.0, 9.0, 12.0]
    datasets = series_at(zs, range(len(zs)))
    without = run_series(tmp_path / "without", [ds for i, ds in enumerate(datasets) if i != 2], three_slice_weights,
                         chunk_slices=chunk)
    paths = synthetic.write_series(tmp_path / "in", datasets)
    synthetic.broken_jpeg_ls(paths[2], paths[2])  # the slice at 6 mm: its header reads, its pixels do not
    (series_uid, instances), = scan_files(paths).series.items()
    assert len(instances) == 5
    engine = DenoiseEngine.from_path(three_slice_weights, InferenceSettings(device="cpu", threads=1, chunk_slices=chunk))
    progress = []
    result = denoise_instances(series_uid, instances, tmp_path / "out", engine, DeriveSettings(), progress=progress.append)
    ((skipped),) = result.skipped
    assert skipped.path == paths[2] and skipped.reason.startswith("pixel data unusable")
    assert sum(progress) == 5  # a try cut short is undone; the slice set aside counts as dealt with
    assert len(result.files) == 4 == len(list((tmp_path / "out").glob("*.dcm")))
    got = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID: pydicom.dcmread(p).pixel_array
           for p in result.files}
    assert got.keys() == without.keys()
    for sop in without:
        np.testing.assert_array_equal(got[sop], without[sop], err_msg=sop)
