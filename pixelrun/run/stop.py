"""When a run stops before its last step: a signal (SIGINT / SIGTERM finish the step, save and exit),
a test's `stop_at_step`, the time budget (train.max_minutes), or a state that cannot go on
(`TrainingStopped`). Under torchrun the ranks agree, so they stop together."""

from __future__ import annotations

import signal
import time
from typing import Any

from tqdm import tqdm

from pixelrun.config import Config, RunFailed
from pixelrun.infra.distributed import DistContext


class TrainingStopped(RunFailed):
    """The run cannot go on (its updates stay non-finite, its state would be saved non-finite): one line."""


class StopFlag:
    """SIGINT / SIGTERM ask for a clean stop: the loop finishes its step, saves, and exits.
    A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, sig: int, frame: Any) -> None:
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def should_stop(
    ctx: DistContext,
    stop: StopFlag,
    stop_at_step: int | None,
    step: int,
    t0: float,
    cfg: Config,
    check_now: bool = True,
) -> int | str | None:
    """Why to stop after this step (a signal, a test's stop_at_step, the time budget), or None.
    Ranks agree: a signal that reached any rank, or rank 0's clock, stops them all together. That
    agreement is a collective with a host sync, so under torchrun it happens on logging steps only
    (`check_now`): a stop then waits at most cadence.log_every steps."""
    if ctx.distributed and not check_now:
        return None
    why: int | str | None = stop.signal or (
        "stop_at_step" if stop_at_step is not None and step >= stop_at_step else None
    )
    over_time = bool(cfg.train.max_minutes and time.time() - t0 >= 60 * cfg.train.max_minutes)
    if ctx.distributed:
        code = {
            "signal": float(stop.signal or 0),
            "stop_at": float(why == "stop_at_step"),
            "time": float(over_time and ctx.is_main),
        }
        agreed = {k: v * ctx.world_size for k, v in ctx.mean(code).items()}  # sums over ranks
        if agreed["signal"]:
            why = stop.signal or int(signal.SIGTERM)
        elif agreed["stop_at"]:
            why = "stop_at_step"
        over_time = agreed["time"] > 0
    if why is None and over_time:
        if ctx.is_main:
            tqdm.write(f"train.max_minutes={cfg.train.max_minutes:g} reached at step {step}")
        return "max_minutes"  # a time budget (equal-time comparisons): finish like a completed run
    return why
