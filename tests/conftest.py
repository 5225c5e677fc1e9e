import os

# No network at test time: any accidental hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    """Every test gets its own ./smarttrim-out (commands record the latest model there)."""
    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "smarttrim-out"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: on the 2 shared cores one torch thread is several times faster than two
    (files that train or evaluate tiny models use it: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
