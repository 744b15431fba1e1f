"""The GPU cluster image (Dockerfile + requirements-gpu.txt) can run every shipped GPU config.

No Docker engine runs here, so the image is checked from its recipe: what it installs covers every backend a
GPU config names and every project dependency, and pip resolves that install list together (against the
package index, the way `docker build` would).
"""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-gpu.txt"
# Exact pins of vLLM's that the image follows instead of pyproject.toml's (see requirements-gpu.txt).
VLLM_PINNED = {"torch", "torchvision"}
# What each stage backend imports, by package.
BACKEND_PACKAGES = {"vllm": "vllm", "transformers": "transformers", "segment_anything": "segment-anything"}


def gpu_configs() -> list[Path]:
    def uses_gpu(raw: dict) -> bool:
        sections = [v for v in raw.values() if isinstance(v, dict)]
        return any((s.get("stage") or {}).get("num_gpus", 0) > 0 for s in sections)

    return [p for p in sorted((ROOT / "configs").glob("*.yaml")) if uses_gpu(yaml.safe_load(p.read_text()))]


def image_requirements() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in (Requirement(line) for line in lines if line)}


def project_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def test_image_installs_the_gpu_requirements_then_the_project_without_its_dependencies():
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (.+)$", dockerfile, re.M)
    assert any("pip install" in run and "-r requirements-gpu.txt" in run for run in runs), runs
    assert any("pip install" in run and "--no-deps" in run and run.rstrip().endswith("-e .") for run in runs)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "requirements-gpu.txt" not in ignored and "*.txt" not in ignored


def test_every_backend_of_every_gpu_config_is_in_the_image():
    assert gpu_configs(), "configs/aga_sdxl_gpu.yaml at least"
    have = image_requirements()
    for path in gpu_configs():
        raw = yaml.safe_load(path.read_text())
        for name, section in raw.items():
            if isinstance(section, dict) and "backend" in section:
                package = BACKEND_PACKAGES[section["backend"]]
                assert package in have, f"{path.name}: {name}.backend {section['backend']} needs {package}"
    missing = set(project_requirements()) - set(have)
    assert not missing, (
        f"the image installs synthray with --no-deps: add {sorted(missing)} to {REQUIREMENTS.name}"
    )


@pytest.mark.slow
def test_gpu_requirements_resolve_together(tmp_path):
    """pip's resolver over the image's install list (metadata only, nothing installed): the vLLM build agrees
    with the torch and transformers pins, and every project dependency resolves inside pyproject's range."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--report", str(report), "-r", str(REQUIREMENTS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, requirement in image_requirements().items():
        assert requirement.specifier.contains(resolved[name], prereleases=True), (name, resolved[name])
    for name, requirement in project_requirements().items():
        if name not in VLLM_PINNED:
            assert requirement.specifier.contains(resolved[name], prereleases=True), (name, resolved[name])
