"""Contrastive flow matching (Stoica et al. 2025, arXiv 2506.05350): besides pulling the predicted
velocity towards its own target, push it away from another sample's. As PRX's
`ContrastiveFlowMatching` (prx/algorithm/contrastive_flow_matching.py, `augmented_loss`): the
negative is the target of the batch rolled by one (sample i against the target of sample i - 1)
and the term is minus the mean squared difference, weighted by objective.contrastive_weight (PRX's
default 0.1, the paper's 0.05; 0 = off: the term is not computed, so a run without it is the run
of before, bit for bit).

Here the term lives where the flow loss does (pixelrun/tricks/flow.py): in velocity space, the
x-prediction turned into a velocity with the same clamped denominator
(`diffusion.objective.x_to_velocity`). The roll is within one rank's micro-batch, as PRX rolls the
batch each device holds, so the negatives depend on train.batch_size (validation asks for at least
2: with one sample the only negative would be itself). No network: elementwise work only, which the
FLOPs count leaves out (pixelrun/model/flops.py, "How it counts"), so it adds nothing to a budget."""

from __future__ import annotations

import torch

from pixelrun.config import Config
from pixelrun.diffusion.objective import x_to_velocity
from pixelrun.tricks.base import StepTensors, Term


def contrastive_loss(s: StepTensors, nets: object = None) -> torch.Tensor:
    """-mean (v_hat_i - v_{i-1})^2 over the micro-batch: v_hat the predicted velocity, v the
    target velocity, both as the flow term computes them."""
    t_clamp = s.cfg.objective.t_clamp
    v_hat = x_to_velocity(s.x_t, s.x_hat.float(), s.t, t_clamp)
    v = x_to_velocity(s.x_t, s.x, s.t, t_clamp)
    return -(v_hat - v.roll(1, dims=0)).pow(2).mean()


def _on(cfg: Config, nets: object, step: int | None) -> bool:
    return cfg.objective.contrastive_weight > 0


def _weight(cfg: Config) -> float:
    return cfg.objective.contrastive_weight


def describe(cfg: Config) -> list[str]:
    w = cfg.objective.contrastive_weight
    return [f"contrastive flow matching: minus {w:g} x the squared distance to the rolled target"] if w > 0 else []


TERM = Term("contrastive", on=_on, loss=contrastive_loss, weight=_weight)
