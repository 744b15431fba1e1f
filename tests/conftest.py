import json
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


# The fixtures of the shared local Ray (below). A test on it is `slow`: `make test-fast` is the pure-Python and
# single-stage loop, and most of such a test's time is Ray's start-up and its workers importing torch, not
# the test (measured: these tests were 8.5 of the fast loop's 9.8 minutes).
SHARED_RAY_FIXTURES = {"ray_local", "ray4", "local_ray"}


SHARED_RAY_MODULES = pytest.StashKey[set]()


def on_shared_ray(item: pytest.Item) -> bool:
    return bool(SHARED_RAY_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Tests on the shared Ray are marked slow, and their modules run after all the others, in one stretch,
    so the shared Ray starts once (a module in between that needs no Ray or one of its own stops it); the
    order within each group is pytest's. The child of an own_process test runs it under the marker's timeout;
    here, the parent waits for up to two children."""
    on_shared = [item for item in items if on_shared_ray(item)]
    for item in on_shared:
        item.add_marker(pytest.mark.slow)
    shared_modules = {item.module.__name__ for item in on_shared}
    config.stash[SHARED_RAY_MODULES] = shared_modules
    items.sort(key=lambda item: item.module.__name__ in shared_modules)  # stable: pytest's order otherwise
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


# `SYNTHRAY_TEST_PHASES=<file>`: every test's setup, call and teardown seconds, one JSON line each, for
# `python -m benchmarks.test_durations` (JUnit XML has only their sum, which hides a module fixture's cost).
PHASES_ENV = "SYNTHRAY_TEST_PHASES"


def pytest_runtest_logreport(report):
    path = os.environ.get(PHASES_ENV)
    # Not from a child pytest: an own_process test's (its parent records it) or a test's own test session.
    if path and not IN_OWN_PROCESS and report.nodeid.startswith("tests/"):
        with open(path, "a") as out:
            out.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "s": report.duration}) + "\n")


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


# One local Ray for every test module on `ray_local`, `ray4` or test_train's `local_ray`: started by the first
# such module and kept for the next, since a start costs about 5 s and each module's first tasks would import
# torch again in fresh workers. 4 logical CPUs on 2 cores, so a training step's workers and Ray Data's tasks
# schedule without waiting on each other; workers see HF_HUB_OFFLINE. Any other module stops it first
# (`_no_shared_ray_under_other_modules`): it may start a Ray of its own (other CPUs, env vars, a cluster, a
# job in a subprocess), and the README walkthrough needs the ports an idle local Ray holds (its dashboard
# agent's 52365). The collection hook above runs the shared Ray's modules together, after the others.
SHARED_RAY = {"num_cpus": 4, "include_dashboard": False, "log_to_driver": False}
_shared = {"up": False}


def shared_ray() -> None:
    import ray

    if _shared["up"] and ray.is_initialized():
        return
    if ray.is_initialized():  # a Ray an earlier module's job left running
        ray.shutdown()
    ray.init(**SHARED_RAY, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    _shared["up"] = True


def release_shared_ray() -> None:
    if _shared["up"]:
        import ray

        _shared["up"] = False
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _no_shared_ray_under_other_modules(request):
    if request.module.__name__ not in request.config.stash.get(SHARED_RAY_MODULES, set()):
        release_shared_ray()


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_ends_with_the_session():
    yield
    release_shared_ray()


@pytest.fixture(scope="module")
def ray_local():
    """The shared local Ray (above) for a test module."""
    shared_ray()


@pytest.fixture(scope="module")
def ray4():
    """The shared local Ray (above): its 4 logical CPUs fit a training step's workers plus Ray Data tasks (the
    end-to-end recipe tests)."""
    shared_ray()


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
