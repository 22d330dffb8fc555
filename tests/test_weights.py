"""The weights format: safetensors + model card, and its one-line failures."""

import json

import pytest
import torch

from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import InputScaling, ModelCard, WeightsError, load_weights, save_weights

CFG = TSCNetConfig(width=4, num_dems=2)


def tiny_card(**overrides) -> ModelCard:
    return ModelCard(name="tscnet-student", version="9.9", architecture="tscnet", settings=CFG.to_dict(), **overrides)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TSCNet(CFG)
    return model, save_weights(model, tiny_card(), tmp_path / "w")


def test_round_trip_restores_identical_tensors_and_card(saved):
    model, path = saved
    loaded = load_weights(path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert loaded.card.model_id == "tscnet-student 9.9"
    assert loaded.card.input_scaling == InputScaling(-1024.0, 3072.0)
    assert len(loaded.card.sha256) == 64


def test_card_states_the_input_scaling_formula(saved):
    _, path = saved
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["input_scaling"]["formula"] == "x = (clip(HU, -1024, 3072) - (-1024)) / 4096"


def test_tensor_file_holds_no_pickled_code(saved):
    _, path = saved
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(WeightsError, match="not found: pass --weights"):
        load_weights(tmp_path / "nope.safetensors")


def test_missing_card_is_named(saved):
    _, path = saved
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="model card .* is missing"):
        load_weights(path)


def test_corrupt_tensor_file_fails_its_checksum(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the sha256"):
        load_weights(path)


def test_tensors_that_do_not_fit_the_card_are_refused(saved, tmp_path):
    _, path = saved
    card = json.loads(path.with_suffix(".json").read_text())
    card["settings"]["width"] = 8
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not fit the architecture .*wrong shape"):
        load_weights(path)


def test_card_of_another_format_is_refused(saved):
    _, path = saved
    path.with_suffix(".json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(WeightsError, match="not in format"):
        load_weights(path)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(WeightsError) as info:
        load_weights(tmp_path / "nope.safetensors")
    assert "\n" not in str(info.value)
