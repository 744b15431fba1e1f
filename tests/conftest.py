import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never download: every hub client is offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# Skips that hide breakage. A test marked `vllm` only runs when asked for (`-m vllm`, as `make test` does in
# .venv-vllm): skipped there, the vLLM environment is broken, so it fails. Under CI (CI=true) any skip fails
# unless the test is marked `gpu` and says why (no CUDA device on this runner).
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ACCEPTED_SKIP_MARKERS = ("gpu",)


def refused_skip(item: pytest.Item, reason: str) -> str | None:
    """Why this skip is a failure, or None when it is an accepted skip."""
    if item.get_closest_marker("vllm") is not None:
        return (
            f"vLLM test skipped ({reason}): `make test` runs the vLLM suite in .venv-vllm, where vLLM must "
            "import; rebuild it with `make venv-vllm`"
        )
    if CI and not any(item.get_closest_marker(m) is not None for m in ACCEPTED_SKIP_MARKERS):
        return f"skipped under CI=true ({reason}): only tests marked {list(ACCEPTED_SKIP_MARKERS)} may skip in CI"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    refusal = refused_skip(item, reason)
    if refusal is not None:
        report.outcome = "failed"
        report.longrepr = refusal


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (`pytest.importorskip` at module level) is refused under CI too."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI=true: {report.longrepr}"


# Tests marked `own_process(timeout=S)` run in a fresh interpreter (`python -m pytest <test>`), not in this
# one. They are the tests that start Ray clusters of several nodes and kill one: Ray's native core worker in
# a driver that has been through many `ray.init`/`ray.shutdown` cycles (every earlier module's) has died of
# SIGSEGV there once in CI, which took the whole suite down with it. In a child, a crash is one test's
# result, with the child's output (faulthandler's stacks of every thread) in the report. A child killed by a
# signal (a native crash, never an assertion) is run once more and the crash is reported as a warning; a
# second crash fails the test.
OWN_PROCESS_ENV = "SYNTHRAY_OWN_PROCESS"
IN_OWN_PROCESS = os.environ.get(OWN_PROCESS_ENV) == "1"


def pytest_collection_modifyitems(config, items):
    """The child runs the test under the marker's timeout; here, the parent waits for up to two children."""
    for item in items:
        marker = item.get_closest_marker("own_process")
        if marker is not None:
            timeout = marker.kwargs["timeout"]
            item.add_marker(
                pytest.mark.timeout(timeout if IN_OWN_PROCESS else 2 * timeout + 60), append=False
            )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if IN_OWN_PROCESS or pyfuncitem.get_closest_marker("own_process") is None:
        return None
    crashes = []
    for _attempt in range(2):
        basetemp = tempfile.mkdtemp(prefix="own-process-")
        try:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    pyfuncitem.nodeid,
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    f"--basetemp={basetemp}",
                ],
                cwd=ROOT,
                env={**os.environ, OWN_PROCESS_ENV: "1"},
                capture_output=True,
                text=True,
            )
        finally:
            shutil.rmtree(basetemp, ignore_errors=True)
        output = (child.stdout + child.stderr)[-12000:]
        if child.returncode == 0:
            for crash in crashes:
                warnings.warn(
                    f"{pyfuncitem.nodeid}: passed on a second run after a crash: {crash}", stacklevel=1
                )
            return True
        if child.returncode > 0:  # the test failed (or errored) in the child: its report says how
            pytest.fail(f"in its own process:\n{output}", pytrace=False)
        crashes.append(f"the child died of {signal.Signals(-child.returncode).name}:\n{output}")
    pytest.fail("\n\n".join(crashes), pytrace=False)


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """The offline tiny models, built once into the repo's cache (the same place `make demo` uses)."""
    from engine.tiny.registry import build_tiny_models

    out = ROOT / ".cache" / "tiny-models"
    build_tiny_models(out)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A small toy dataset (3 classes, 4/2/2 images per class, 48 px), one per test module: modules may
    add files to it (e.g. a corrupt image) without affecting others."""
    from engine.tiny.toy_dataset import make_toy_dataset

    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, num_classes=3, train_per_class=4, val_per_class=2, test_per_class=2, size=48)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs, no dashboard, offline hub clients on the workers) for one test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray4():
    """A local Ray with 4 logical CPUs on 2 cores for one test module: a training step's workers plus Ray Data
    tasks (the end-to-end recipe tests)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
