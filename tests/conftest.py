import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never download: every hub client is offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """The offline tiny models, built once into the repo's cache (the same place `make demo` uses)."""
    from engine.tiny_models import build_tiny_models

    out = ROOT / ".cache" / "tiny-models"
    build_tiny_models(out)
    return out
