"""The parts of one training run, built once by pixelrun/run/train.py's `open_run`, and where it
stands: what the loop (train.py) and a run's evaluations (evaluations.py) both read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pixelrun.config import Config
from pixelrun.evaluation.evaluate import Evaluator
from pixelrun.evaluation.validation import ValidationLoss
from pixelrun.infra.distributed import DistContext
from pixelrun.infra.tracking import Tracker
from pixelrun.run.health import Health
from pixelrun.training.build import TrainState
from pixelrun.training.state import Checkpointer, Counters, DataPosition


@dataclass
class Run:
    """One training run: its parts, built once, and where it stands."""

    cfg: Config
    ctx: DistContext
    plan: list[tuple[int, int, Config]]  # (first step, end step, config) per stage
    splits: list[tuple[int, int, int]]  # (global batch, micro-batch, accumulation steps) per stage
    run_dir: Path
    st: TrainState
    encoder: Any  # pixelrun.model.text.TextEncoder (its module loads transformers)
    null_text: torch.Tensor
    null_mask: torch.Tensor
    evaluator: Evaluator | None
    validation: ValidationLoss | None
    tracker: Tracker
    counters: Counters  # step, stage, training time and skipped steps: saved and restored
    position: DataPosition  # the open stage's batch source, and the position it resumed from
    checkpointer: Checkpointer  # every stateful part, saved in one call
    start_step: int = 0
    t0: float = field(default_factory=time.time)
    grid_prompts: list[str] = field(default_factory=list)
    clock: tuple[float, int] = (0.0, 0)  # (time, step) images/s is measured from
    flops_per_image: float = 0.0  # log.flops_per_image, or the denoiser's analytic count
    nonfinite_in_row: int = 0  # consecutive steps skipped for a non-finite loss or gradient norm
    saved_step: int = -1  # the step of the checkpoint this session wrote last
    health: Health = field(default_factory=Health)  # whether the state may be saved (pixelrun/run/health.py)
    started_from: Path | None = None  # the checkpoint this session resumed
    wrote: bool = False  # whether this session wrote a checkpoint
    said_unsaved: bool = False  # a checkpoint skipped while unhealthy was said (once per episode)
    norm: float = 0.0  # the global weight norm at the last checkpoint due
    # (step, training seconds) when this session started, and whether its wall-time estimate was said
    session_start: tuple[int, float] = (0, 0.0)
    said_estimate: bool = False

    def say(self, *lines: str) -> None:
        if self.ctx.is_main:
            for line in lines:
                tqdm.write(line)

    # The counters and the source under the names the loop reads them by.
    step = property(lambda self: self.counters.step, lambda self, v: setattr(self.counters, "step", v))
    stage_index = property(lambda self: self.counters.stage, lambda self, v: setattr(self.counters, "stage", v))
    train_seconds = property(
        lambda self: self.counters.train_seconds, lambda self, v: setattr(self.counters, "train_seconds", v)
    )
    skipped_steps = property(
        lambda self: self.counters.skipped_steps, lambda self, v: setattr(self.counters, "skipped_steps", v)
    )
    source = property(lambda self: self.position.source, lambda self, v: setattr(self.position, "source", v))
