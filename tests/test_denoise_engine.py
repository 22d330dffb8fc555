"""The inference engine: scaling, batching, padding, kept pixels, determinism."""

import numpy as np
import pytest
import torch
from torch import nn

from ldct_node.config import ConfigError, InferenceSettings
from ldct_node.net.inference import DenoiseEngine, neighbour_indices, pad_to_multiple
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import LoadedModel, ModelCard


class MiddleSlice(nn.Module):
    """A network that predicts no correction: the identity on the middle input slice."""

    def forward(self, x):
        mid = x.shape[1] // 2
        return x[:, mid : mid + 1]


class AddConstant(nn.Module):
    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def forward(self, x):
        mid = x.shape[1] // 2
        return x[:, mid : mid + 1] + self.delta


def engine_for(model, in_slices=1, device="cpu", **settings):
    card = ModelCard(name="t", version="0", architecture="tscnet", settings={"in_slices": in_slices})
    return DenoiseEngine(LoadedModel(model, card, path=None), InferenceSettings(device=device, **settings))


def ct_like(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(40, 300, size=shape).round()


def test_identity_network_returns_input_exactly_even_beyond_scaling_range():
    hu = ct_like((3, 37, 29))
    hu[0, 0, 0] = 6000.0  # metal, above the 3072 HU scaling ceiling
    hu[1, 5, 5] = -3024.0
    out = engine_for(MiddleSlice()).denoise_hu(hu)
    np.testing.assert_array_equal(out, hu)


def test_kept_pixels_come_back_unchanged_while_others_are_corrected():
    hu = ct_like((2, 16, 16))
    keep = np.zeros(hu.shape, bool)
    keep[:, :4] = True
    out = engine_for(AddConstant(0.01)).denoise_hu(hu, keep)
    np.testing.assert_array_equal(out[keep], hu[keep])
    np.testing.assert_allclose(out[~keep] - hu[~keep], 0.01 * 4096, rtol=1e-4)


def test_kept_pixels_do_not_reach_the_network_as_outliers():
    seen = {}

    class Spy(MiddleSlice):
        def forward(self, x):
            seen["max"] = float(x.max())
            return super().forward(x)

    hu = np.full((1, 8, 8), 0.0)
    hu[0, 0, 0] = 60000.0  # a padding value far above any tissue
    keep = hu > 50000
    engine_for(Spy()).denoise_hu(hu, keep)
    assert seen["max"] == pytest.approx(1024 / 4096)


def test_result_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    net = TSCNet(TSCNetConfig(width=4, num_dems=2)).eval()
    hu = ct_like((5, 24, 20))
    a = engine_for(net, batch_size=1).denoise_hu(hu)
    b = engine_for(net, batch_size=4).denoise_hu(hu)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_same_input_same_output():
    torch.manual_seed(0)
    net = TSCNet(TSCNetConfig(width=4, num_dems=2)).eval()
    hu = ct_like((2, 20, 20))
    np.testing.assert_array_equal(engine_for(net).denoise_hu(hu), engine_for(net).denoise_hu(hu))


def test_three_slice_model_sees_its_neighbours_with_edges_replicated():
    assert neighbour_indices(4, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert neighbour_indices(2, 1).tolist() == [[0], [1]]
    hu = ct_like((4, 8, 8))
    np.testing.assert_array_equal(engine_for(MiddleSlice(), in_slices=3).denoise_hu(hu), hu)


def test_padding_to_a_multiple_of_four_is_undone():
    x, size = pad_to_multiple(torch.rand(1, 1, 30, 33), 4)
    assert x.shape[-2:] == (32, 36) and size == (30, 33)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no such CUDA GPU"):
        engine_for(MiddleSlice(), device="cuda")
