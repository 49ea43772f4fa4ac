"""REPA (Yu et al. 2024): one block's tokens, through a small trained projector, aligned with a
frozen teacher's patch features of the clean image by cosine similarity. On for the first
repa.until of the steps.

Here: the projector and the teacher it builds (`RepaNetworks`; the projector is trained, in the
Adam group, saved in checkpoints as `repa_projector.*`), the step REPA stops at, its loss term and
its description line. The block (`config.repa_block`) and the projector's width
(`config.repa_hidden`) stay in config/, whose validation and resume check read them; its FLOPs
are measured with the other teachers' by pixelrun/training/flops.py (`runs_part` says when they count for part of a run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelrun.config import Config, repa_block, repa_hidden
from pixelrun.model.denoiser import Routing, gather_tokens
from pixelrun.teachers.features import FeatureTeacher
from pixelrun.tricks.base import StepTensors, Term

# the config value that switches REPA off (what the FLOPs count compares against)
OFF = ["repa.weight=0"]


def uses_networks(cfg: Config) -> bool:
    """Whether `cfg` runs REPA's teacher and projector (their FLOPs count)."""
    return cfg.repa.weight != 0


def repa_stop_step(cfg: Config) -> int:
    """The first optimizer step without REPA (repa.until of train.steps, the sum over stages)."""
    return math.ceil(cfg.repa.until * cfg.train.steps)


def runs_part(cfg: Config) -> bool:
    """Whether REPA is on for only part of the run (repa.until < 1): its FLOPs then count for that
    fraction of the steps."""
    return cfg.repa.weight != 0 and cfg.repa.until != 1


def projector(hidden_size: int, hidden: int, out: int) -> nn.Sequential:
    """The 3-layer SiLU MLP from the model's width to the teacher's (its parameter names,
    0.* / 2.* / 4.*, are the checkpoint's repa_projector.* keys)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out),
    )


class RepaNetworks(nn.Module):
    """The frozen teacher (never trained, never saved) and the trained projector."""

    def __init__(self, teacher: FeatureTeacher, proj: nn.Module, block: int, stop: int):
        super().__init__()
        self.teacher, self.projector = teacher, proj
        self.block = block  # the block whose output is aligned
        self.stop = stop  # REPA is off from this optimizer step on (repa.until)


def build(cfg: Config, every: Sequence[Config], hidden_size: int) -> RepaNetworks | None:
    """The teacher and projector when REPA is on in `cfg` or any stage of `every` (a staged run
    keeps one projector throughout), else None."""
    if not any(c.repa.weight > 0 for c in every):
        return None
    from pixelrun.teachers.features import load_teacher

    teacher = load_teacher(cfg.repa.teacher)
    return RepaNetworks(
        teacher, projector(hidden_size, repa_hidden(cfg), teacher.dim), repa_block(cfg), repa_stop_step(cfg)
    )


def repa_loss(
    nets: RepaNetworks, features: torch.Tensor, x: torch.Tensor, routing: Routing | None, grid: tuple[int, int]
) -> torch.Tensor:
    """-mean cosine between projected block features and the teacher's patch features of the clean
    image on the same token grid. Inside a TREAD span the block only saw the kept tokens, so the
    teacher tokens are gathered at the same indices."""
    target = nets.teacher.features_for_grid(x, *grid)  # [B, L, C], no grad
    if routing is not None and features.shape[1] != target.shape[1]:
        target = gather_tokens(target, routing.keep)
    # through the projector as rows: on a 3-D input Linear returns a view of its 2-D result, and
    # FSDP2 warns on every step that a sharded module's view output could lose its backward hook
    pred = nets.projector(features.reshape(-1, features.shape[-1])).reshape(*features.shape[:-1], -1).float()
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def _on(cfg: Config, nets, step: int | None) -> bool:
    return (
        nets is not None and nets.repa is not None and cfg.repa.weight > 0 and (step is None or step < nets.repa.stop)
    )


def _term(s: StepTensors, nets) -> torch.Tensor:
    grid = (s.x.shape[2] // s.patch, s.x.shape[3] // s.patch)
    with s.amp:
        return repa_loss(nets.repa, s.features[nets.repa.block], s.x, s.routing, grid)


def _features(nets) -> tuple[int, ...]:
    return (nets.repa.block,)


def _weight(cfg: Config) -> float:
    return cfg.repa.weight


def describe(nets: RepaNetworks | None, cfg: Config) -> list[str]:
    if nets is None or cfg.repa.weight <= 0:
        return []
    return [f"REPA: block {nets.block} -> projector -> {nets.teacher.name}, weight {cfg.repa.weight}"]


TERM = Term("repa", on=_on, loss=_term, weight=_weight, features=_features)
