import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(os.environ.get("CNTK_ENGINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_real(name):
    """Real images from ../shared/data as NCHW float arrays (skips the test if absent)."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not found (set CNTK_ENGINE_DATA to the folder holding it)")
    return np.load(path)


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)
