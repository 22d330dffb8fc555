"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldct_node.model import TSCNet, TSCNetConfig
from ldct_node.weights import ModelCard, save_weights

REPO = Path(__file__).resolve().parents[1]
SHARED_SERIES = REPO.parent / "shared" / "data" / "pancreas-ct-cb001"


@pytest.fixture(scope="session")
def shared_series() -> Path:
    """The real 134-slice CT series (CC BY 4.0) beside the checkout; skipped on a bare clone."""
    if not (SHARED_SERIES / "1-001.dcm").is_file():
        pytest.skip(f"shared CT series not present at {SHARED_SERIES}")
    return SHARED_SERIES


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny TSC-Net weights file (untrained, so the identity) for tests that need a model, not a good one."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    settings = TSCNetConfig(width=4, num_dems=2)
    card = ModelCard(name="test", version="0", architecture="tscnet", settings=settings.to_dict())
    return save_weights(TSCNet(settings), card, path)
