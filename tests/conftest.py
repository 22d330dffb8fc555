"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldct_node.config import ReceiveSettings
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import ModelCard, save_weights
from ldct_node.node.jobs import JobStore
from ldct_node.node.observe import Metrics
from ldct_node.node.receive import Receiver
from ldct_node.node.spool import Spool
from tests import peers

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


@pytest.fixture
def dciodvfy():
    """tests.peers.dciodvfy (error and warning lines of dicom3tools' validator); skips where it is not installed."""
    try:
        peers.require(peers.DCIODVFY)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    return peers.dciodvfy


@pytest.fixture
def receivers(tmp_path):
    """Start receivers on free loopback ports over a spool and queue in tmp_path: receive settings per
    call, min_free_bytes going to the spool (which is where the receiver checks it); all stopped after."""
    made = []

    def start(**settings) -> Receiver:
        spool = Spool(tmp_path / "spool", settings.pop("min_free_bytes", 0))
        receiver = Receiver(ReceiveSettings(port=0, **settings), spool, JobStore(tmp_path / "queue.sqlite3"), metrics=Metrics())
        receiver.start()
        made.append(receiver)
        return receiver

    yield start
    for receiver in made:
        receiver.stop()
        receiver.queue.close()
