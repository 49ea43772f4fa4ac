"""Inference from a checkpoint: its config (with the stage it was saved in, and overrides), the
model and text encoder loaded from it, and images generated for prompts with the config's sampler.
`pixelrun sample`, `pixelrun eval`, `pixelrun export`, the grids and the evaluations in training all
generate through `generate`, so the same seed gives the same image everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixelrun.config import Config, ConfigError, routing_span, with_overrides
from pixelrun.diffusion.sampling import sample, to_uint8
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import resolve_device
from pixelrun.training.build import autocast_dtype, model_from_config, text_encoder


def checkpoint_config(checkpoint: str, overrides: list[str] = ()) -> tuple[Config, Path, int]:
    """(config, checkpoint dir, text width): the checkpoint's own config with ``overrides`` applied,
    read without loading any weights, so settings can be checked before the work starts."""
    path = ckpt.resolve_checkpoint(checkpoint)
    saved, text_dim = ckpt.saved_config(path)
    return with_overrides(saved, overrides), path, text_dim


def load_for_inference(checkpoint: str, weights: str = "ema", device: str = "auto", overrides: list[str] = ()):
    """(model, text encoder, config, checkpoint dir) from a run directory, a checkpoint directory
    (saved on any number of ranks) or an exported model. Sampling defaults come from the
    checkpoint's own config; `overrides` may change them."""
    cfg, path, text_dim = checkpoint_config(checkpoint, overrides)
    dev = resolve_device(device, "--device")
    encoder = text_encoder(cfg, dev)
    model = model_from_config(cfg, text_dim)
    ckpt.load_weights(path, model, weights)
    bad = ckpt.first_nonfinite(model.state_dict())
    if bad is not None:  # images from such weights are black or noise: refuse rather than write them
        raise ConfigError(
            "--checkpoint",
            f"the {weights} weights of {path} hold non-finite values ({bad}); they "
            f"cannot make images: use an earlier checkpoint",
        )
    return model.to(dev).eval().requires_grad_(False), encoder, cfg, path


def generate(
    model,
    encoder,
    prompts: list[str],
    cfg: Config,
    device,
    *,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_mode: str | None = None,
    chunk: int = 32,
    progress=None,
) -> np.ndarray:
    """uint8 [N, H, W, 3] images. Prompts are sampled in chunks; chunk k uses seed + k, so a single
    call with at most `chunk` prompts draws its noise exactly as diffusers' pipeline does."""
    s = cfg.sample
    height = height or cfg.data.resolution
    width = width or cfg.data.resolution
    null_text, null_mask = (a.to(device) for a in encoder.encode([""]))
    amp = autocast_dtype(cfg, torch.device(device))
    out = []
    for k in range(0, len(prompts), chunk):
        text, mask = (a.to(device) for a in encoder.encode(prompts[k : k + chunk]))
        images = sample(
            model,
            text,
            mask,
            null_text=null_text,
            null_mask=null_mask,
            height=height,
            width=width,
            steps=steps or s.steps,
            guidance=s.guidance if guidance is None else guidance,
            guidance_mode=guidance_mode or s.guidance_mode,
            shift=s.shift,
            spacing=s.spacing,
            noise_scale=cfg.objective.noise_scale,
            t_clamp=cfg.objective.t_clamp,
            seed=seed + k // chunk,
            autocast_dtype=amp,
            progress=progress,
            routing_span=routing_span(cfg),
            routing_ratio=cfg.routing.ratio,
        )
        out.append(to_uint8(images))
    return np.concatenate(out)
