"""Crash points for the chaos tests (tests/run/test_chaos.py): with ``PIXELRUN_KILL_AT=POINT:STEP``
(several, comma-separated) the process sends itself SIGKILL when it reaches POINT while saving
step STEP, so a test can kill a run at a moment a timer would rarely hit: between the tensor files
and the manifest of a checkpoint, or between its rename into place and the rotation of the older
ones. Unset, as for every user, each point costs one dictionary lookup.

    crash_point("save-files", step)   # tensors, meta and config written, no manifest yet
    crash_point("save-placed", step)  # renamed into place, older checkpoints not rotated yet
"""

from __future__ import annotations

import os
import signal

ENV = "PIXELRUN_KILL_AT"
POINTS = ("save-files", "save-placed")


def crash_point(point: str, step: int) -> None:
    spec = os.environ.get(ENV)
    if spec and f"{point}:{step}" in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
