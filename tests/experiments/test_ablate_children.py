"""`pixelrun ablate` and its training processes: a child dies with its parent (kill -9 included), and
a rerun that finds a run's folder still held by a live process waits for it instead of reporting the
run FAILED. The training command is replaced by a stand-in process, so the moments are set by files
and pipes, not by sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import until

ROOT = Path(__file__).parents[2]
PLAN = (
    "import sys\n"
    "from pathlib import Path\n"
    "from pixelrun.experiments import ablate\n"
    "from pixelrun.experiments.plan import Plan, PlannedRun\n"
    "from pixelrun.experiments.spec import Spec\n"
    "out = Path(sys.argv[1])\n"
    "v = 'base'\n"
    "r = PlannedRun(v, 0, f'runs/{v}/seed0', 4, 4, 1e9, [2, 4], [], f'configs/{v}-seed0.yaml')\n"
    "plan = Plan(Spec(), out, [r], {}, True, {})\n"
)
# The stand-in for `pixelrun train`: says its pid in a file (written whole), then waits to be ended.
CHILD = (
    "import os, sys, time\n"
    "open(sys.argv[1] + '.part', 'w').write(str(os.getpid())); os.replace(sys.argv[1] + '.part', sys.argv[1])\n"
    "while True: time.sleep(60)\n"
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_ablate_takes_its_training_child_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        PLAN
        + f"ablate.train_command = lambda plan, r, py: [py, '-c', {CHILD!r}, {str(pid_file)!r}]\n"
        + "ablate.execute(plan, parallel=1)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out")],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        child = int(until(lambda: pid_file.exists() and pid_file.read_text(), "the child's pid file"))
        assert _alive(child)
        parent.kill()  # kill -9: no handler of the parent runs
        parent.wait(timeout=60)
        until(lambda: not _alive(child), "the child ending after its parent was killed")
    finally:
        parent.kill()
        parent.wait()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_rerun_waits_for_a_run_still_held_by_a_live_process(tmp_path, monkeypatch, capsys):
    from pixelrun.experiments import ablate
    from pixelrun.experiments.plan import Plan, PlannedRun
    from pixelrun.experiments.spec import Spec

    out = tmp_path / "out"
    v = "base"
    r = PlannedRun(v, 0, f"runs/{v}/seed0", 4, 4, 1e9, [2, 4], [], f"configs/{v}-seed0.yaml")
    plan = Plan(Spec(), out, [r], {}, True, {})
    folder = out / r.dir
    hold = (
        "import sys; from pixelrun.infra.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], 'run.dir', 'pixelrun train'):\n"
        "    print('held', flush=True); sys.stdin.readline()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout.readline().strip() == "held"
    done = tmp_path / "trained"
    started = []
    monkeypatch.setattr(
        ablate,
        "train_command",
        lambda plan, r, py: started.append(1) or [py, "-c", f"open({str(done)!r}, 'w')"],
    )
    monkeypatch.setattr(
        ablate, "run_state", lambda plan, r: {"state": "done" if done.exists() else "not started", "step": 0}
    )
    real_sleep = time.sleep

    def sleep(s):  # the first pause of the loop: the run waits, not started, not failed
        if holder.poll() is None:
            assert not started
            err = capsys.readouterr().err
            assert "is still being trained by pid" in err, (err, started)
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(timeout=60)  # the holder ends, its lock released
        real_sleep(0)

    monkeypatch.setattr(ablate, "time", type("clock", (), {"sleep": staticmethod(sleep)}))
    try:
        result = ablate.execute(plan, parallel=1)
    finally:
        holder.kill()
        holder.wait()
    assert result["failed"] == [] and result["trained"] == [("base", 0)]
    assert started == [1]
