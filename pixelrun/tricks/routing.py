"""Token routing as a training trick: a `routing.ratio` of the image tokens skips the blocks
`routing_span(cfg)`, which saves their FLOPs there. TREAD puts the skipped tokens back after the span;
SPRINT (`routing.kind: sprint`, pixelrun/model/sprint.py) fuses the stream from before the span with
the span's output, which costs a Linear(2D -> D) on every token. The masks are drawn with the step's
other random draws (pixelrun/diffusion/draws.py) and their math is pixelrun/model/routing.py: the
model takes routing as an argument. Routing adds no loss term.

Here: what routing makes a config's denoiser cost (the analytic count with the config's kind, ratio
and span, pixelrun/model/flops.py) and what it saves against the same model dense."""

from __future__ import annotations

import dataclasses

from pixelrun.config import Config, routing_span
from pixelrun.model.denoiser import ModelConfig
from pixelrun.model.flops import training_flops_per_image
from pixelrun.model.sprint import sprint_span


def denoiser_flops(cfg: Config, model_cfg: ModelConfig, text_tokens: int) -> dict:
    """The denoiser's analytic FLOPs of one image at the config's square resolution, routed as the
    config routes (`model.flops.training_flops_per_image`'s dict, by part); a SPRINT config counts
    its fusion whatever `model_cfg` says, since the fusion follows from routing.kind."""
    res = cfg.data.resolution
    model_cfg = dataclasses.replace(model_cfg, sprint_span=sprint_span(cfg))
    return training_flops_per_image(model_cfg, res, res, text_tokens, cfg.routing.ratio, routing_span(cfg))


def saved_flops(cfg: Config, model_cfg: ModelConfig, text_tokens: int) -> int:
    """Training FLOPs of one image that routing saves against the same model dense, without SPRINT's
    fusion (0 when dense; negative for SPRINT at ratio 0, which only adds its fusion)."""
    res = cfg.data.resolution
    dense_cfg = dataclasses.replace(model_cfg, sprint_span=None)
    dense = training_flops_per_image(dense_cfg, res, res, text_tokens)["training_total"]
    return int(dense - denoiser_flops(cfg, model_cfg, text_tokens)["training_total"])
