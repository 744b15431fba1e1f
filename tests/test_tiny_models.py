"""Tiny models are keyed by a fingerprint of their builder: a changed builder (or anything it imports from the
project) rebuilds its model; an unchanged one does not.

The builder here is a scratch module `engine.tiny.fake` in a scratch project root, so the test edits
sources without touching the real builders or the shared cache.
"""

import importlib.util
import sys

import pytest

import engine.tiny.registry as tiny_models

FAKE = """
from pathlib import Path

CALLS = []


def build_fake(out):
    CALLS.append(out)
    Path(out).mkdir(parents=True)
    (Path(out) / "weights.txt").write_text("w")
    return Path(out)


def _vocabulary():
    from engine.tiny.helper import WORDS  # a function-level import counts too

    return WORDS
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "engine" / "tiny").mkdir(parents=True)
    (root / "engine" / "tiny" / "fake.py").write_text(FAKE)
    (root / "engine" / "tiny" / "helper.py").write_text("from engine.words import WORDS\n")
    (root / "engine" / "words.py").write_text("WORDS = ['a', 'b']\n")
    (root / "engine" / "unrelated.py").write_text("X = 1\n")
    spec = importlib.util.spec_from_file_location("engine.tiny.fake", root / "engine" / "tiny" / "fake.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "engine.tiny.fake", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(tiny_models, "PROJECT_ROOT", root)
    monkeypatch.setattr(tiny_models, "TINY_MODELS", {"fake": module.build_fake})
    return root, module


def test_builder_fingerprint_follows_its_project_imports(project):
    root, module = project
    assert tiny_models.builder_modules("engine.tiny.fake") == {
        "engine.tiny.fake",
        "engine.tiny.helper",
        "engine.words",
    }


def test_a_model_is_rebuilt_when_its_builder_changes(project, tmp_path):
    root, module = project
    out = tmp_path / "cache"

    def builds(**kwargs) -> int:
        before = len(module.CALLS)
        built = tiny_models.build_tiny_models(out, **kwargs)
        assert (built["fake"] / "weights.txt").exists()
        return len(module.CALLS) - before

    assert builds() == 1
    assert builds() == 0, "an unchanged builder reuses its model"
    (root / "engine" / "unrelated.py").write_text("X = 2\n")
    assert builds() == 0, "a module the builder does not import changes nothing"

    (root / "engine" / "tiny" / "helper.py").write_text("from engine.words import WORDS\nMORE = 1\n")
    assert builds() == 1, "a changed engine.tiny module the builder imports rebuilds"
    (root / "engine" / "words.py").write_text("WORDS = ['a', 'b', 'c']\n")
    assert builds() == 1, "a changed project module behind it (e.g. a vocabulary) rebuilds"
    (root / "engine" / "tiny" / "fake.py").write_text(FAKE + "\n# a new layer size\n")
    assert builds() == 1, "a changed builder module rebuilds"

    (out / ".fake.build").unlink()
    assert builds() == 1, "a model without a key (built before keys existed) is rebuilt"
    assert builds(force=True) == 1
    assert not [p.name for p in out.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_real_builders_have_distinct_keys():
    keys = {name: tiny_models.builder_fingerprint(b) for name, b in tiny_models.TINY_MODELS.items()}
    assert len(set(keys.values())) == len(keys), keys


def test_domain_layout_halves_the_image_where_sd15_divides_it_by_eight(tiny_models_dir):
    import torch

    from engine.config import ModelRef
    from engine.models.diffusion import load_pipeline

    sides = {}
    for name in ("sd15", "sd15-domain"):
        pipe = load_pipeline(ModelRef(id=str(tiny_models_dir / name)), role="test", device="cpu")
        with torch.no_grad():
            latent = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        sides[name] = latent.shape[-1]
    assert sides == {"sd15": 4, "sd15-domain": 16}


def test_tiny_blip2_builds_small_and_fast(tmp_path):
    import time

    from engine.tiny.blip2 import build_blip2, build_processor

    assert tiny_models.TINY_MODELS["blip2"] is build_blip2  # `synthray tiny-models` builds it
    build_processor()  # imports transformers' BLIP-2 modules, so the timing below is the build alone
    start = time.perf_counter()
    out = build_blip2(tmp_path / "blip2")
    assert time.perf_counter() - start < 2.0
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(files)
    assert sum(files.values()) < 1_000_000, files
