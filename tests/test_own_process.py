"""The `own_process` marker (tests/conftest.py): the test runs in a child interpreter, and a child that dies
of a signal is run once more, without taking this process down."""

import os
import signal
from pathlib import Path

import pytest

from tests.conftest import OWN_PROCESS_ENV

# The parent pytest's pid names the flag, so that its two children share it and no other run sees it.
FLAG = Path(f"/tmp/synthray-own-process-crashed-{os.getppid()}")


@pytest.mark.own_process(timeout=120)
def test_a_child_killed_by_a_signal_runs_again():
    assert os.environ.get(OWN_PROCESS_ENV) == "1", "not in a child process"
    if not FLAG.exists():
        FLAG.touch()
        os.kill(os.getpid(), signal.SIGSEGV)  # the first child dies as a native crash would
    FLAG.unlink()  # the second child: the first one crashed, and this one ran
