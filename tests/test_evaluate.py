"""The evaluation report: produced end to end on a tiny set, with the numbers it is built from checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ldct_node.cli import main
from ldct_node.errors import CommandError
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import ModelCard, save_weights
from ldct_train.baselines import BaselineSettings, nlm_denoise, noise_sigma, tv_denoise
from ldct_train.evaluate import LOW_DOSE, find_citation, parse_weights
from ldct_train.metrics import rmse
from ldct_train.report import crop_box, display_window, paired_p_value
from tests.synthetic import phantom_hu

CITATION = "Doe J. A tiny phantom data set. 2025."


def write_volume(hu: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing((0.7, 0.7, 3.0))
    sitk.WriteImage(image, str(path))


def noisy_phantom(slices: int = 3, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(low, normal) HU volumes inside the scaled range, so clipping plays no part."""
    normal = np.stack([phantom_hu(size, size, fov_fill_hu=None, seed=i) for i in range(slices)])
    low = normal + np.random.default_rng(5).normal(0.0, 60.0, normal.shape)
    return np.clip(low, -1024, 3072), np.clip(normal, -1024, 3072)


@pytest.fixture
def tiny_set(tmp_path):
    low, normal = noisy_phantom()
    write_volume(low, tmp_path / "ld.mha")
    write_volume(normal, tmp_path / "nd.mha")
    (tmp_path / "Citations.txt").write_text(CITATION + "\n")
    pairs = tmp_path / "pairs.toml"
    pairs.write_text('[[pair]]\npatient = "P1"\nlow = "ld.mha"\nnormal = "nd.mha"\nsplit = "test"\n')
    return pairs


@pytest.fixture
def identity_weights(tmp_path):
    """A TSC-Net whose correction head is zero: with the global residual it returns its input."""
    config = TSCNetConfig(width=4, num_dems=2)
    model = TSCNet(config)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    card = ModelCard(name="identity", version="0", architecture="tscnet", settings=config.to_dict())
    return save_weights(model, card, tmp_path / "identity.safetensors")


def test_report_is_written_with_the_identity_network_matching_the_low_dose_input(tiny_set, identity_weights, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", "--weights", f"Identity={identity_weights}", "--data", str(tiny_set),
                 "--report", str(out), "--device", "cpu"]) == 0
    for name in ("report.md", "report.html", "metrics.json", "bland_altman_psnr.png", "crops.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    identity, low = metrics["methods"]["Identity"], metrics["methods"][LOW_DOSE]
    for metric, values in low["per_slice"].items():
        assert identity["per_slice"][metric] == pytest.approx(values, rel=1e-9, abs=1e-9), metric
    assert low["p_value"]["psnr_full"] is None  # identical slices: no test is possible
    assert list(metrics["methods"]) == [LOW_DOSE, "TV", "NLM", "Identity"]
    assert metrics["slices"] == 3


def test_report_states_ranges_test_citation_and_missing_bm3d(tiny_set, identity_weights, tmp_path):
    out = tmp_path / "report"
    main(["evaluate", "--weights", f"Identity={identity_weights}", "--data", str(tiny_set), "--report", str(out), "--device", "cpu"])
    text = (out / "report.md").read_text()
    for needle in ("[-1024, 3072] HU", "[-160, 240] HU", "Wilcoxon signed-rank", CITATION, "BM3D: not available", "s / slice"):
        assert needle in text, needle
    html = (out / "report.html").read_text()
    assert "<table>" in html and "crops.png" in html and "bland_altman_psnr.png" in html


def test_a_pairs_file_without_the_requested_split_is_a_one_line_error(tiny_set, identity_weights, tmp_path, capsys):
    status = main(["evaluate", "--weights", f"Identity={identity_weights}", "--data", str(tiny_set),
                   "--report", str(tmp_path / "r"), "--split", "val", "--device", "cpu"])
    assert status == 2
    assert "no 'val' pairs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_dose_with_a_pairs_file_is_a_one_line_error(tiny_set, identity_weights, tmp_path, capsys):
    assert main(["evaluate", "--data", str(tiny_set), "--dose", "0.25", "--weights", str(identity_weights),
                 "--report", str(tmp_path / "r")]) == 2
    assert "--dose applies to a noise bank only" in capsys.readouterr().err


def test_a_network_named_like_a_baseline_is_refused(tiny_set, identity_weights, tmp_path, capsys):
    assert main(["evaluate", "--weights", f"TV={identity_weights}", "--data", str(tiny_set),
                 "--report", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "unique" in capsys.readouterr().err


def test_weights_argument_is_name_equals_path_or_a_bare_path(tmp_path):
    assert parse_weights("TSC-Net D=runs/d/best.safetensors") == ("TSC-Net D", tmp_path.__class__("runs/d/best.safetensors"))
    assert parse_weights("runs/d/best.safetensors")[0] is None
    with pytest.raises(CommandError, match="NAME=PATH"):
        parse_weights("=runs/x.safetensors")


def test_paired_p_value_is_small_for_a_consistent_difference_and_absent_for_none():
    reference = list(np.linspace(30, 40, 12))
    better = [v + 1.0 + 0.01 * i for i, v in enumerate(reference)]
    assert paired_p_value(better, reference) < 0.001
    assert paired_p_value(reference, reference) is None
    assert paired_p_value([1.0], [2.0]) is None


def test_display_window_maps_centre_40_width_400_to_grey_levels():
    grey = display_window(np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0]), 40.0, 400.0)
    np.testing.assert_allclose(grey, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_crop_is_centred_on_the_body_and_stays_inside_the_image():
    image = np.full((100, 120), -1000.0)
    image[60:80, 90:110] = 40.0
    rows, cols = crop_box(image, 40, -500.0)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (50, 90, 80, 120)
    rows, cols = crop_box(image, 400, -500.0)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (100, 100)


def test_citation_is_found_in_a_folder_above_the_data(tmp_path):
    (tmp_path / "Citations.txt").write_text(CITATION)
    (tmp_path / "series").mkdir()
    assert find_citation([tmp_path / "series"]) == CITATION


def test_noise_estimate_recovers_the_sd_of_white_noise():
    white = np.random.default_rng(0).normal(0.5, 0.01, (128, 128))
    estimate = noise_sigma(white, np.ones(white.shape, bool), BaselineSettings(sigma_correction=1.0))
    assert estimate == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("denoiser", [tv_denoise, nlm_denoise])
def test_classical_baselines_reduce_the_error_of_a_noisy_slice(denoiser):
    low, normal = noisy_phantom(slices=1)
    # White test noise: the estimate needs no correction for reconstruction-kernel grain.
    out = denoiser(low[0], BaselineSettings(sigma_correction=1.0))
    assert rmse(out, normal[0]) < 0.8 * rmse(low[0], normal[0])
