"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SERIES = REPO.parent / "shared" / "data" / "pancreas-ct-cb001"


@pytest.fixture(scope="session")
def shared_series() -> Path:
    """The real 134-slice CT series (CC BY 4.0) beside the checkout; skipped on a bare clone."""
    if not (SHARED_SERIES / "1-001.dcm").is_file():
        pytest.skip(f"shared CT series not present at {SHARED_SERIES}")
    return SHARED_SERIES
