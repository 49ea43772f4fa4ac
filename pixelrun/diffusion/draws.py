"""The random draws of a training step, per sample: caption dropout, the time, the image noise and
the routing mask (and SPRINT's path drop). They are keyed by (seed, step, the sample's place in the global batch),
never by rank, micro-batch or generator state, so a step is the same however the batch is split
across ranks and accumulation steps, and a resumed run draws what the uninterrupted run would."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pixelrun.config import Config, routing_span
from pixelrun.diffusion.objective import sample_times
from pixelrun.model.denoiser import Routing
from pixelrun.model.routing import random_routing


@dataclass
class Draws:
    """Every random draw of a training step, per sample: caption dropout, time, noise, routing."""

    drop: torch.Tensor  # [B] bool
    t: torch.Tensor  # [B]
    eps: torch.Tensor  # [B, C, H, W]
    routing: Routing | None


_NOISE_STREAM = 0x6E6F697365  # "noise": keeps these streams apart from other users of the seed
_PATH_DROP_STREAM = 0x7064726F70  # "pdrop": its own stream, so switching it on moves no other draw


def sample_generator(seed: int, step: int, sample: int, device, stream: int = _NOISE_STREAM) -> torch.Generator:
    """The generator of one sample of one step, from a hash of (seed, step, sample). Keying the
    draws by the sample's place in the global batch (not by rank or micro-batch) is what makes a
    step the same on 1 rank x 8 as on 2 ranks x 4 or 1 rank x 4 x 2 accumulation steps, and what
    makes resume exact with no generator state to save. Masks still differ per sample, per step and
    per rank (ranks hold different samples)."""
    state = np.random.SeedSequence([seed & (2**63 - 1), step, sample, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


def step_draws(
    cfg: Config, step: int, samples: list[int], image_shape: tuple[int, int, int], patch: int, device
) -> Draws:
    """The draws for the samples `samples` (indices within the step's global batch) of `step`.

    The small draws (dropout, time, routing) come from a CPU generator per sample, so they are the
    same on every device and cost microseconds; only the image noise is drawn on the device, from a
    device generator seeded the same way (on an H200, drawing everything on the GPU took 9% of a
    1.2B-model step in kernel launches)."""
    o = cfg.objective
    span = routing_span(cfg)
    n_tokens = (image_shape[1] // patch) * (image_shape[2] // patch)
    device = torch.device(device)
    drop, t, eps, keep, path_drop = [], [], [], [], []
    for j in samples:
        g = sample_generator(cfg.seed, step, j, "cpu")
        drop.append(torch.rand(1, generator=g) < o.caption_dropout)
        t.append(
            sample_times(
                1,
                g,
                shift=o.time_shift,
                logit_mean=o.logit_mean,
                logit_std=o.logit_std,
                uniform_fraction=o.uniform_fraction,
                t_min=o.t_min,
            )
        )
        r = random_routing(1, n_tokens, cfg.routing.ratio, span, g)  # None = dense
        if r is not None:
            keep.append(r.keep)
            if cfg.routing.path_drop > 0:
                g_drop = sample_generator(cfg.seed, step, j, "cpu", _PATH_DROP_STREAM)
                path_drop.append(torch.rand(1, generator=g_drop) < cfg.routing.path_drop)
        g_dev = g if device.type == "cpu" else sample_generator(cfg.seed, step, j, device)
        eps.append(torch.randn((1, *image_shape), generator=g_dev, device=device))
    routing = None
    if keep:
        dropped = torch.cat(path_drop).to(device, non_blocking=True) if path_drop else None
        routing = Routing(torch.cat(keep).to(device, non_blocking=True), *span, dropped=dropped)
    return Draws(
        torch.cat(drop).to(device, non_blocking=True),
        torch.cat(t).to(device, non_blocking=True),
        torch.cat(eps),
        routing,
    )
