"""Skips that would hide breakage fail (tests/conftest.py): a selected vLLM test that skips (vLLM does not
import), and under CI=true any skip of a test not marked `gpu`.

Each case runs pytest in a subprocess on a scratch folder holding a copy of tests/conftest.py and one test
module, so the hooks are exercised as `make test` and CI run them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
INI = "[pytest]\nmarkers =\n    gpu: needs a CUDA device\n    vllm: vLLM environment\n"

VLLM_TEST = """
import pytest
pytestmark = pytest.mark.vllm

@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm_that_does_not_exist", reason="the vLLM tests run in .venv-vllm")

def test_engine(engine):
    pass
"""
PLAIN_SKIP = """
import pytest

def test_optional_tool():
    pytest.skip("tool not installed")

def test_runs():
    pass
"""
GPU_SKIP = """
import pytest

@pytest.mark.gpu
def test_on_gpu():
    pytest.skip("needs a CUDA device")
"""
MODULE_SKIP = """
import pytest
pytest.importorskip("module_that_does_not_exist")

def test_never_collected():
    pass
"""


def run_pytest(tmp_path: Path, source: str, *args: str, ci: bool = False) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_case.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_selected_vllm_test_that_skips_fails(tmp_path):
    result = run_pytest(tmp_path, VLLM_TEST, "-m", "vllm")
    assert result.returncode == 1, result.stdout
    last = result.stdout.splitlines()[-1]  # a skip in a fixture fails as an error of the test's setup
    assert ("1 error" in last or "1 failed" in last) and "skipped" not in last, result.stdout
    assert "make venv-vllm" in result.stdout


@pytest.mark.parametrize(
    ("ci", "returncode", "summary"), [(False, 0, "1 passed, 1 skipped"), (True, 1, "1 failed, 1 passed")]
)
def test_skips_fail_only_under_ci(tmp_path, ci, returncode, summary):
    result = run_pytest(tmp_path, PLAIN_SKIP, ci=ci)
    assert result.returncode == returncode and summary in result.stdout, result.stdout
    if ci:
        assert "skipped under CI=true (tool not installed)" in result.stdout


def test_gpu_tests_may_skip_under_ci(tmp_path):
    result = run_pytest(tmp_path, GPU_SKIP, ci=True)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout


def test_module_skipped_at_import_fails_under_ci(tmp_path):
    local = run_pytest(tmp_path, MODULE_SKIP)
    assert local.returncode in (0, 5) and "1 skipped" in local.stdout, local.stdout  # 5: nothing ran
    ci = run_pytest(tmp_path, MODULE_SKIP, ci=True)
    assert ci.returncode != 0 and "module skipped under CI=true" in ci.stdout, ci.stdout
