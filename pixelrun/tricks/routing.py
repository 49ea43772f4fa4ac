"""TREAD token routing (Krause et al. 2025) as a training trick: a `routing.ratio` of the image
tokens skips the blocks `routing_span(cfg)`, which saves their FLOPs there. The masks are drawn
with the step's other random draws (pixelrun/diffusion/draws.py) and their math is
pixelrun/model/routing.py: the model takes routing as an argument. Routing adds no loss term.

Here: what routing makes a config's denoiser cost (the analytic count with the config's ratio and
span, pixelrun/model/flops.py) and what it saves against the same model dense."""

from __future__ import annotations

from pixelrun.config import Config, routing_span
from pixelrun.model.denoiser import ModelConfig
from pixelrun.model.flops import training_flops_per_image


def denoiser_flops(cfg: Config, model_cfg: ModelConfig, text_tokens: int) -> dict:
    """The denoiser's analytic FLOPs of one image at the config's square resolution, routed as the
    config routes (`model.flops.training_flops_per_image`'s dict, by part)."""
    res = cfg.data.resolution
    return training_flops_per_image(model_cfg, res, res, text_tokens, cfg.routing.ratio, routing_span(cfg))


def saved_flops(cfg: Config, model_cfg: ModelConfig, text_tokens: int) -> int:
    """Training FLOPs of one image that routing saves (0 when dense)."""
    res = cfg.data.resolution
    dense = training_flops_per_image(model_cfg, res, res, text_tokens)["training_total"]
    return int(dense - denoiser_flops(cfg, model_cfg, text_tokens)["training_total"])
