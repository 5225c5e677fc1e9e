import os

# No network at test time: any accidental hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    """Every test gets its own ./smarttrim-out (commands record the latest model there)."""
    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "smarttrim-out"))
