"""The suite's own environment: a child a test starts takes Ctrl-C, even when the suite itself was
started in the background by a non-interactive shell, which ignores SIGINT for it (tests/conftest.py).
Without that, every test that presses Ctrl-C on a `pixelrun` command fails in such a suite: the
command never sees the signal (the submitit study's waiting once looked like it lost one)."""

from __future__ import annotations

import subprocess
import sys


def test_a_child_of_the_suite_takes_ctrl_c():
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
