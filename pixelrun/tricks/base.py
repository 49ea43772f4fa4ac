"""What a loss term is given and what it gives back: the tensors of one micro-batch after the
model's forward (`StepTensors`), and a named term with its weight and the condition it runs under
(`Term`). The step (pixelrun/training/step.py) sums the enabled terms of `table.TERMS` by name."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from pixelrun.config import Config
from pixelrun.model.denoiser import Routing

# `table.LossNetworks`, which imports the trick modules that import this one: its attributes are
# each trick's networks (`repa`, `lpips`, `dino`), None where the trick is off
LossNetworks = Any


@dataclass
class StepTensors:
    """One micro-batch as the loss terms read it."""

    cfg: Config  # the stage's config
    x: torch.Tensor  # the clean images in [-1, 1], [B, 3, H, W]
    x_t: torch.Tensor  # the noisy images the model saw
    t: torch.Tensor  # the times, [B]
    x_hat: torch.Tensor  # the model's prediction of x, fp32
    features: dict[int, torch.Tensor]  # the block outputs the forward returned, by block
    routing: Routing | None  # TREAD's kept tokens of this forward, None when dense
    patch: int  # the model's patch size: the token grid is (H // patch, W // patch)
    amp: AbstractContextManager  # the autocast the model ran under


def no_features(nets: LossNetworks | None) -> tuple[int, ...]:
    return ()


@dataclass(frozen=True)
class Term:
    """A named loss term: `on(cfg, nets, step)` says whether it runs this step (`step` the optimizer
    step, None = any step), `features(nets)` the blocks whose outputs it needs from the forward,
    `loss(tensors, nets)` computes it and `weight(cfg)` scales it in the sum."""

    name: str
    on: Callable[[Config, LossNetworks | None, int | None], bool]
    loss: Callable[[StepTensors, LossNetworks], torch.Tensor]
    weight: Callable[[Config], float]
    features: Callable[[LossNetworks | None], tuple[int, ...]] = no_features
