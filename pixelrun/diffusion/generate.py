"""Images for prompts from a model and its text encoder, with the config's sampler. `pixelrun sample`,
`pixelrun eval`, `pixelrun export`, the grids and the evaluations in training all generate through
`generate`, so the same seed gives the same image everywhere."""

from __future__ import annotations

import numpy as np
import torch

from pixelrun.config import Config, SampleConfig, routing_span
from pixelrun.diffusion.sampling import model_evaluations, sample, to_uint8
from pixelrun.infra.precision import autocast_dtype


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
    call with at most `chunk` prompts draws its noise exactly as diffusers' pipeline does.
    `progress` (a tqdm bar) counts each chunk's sampling steps, restarted per chunk and naming its
    images, so that it reads as the configured steps (25/25, not 50/50 for two chunks of 25)."""
    s = cfg.sample
    height = height or cfg.data.resolution
    width = width or cfg.data.resolution
    null_text, null_mask = (a.to(device) for a in encoder.encode([""]))
    amp = autocast_dtype(cfg, torch.device(device))
    out = []
    for k in range(0, len(prompts), chunk):
        if progress is not None and len(prompts) > chunk:
            progress.reset(total=steps or s.steps)
            progress.set_postfix_str(f"images {k + 1}-{min(k + chunk, len(prompts))} of {len(prompts)}")
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
            sampler=s.sampler,
            guidance_interval=guidance_interval(s),
        )
        out.append(to_uint8(images))
    return np.concatenate(out)


def guidance_interval(s: SampleConfig) -> tuple[float, float] | None:
    """sample.guidance_interval as `sample` takes it: (lo, hi), or None (guidance at every step)."""
    return (s.guidance_interval[0], s.guidance_interval[1]) if s.guidance_interval else None


def evaluations_per_image(cfg: Config) -> int:
    """The model evaluations (NFE) of one image sampled with the config's sample.* settings: what
    every report shows next to a score, since Heun or CFG at equal steps costs up to twice Euler."""
    s = cfg.sample
    return model_evaluations(
        s.steps,
        sampler=s.sampler,
        guidance=s.guidance,
        guidance_mode=s.guidance_mode,
        guidance_interval=guidance_interval(s),
        shift=s.shift,
        spacing=s.spacing,
    )
