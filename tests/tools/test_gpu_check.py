"""The GPU check's own machinery (benchmarks/gpu_check.py): a part that outruns its cap is ended
with what it started, and every number is judged against its goal. The parts themselves run in
CI's dry run (GPU_CHECK_DRY=1 benchmarks/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[2] / "benchmarks/gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(gpu_check)


def test_a_part_past_its_cap_is_ended_with_its_children(tmp_path):
    pid_file = tmp_path / "pid"

    def slow():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pid_file.write_text(str(child.pid))
        time.sleep(60)

    rc, wall = gpu_check.in_child(slow, 1.0)
    assert rc == 124 and 1.0 <= wall < 60  # ended at its cap, long before the part's own 60 s
    pid = int(pid_file.read_text())
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(3000):  # killed with the part's process group: gone, or a zombie nobody reaped yet
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the part's subprocess outlived it")


def test_exit_status_of_a_part():
    assert gpu_check.in_child(lambda: None, 30)[0] == 0
    assert gpu_check.in_child(lambda: 1 / 0, 30)[0] == 1
    assert gpu_check.in_child(lambda: sys.exit(3), 30)[0] == 3


def test_numbers_beside_their_goals():
    n = gpu_check.Number
    assert n(1.7, ("<=", 1.8)).as_dict() == {"value": 1.7, "goal": "<= 1.8", "met": True}
    assert n(0.40, (">=", 0.45)).as_dict()["met"] is False
    assert n(None, ("==", 40)).as_dict() == {"value": None, "goal": "== 40", "met": None}
    assert n(3.0).as_dict() == {"value": 3.0, "goal": None, "met": None}
