"""The flow objective's term: the x-prediction compared with the clean image in velocity space
(`diffusion.objective.velocity_loss`, JiT's loss). Always on, weight 1. The time draw and the
noising it follows are `diffusion.draws` and `diffusion.objective`."""

from __future__ import annotations

import torch

from pixelrun.config import Config
from pixelrun.diffusion.objective import velocity_loss
from pixelrun.tricks.base import StepTensors, Term


def flow_loss(s: StepTensors, nets: object = None) -> torch.Tensor:
    return velocity_loss(s.x_hat, s.x, s.x_t, s.t, s.cfg.objective.t_clamp)


def _always(cfg: Config, nets: object, step: int | None) -> bool:
    return True


def _one(cfg: Config) -> float:
    return 1.0


TERM = Term("flow", on=_always, loss=flow_loss, weight=_one)
