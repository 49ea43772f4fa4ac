"""The perceptual terms of PixelGen: LPIPS (VGG16 features, pixelrun/teachers/lpips.py) and P-DINO
(1 - cosine of a frozen teacher's patch features of the prediction and of the clean image), both on
the x-prediction and both gated to low noise (t < perceptual.max_t). Here: the networks they load,
their loss terms, the gate and their description lines. Their FLOPs are measured with REPA's by
pixelrun/training/flops.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pixelrun.config import Config
from pixelrun.teachers.features import FeatureTeacher
from pixelrun.teachers.lpips import LPIPS, lpips_loss
from pixelrun.tricks.base import StepTensors, Term

# the config values that switch them off (what the FLOPs count compares against)
OFF = ["perceptual.lpips_weight=0", "perceptual.dino_weight=0"]


def uses_networks(cfg: Config) -> bool:
    """Whether `cfg` runs LPIPS or P-DINO's teacher (their FLOPs count)."""
    return cfg.perceptual.lpips_weight != 0 or cfg.perceptual.dino_weight != 0


def build_lpips(cfg: Config, every: Sequence[Config]) -> LPIPS | None:
    """The LPIPS network when any of `every` (the config and its stages) uses it."""
    if not any(c.perceptual.lpips_weight > 0 for c in every):
        return None
    from pixelrun.teachers.lpips import load_lpips

    return load_lpips(cfg.perceptual.lpips)


def build_pdino(cfg: Config, every: Sequence[Config]) -> FeatureTeacher | None:
    """P-DINO's frozen teacher when any of `every` uses it."""
    if not any(c.perceptual.dino_weight > 0 for c in every):
        return None
    from pixelrun.teachers.features import load_teacher

    return load_teacher(cfg.perceptual.dino_teacher)


def pdino_loss(teacher: FeatureTeacher, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 - cosine of teacher patch tokens of x_hat and x, mean over patches. The grid
    follows the image's own aspect ratio (no squashing to a square)."""
    h, w = x.shape[-2:]
    grid = (max(1, round(h / teacher.patch)), max(1, round(w / teacher.patch)))
    f_hat = teacher.features_for_grid(x_hat, *grid, grad=True)
    f = teacher.features_for_grid(x, *grid)
    return 1 - F.cosine_similarity(f_hat, f, dim=-1).mean(dim=1)


def gated_mean(per_sample: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The mean over the samples the gate lets through (0 when none does). Dividing by the whole
    batch instead would shrink the term by the fraction gated out. As PRX's `prx/algorithm/lpips.py`
    (`augmented_loss`: `(lpips * mask).sum() / mask.sum().clamp(min=1)`, with `mask = t < t_threshold`)."""
    return (per_sample * gate).sum() / gate.sum().clamp(min=1)


def gate(cfg: Config, t: torch.Tensor) -> torch.Tensor:
    """1 for the samples the perceptual terms apply to: PixelGen applies them at low noise only,
    in our convention t < perceptual.max_t (all samples when it is null)."""
    max_t = cfg.perceptual.max_t
    return (t < max_t).float() if max_t is not None else torch.ones_like(t)


def _lpips_on(cfg: Config, nets, step: int | None) -> bool:
    return nets is not None and nets.lpips is not None and cfg.perceptual.lpips_weight > 0


def _lpips_term(s: StepTensors, nets) -> torch.Tensor:
    per_sample = lpips_loss(nets.lpips, s.x_hat, s.x, s.cfg.perceptual.lpips_scale)
    return gated_mean(per_sample, gate(s.cfg, s.t))


def _pdino_on(cfg: Config, nets, step: int | None) -> bool:
    return nets is not None and nets.dino is not None and cfg.perceptual.dino_weight > 0


def _pdino_term(s: StepTensors, nets) -> torch.Tensor:
    return gated_mean(pdino_loss(nets.dino, s.x_hat, s.x), gate(s.cfg, s.t))


def _lpips_weight(cfg: Config) -> float:
    return cfg.perceptual.lpips_weight


def _pdino_weight(cfg: Config) -> float:
    return cfg.perceptual.dino_weight


def describe(lpips: LPIPS | None, dino: FeatureTeacher | None, cfg: Config) -> list[str]:
    pc, lines = cfg.perceptual, []
    if lpips is not None and pc.lpips_weight > 0:
        lines.append(f"LPIPS: {lpips.source}, weight {pc.lpips_weight}, scale {pc.lpips_scale}")
    if dino is not None and pc.dino_weight > 0:
        lines.append(f"P-DINO: {dino.name}, weight {pc.dino_weight}")
    return lines


LPIPS_TERM = Term("lpips", on=_lpips_on, loss=_lpips_term, weight=_lpips_weight)
PDINO_TERM = Term("pdino", on=_pdino_on, loss=_pdino_term, weight=_pdino_weight)
