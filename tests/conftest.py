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


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A small toy dataset (3 classes, 4/2/2 images per class, 48 px), one per test module: modules may
    add files to it (e.g. a corrupt image) without affecting others."""
    from engine.toy_dataset import make_toy_dataset

    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, num_classes=3, train_per_class=4, val_per_class=2, test_per_class=2, size=48)
    return out


def demo_overrides(toy: Path, models: Path, out: Path) -> list[str]:
    """Overrides for the demo config (configs/aga_tiny_cpu.yaml): this toy dataset, the tiny models, 32 px
    backgrounds in 2 steps, everything named by absolute path."""
    return [
        f"data.path={toy}",
        f"data.masks_path={toy / 'masks'}",
        f"output.path={out}",
        f"segment.detector.id={models / 'grounding-dino'}",
        f"segment.sam.id={models / 'sam'}",
        f"prompt.model.id={models / 'llm'}",
        f"background.model.id={models / 'sdxl'}",
        "background.height=32",
        "background.width=32",
        "background.num_inference_steps=2",
        "output.gallery_classes=0",
        "ray.progress_bars=false",
    ]
