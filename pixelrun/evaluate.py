"""Generating images for a list of prompts, and the shapes score of SHAPES.md on fresh prompts."""
from __future__ import annotations

import numpy as np
import torch

from .config import Config, routing_span
from .sampling import sample, to_uint8


def generate(model, encoder, prompts: list[str], cfg: Config, device, *, seed: int, height: int | None = None,
             width: int | None = None, steps: int | None = None, guidance: float | None = None,
             guidance_mode: str | None = None, chunk: int = 32, progress=None) -> np.ndarray:
    """uint8 [N, H, W, 3] images. Prompts are sampled in chunks; chunk k uses seed + k, so a single
    call with at most `chunk` prompts draws its noise exactly as diffusers' pipeline does."""
    s = cfg.sample
    height = height or cfg.data.resolution
    width = width or cfg.data.resolution
    null_text, null_mask = (a.to(device) for a in encoder.encode([""]))
    from .train import autocast_dtype

    amp = autocast_dtype(cfg, torch.device(device))
    out = []
    for k in range(0, len(prompts), chunk):
        text, mask = (a.to(device) for a in encoder.encode(prompts[k:k + chunk]))
        images = sample(model, text, mask, null_text=null_text, null_mask=null_mask, height=height, width=width,
                        steps=steps or s.steps, guidance=s.guidance if guidance is None else guidance,
                        guidance_mode=guidance_mode or s.guidance_mode, shift=s.shift, spacing=s.spacing,
                        noise_scale=cfg.objective.noise_scale, t_clamp=cfg.objective.t_clamp,
                        seed=seed + k // chunk, autocast_dtype=amp, progress=progress,
                        routing_span=routing_span(cfg), routing_ratio=cfg.routing.ratio)
        out.append(to_uint8(images))
    return np.concatenate(out)


def shapes_eval(model, encoder, cfg: Config, device, *, n: int = 64, seed: int = 1234, steps: int | None = None,
                guidance: float | None = None, guidance_mode: str | None = None, sample_seed: int = 0,
                progress=None) -> dict:
    """The shapes score (SHAPES.md) of `n` fresh prompts from the "eval" split, with the settings
    that produced it and the sanity line of real dataset images."""
    from .data.shapes import fixed_prompts
    from .shapes_score import real_image_sanity, score_images

    prompts = fixed_prompts(n, seed=seed, max_shapes=cfg.data.max_shapes)
    was_training = model.training
    model.eval()
    images = generate(model, encoder, prompts, cfg, device, seed=sample_seed, steps=steps, guidance=guidance,
                      guidance_mode=guidance_mode, progress=progress)
    model.train(was_training)
    score = score_images(list(images), prompts)
    return {
        "score": score,
        "real_images": real_image_sanity(n=n, size=cfg.data.resolution),
        "settings": {
            "prompts": n, "prompt_seed": seed, "sample_seed": sample_seed,
            "steps": steps or cfg.sample.steps,
            "guidance": cfg.sample.guidance if guidance is None else guidance,
            "guidance_mode": guidance_mode or cfg.sample.guidance_mode,
            "spacing": cfg.sample.spacing, "resolution": cfg.data.resolution,
        },
    }


def load_for_inference(checkpoint: str, weights: str = "ema", device: str = "auto", overrides: list[str] = ()):
    """(model, text encoder, config, checkpoint dir) from a run directory, a checkpoint directory
    (saved on any number of ranks) or an exported model. Sampling defaults come from the
    checkpoint's own config; `overrides` may change them."""
    from . import checkpoint as ckpt
    from .config import _merge, config_from_dict, parse_overrides
    from .text import TextEncoder
    from .train import model_from_config, resolve_device

    path = ckpt.resolve_checkpoint(checkpoint)
    saved_cfg, text_dim = ckpt.saved_config(path)
    cfg = config_from_dict(_merge(saved_cfg, parse_overrides(list(overrides))))
    dev = resolve_device(device)
    encoder = TextEncoder(cfg.text.encoder, cfg.text.max_tokens, device=dev, cache_gib=cfg.text.cache_gib)
    model = model_from_config(cfg, text_dim)
    ckpt.load_weights(path, model, weights)
    return model.to(dev).eval().requires_grad_(False), encoder, cfg, path
