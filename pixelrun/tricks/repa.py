"""REPA (Yu et al. 2024): one block's tokens, through a small trained projector, aligned with a
frozen teacher's patch features of the clean image by cosine similarity. On for the first
repa.until of the steps.

Here: the projector and the teacher it builds (`RepaNetworks`; the projector is trained, in the
Adam group, saved in checkpoints as `repa_projector.*`), the step REPA stops at, its loss term and
its description line. The block (`config.repa_block`) and the projector's width
(`config.repa_hidden`) stay in config/, whose validation and resume check read them; its FLOPs
are measured with the other teachers' by pixelrun/training/flops.py (`runs_part` says when they count for part of a run).

iREPA (Singh et al. 2025, arXiv 2512.10794) as two switches, after PRX's `iREPALoss` in
prx/algorithm/repa.py: `repa.projector` = conv (a 3x3 convolution on the token grid) or attention
(PRX's `AttentionProjector`: one attention layer with 2-D RoPE at the tokens' grid positions, which
also serves the kept tokens of a routed block), and `repa.spatial_norm` (`spatial_normalize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelrun.config import Config, model_fields, repa_block, repa_hidden
from pixelrun.model.denoiser import ModelConfig, Routing, apply_rope, gather_tokens, rope_angles
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


class AttentionProjector(nn.Module):
    """iREPA's projector for routed blocks, after PRX's `AttentionProjector` (prx/algorithm/repa.py):
    q, k, v and output projections of one attention layer over an image's tokens, 2-D RoPE on q and
    k at each token's grid position, then a Linear to the teacher's width. Where PRX builds its own
    RoPE with 4 heads, this one takes the model's heads and the model's RoPE (`rope_angles`,
    `apply_rope`): the head width is then a multiple of 4, as 2-D RoPE needs, for any valid model."""

    def __init__(self, hidden_size: int, out: int, heads: int, theta: float = ModelConfig.rope_theta):
        super().__init__()
        self.heads, self.head_dim, self.theta = heads, hidden_size // heads, theta
        self.q, self.k, self.v, self.out = (nn.Linear(hidden_size, hidden_size) for _ in range(4))
        self.output = nn.Linear(hidden_size, out)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D], the tokens at grid positions `keep` [B, L] (row-major indices of the
        `grid`; None = the whole grid) -> [B * L, out]: rows, so that FSDP2 sees a plain output
        (a 3-D Linear output is a view, whose backward hook a sharded module could lose)."""
        b, n, d = x.shape
        cos, sin = rope_angles(*grid, self.head_dim, self.theta, x.device)  # [grid tokens, head_dim / 2]
        cos, sin = (cos[keep], sin[keep]) if keep is not None else (cos[None], sin[None])
        rows = x.reshape(b * n, d)
        q, k, v = (f(rows).reshape(b, n, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, d)
        return self.output(self.out(attended))


def build_projector(cfg: Config, hidden_size: int, out: int) -> nn.Module:
    """repa.projector's network from the model's width to the teacher's (`out`): the MLP (its
    parameters 0.* / 2.* / 4.*), iREPA's 3x3 convolution (weight, bias), or its attention projector
    (q.*, k.*, v.*, out.*, output.*): the checkpoint's repa_projector.* keys."""
    kind = cfg.repa.projector
    if kind == "conv":  # as PRX's iREPALoss._build_projector: no hidden layer, no activation
        return nn.Conv2d(hidden_size, out, kernel_size=3, padding=1)
    if kind == "attention":
        return AttentionProjector(hidden_size, out, model_fields(cfg)["num_heads"])
    return projector(hidden_size, repa_hidden(cfg), out)


def spatial_normalize(f: torch.Tensor) -> torch.Tensor:
    """iREPA's spatial normalisation of teacher features f [B, L, C] over an image's L tokens, as
    PRX's `iREPALoss.forward` computes it (prx/algorithm/repa.py): each token minus gamma times the
    mean token, gamma being that token's own mean over the C features, then each feature divided
    by its (unbiased) std over the tokens plus 1e-6. The paper's Algorithm 1 and its code subtract a
    constant gamma (1.0 by default) times the mean token instead; pixelrun follows PRX's code."""
    gamma = f.mean(dim=2, keepdim=True)  # [B, L, 1]
    f = f - gamma * f.mean(dim=1, keepdim=True)
    return f / (f.std(dim=1, keepdim=True) + 1e-6)


class RepaNetworks(nn.Module):
    """The frozen teacher (never trained, never saved) and the trained projector."""

    def __init__(self, teacher: FeatureTeacher, proj: nn.Module, block: int, stop: int, kind: str = "mlp"):
        super().__init__()
        self.teacher, self.projector = teacher, proj
        self.block = block  # the block whose output is aligned
        self.stop = stop  # REPA is off from this optimizer step on (repa.until)
        self.kind = kind  # repa.projector: mlp | conv | attention


def build(cfg: Config, every: Sequence[Config], hidden_size: int) -> RepaNetworks | None:
    """The teacher and projector when REPA is on in `cfg` or any stage of `every` (a staged run
    keeps one projector throughout), else None."""
    if not any(c.repa.weight > 0 for c in every):
        return None
    from pixelrun.teachers.features import load_teacher

    teacher = load_teacher(cfg.repa.teacher)
    proj = build_projector(cfg, hidden_size, teacher.dim)
    return RepaNetworks(teacher, proj, repa_block(cfg), repa_stop_step(cfg), cfg.repa.projector)


def project(nets: RepaNetworks, features: torch.Tensor, keep: torch.Tensor | None, grid: tuple[int, int]):
    """The block's tokens [B, L, D] through the projector -> [B, L, C]. `keep` [B, L]: the grid
    positions of a routed block's tokens (None when the block saw the whole grid)."""
    b, n, d = features.shape
    if nets.kind == "attention":
        return nets.projector(features, grid, keep).reshape(b, n, -1)
    if nets.kind == "conv":
        if keep is not None:  # validation refuses conv with routing (repa.projector); as PRX's iREPALoss
            raise ValueError("the conv projector needs the whole token grid; a routed block has gaps")
        spatial = features.transpose(1, 2).reshape(b, d, *grid)
        return nets.projector(spatial).flatten(2).transpose(1, 2)
    # through the MLP as rows: on a 3-D input Linear returns a view of its 2-D result, and FSDP2
    # warns on every step that a sharded module's view output could lose its backward hook
    return nets.projector(features.reshape(b * n, d)).reshape(b, n, -1)


def repa_loss(
    nets: RepaNetworks,
    features: torch.Tensor,
    x: torch.Tensor,
    routing: Routing | None,
    grid: tuple[int, int],
    spatial_norm: bool = False,
) -> torch.Tensor:
    """-mean cosine between projected block features and the teacher's patch features of the clean
    image on the same token grid (spatially normalised over the whole grid first with
    `spatial_norm`, as PRX normalises before it gathers). Inside a TREAD span the block only saw the
    kept tokens, so the teacher tokens are gathered at the same indices."""
    target = nets.teacher.features_for_grid(x, *grid)  # [B, L, C], no grad
    if spatial_norm:
        target = spatial_normalize(target.float())
    keep = routing.keep if routing is not None and features.shape[1] != target.shape[1] else None
    if keep is not None:
        target = gather_tokens(target, keep)
    pred = project(nets, features, keep, grid).float()
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def _on(cfg: Config, nets, step: int | None) -> bool:
    return (
        nets is not None and nets.repa is not None and cfg.repa.weight > 0 and (step is None or step < nets.repa.stop)
    )


def _term(s: StepTensors, nets) -> torch.Tensor:
    grid = (s.x.shape[2] // s.patch, s.x.shape[3] // s.patch)
    with s.amp:
        return repa_loss(nets.repa, s.features[nets.repa.block], s.x, s.routing, grid, s.cfg.repa.spatial_norm)


def _features(nets) -> tuple[int, ...]:
    return (nets.repa.block,)


def _weight(cfg: Config) -> float:
    return cfg.repa.weight


def describe(nets: RepaNetworks | None, cfg: Config) -> list[str]:
    if nets is None or cfg.repa.weight <= 0:
        return []
    norm = ", spatially normalised" if cfg.repa.spatial_norm else ""
    return [f"REPA: block {nets.block} -> {nets.kind} projector -> {nets.teacher.name}{norm}, weight {cfg.repa.weight}"]


TERM = Term("repa", on=_on, loss=_term, weight=_weight, features=_features)
