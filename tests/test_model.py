"""TSC-Net building blocks: DCNv2, the DEM and the network's shapes."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from ldct_node.net import model
from ldct_node.net.model import (
    REDCNN,
    DynamicEnhancementModule,
    ModulatedDeformConv,
    REDCNNConfig,
    TSCNet,
    TSCNetConfig,
    _deform_conv_gather,
    blur_matrix,
    build_model,
    gaussian_lowpass,
    modulated_deform_conv,
)


def test_deformable_conv_with_zero_offsets_and_unit_mask_equals_ordinary_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 13, 17)
    weight, bias = torch.randn(5, 6, 3, 3), torch.randn(5)
    offset = torch.zeros(2, 18, 13, 17)
    mask = torch.ones(2, 9, 13, 17)
    expected = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(modulated_deform_conv(x, offset, mask, weight, bias), expected, rtol=1e-4, atol=1e-4)


# Bands of one row, of several rows that do not divide the height (3000 bytes: 3 rows of the gradient
# test's 7, 8000: 3 of the other's 11) and, by default, one band.
BANDS = [1, 3000, 8000, model.GATHER_BAND_BYTES]


@pytest.mark.parametrize("band_bytes", BANDS)
def test_cpu_gather_equals_torchvision_kernel_for_random_offsets_and_masks(band_bytes, monkeypatch):
    monkeypatch.setattr(model, "GATHER_BAND_BYTES", band_bytes)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 11, 9)
    offset = torch.randn(2, 18, 11, 9) * 3  # large shifts also sample outside the image
    mask = torch.rand(2, 9, 11, 9)
    weight, bias = torch.randn(4, 4, 3, 3), torch.randn(4)
    reference = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    torch.testing.assert_close(_deform_conv_gather(x, offset, mask, weight, bias), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("band_bytes", BANDS)
def test_cpu_gather_gradients_match_torchvision(band_bytes, monkeypatch):
    monkeypatch.setattr(model, "GATHER_BAND_BYTES", band_bytes)
    torch.manual_seed(2)
    args = [torch.randn(1, 3, 7, 8), torch.randn(1, 18, 7, 8), torch.rand(1, 9, 7, 8), torch.randn(3, 3, 3, 3), torch.randn(3)]
    grads = []
    for fn in (lambda x, o, m, w, b: deform_conv2d(x, o, w, b, padding=1, mask=m), _deform_conv_gather):
        leaves = [a.clone().requires_grad_() for a in args]
        fn(*leaves).square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_offset_and_mask_predictor_starts_at_zero():
    dcn = ModulatedDeformConv(8)
    assert torch.count_nonzero(dcn.offset_mask.weight) == 0
    assert torch.count_nonzero(dcn.offset_mask.bias) == 0


def test_dem_keeps_shape_and_has_a_residual_path():
    dem = DynamicEnhancementModule(16, reduction=4)
    with torch.no_grad():
        dem.deform.weight.zero_()
        dem.deform.bias.zero_()
    x = torch.randn(2, 16, 12, 12)
    torch.testing.assert_close(dem(x), x)


def test_forward_returns_one_feature_map_per_dem_at_quarter_resolution():
    cfg = TSCNetConfig(width=4, num_dems=4)
    out, features = TSCNet(cfg)(torch.rand(2, 1, 32, 48), return_features=True)
    assert out.shape == (2, 1, 32, 48)
    assert [f.shape for f in features] == [(2, 16, 8, 12)] * 4


def test_three_slice_input_predicts_the_middle_slice():
    net = TSCNet(TSCNetConfig(in_slices=3, width=4, num_dems=2))  # untrained: zero head, identity
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(net(x), x[:, 1:2])


def test_sizes_that_are_not_multiples_of_four_are_refused():
    with pytest.raises(ValueError, match="multiples of 4"):
        TSCNet(TSCNetConfig(width=4))(torch.rand(1, 1, 30, 32))


def test_even_slice_count_is_refused():
    with pytest.raises(ValueError, match="odd"):
        TSCNet(TSCNetConfig(in_slices=2))


def test_baseline_variant_has_no_deformable_convolution():
    net = TSCNet(TSCNetConfig(width=4, use_dem=False))
    assert not any(isinstance(m, ModulatedDeformConv) for m in net.modules())


def test_build_model_knows_both_architectures():
    assert isinstance(build_model("tscnet", TSCNetConfig(width=4).to_dict()), TSCNet)
    assert isinstance(build_model("redcnn", REDCNNConfig(width=8).to_dict()), REDCNN)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("unet", {})


def test_redcnn_keeps_shape():
    assert REDCNN(REDCNNConfig(width=8))(torch.rand(1, 1, 20, 24)).shape == (1, 1, 20, 24)


def test_highpass_correction_cannot_shift_the_mean_or_add_shading():
    """A head that predicts a constant offset plus a smooth ramp: the high-pass takes both out."""
    net = TSCNet(TSCNetConfig(width=4, num_dems=2, correction_highpass_sigma_px=4.0)).eval()
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.constant_(net.head.bias, 0.01)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = net(x)
    assert float((out - x).abs().max()) < 1e-6


def test_highpass_keeps_fine_corrections():
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1.0
    fine = checker[None, None].float()
    assert float(gaussian_lowpass(fine, 4.0)[..., 8:-8, 8:-8].abs().max()) < 1e-3


def test_lowpass_equals_a_replicate_padded_separable_gaussian_convolution_up_to_the_edges():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 40, 56)
    sigma, radius = 3.0, 9
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    expected = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    expected = F.conv2d(F.pad(expected, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    assert float((gaussian_lowpass(x, sigma) - expected).abs().max()) < 1e-5


def test_blur_matrix_rows_sum_to_one_so_a_constant_image_is_unchanged():
    assert torch.allclose(blur_matrix(30, 6.0).sum(dim=1), torch.ones(30))
    assert float((gaussian_lowpass(torch.full((1, 1, 30, 20), 0.25), 6.0) - 0.25).abs().max()) < 1e-6


def _random_head_net(attention_window: int) -> TSCNet:
    torch.manual_seed(0)
    net = TSCNet(TSCNetConfig(width=4, num_dems=2, correction_highpass_sigma_px=3.0, attention_window=attention_window)).eval()
    net.head.reset_parameters()  # a non-zero correction, as after training
    return net


def test_local_channel_attention_lets_a_tile_agree_with_the_full_slice():
    """Far enough from a tile's cut edge its output equals the full slice's."""
    net = _random_head_net(25)
    image = torch.rand(1, 1, 320, 320)
    image[..., 224:, :] += 4.0  # content outside the tile that a global pool would see
    with torch.no_grad():
        full = net(image)
        tile = net(image[..., :224, :224])
    difference = float((full[..., :64, :64] - tile[..., :64, :64]).abs().max())
    assert difference < 1e-5, difference


def test_attention_window_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        TSCNet(TSCNetConfig(attention_window=24))
