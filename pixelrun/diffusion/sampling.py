"""Sampling from t = 1 (noise) to t = 0 (image): Euler or Heun, with optional guidance, on all steps
or only inside a guidance interval.

The network predicts x_hat; every evaluation turns it into a velocity with the same clamp as
training (objective.x_to_velocity). Euler takes x <- x + (t_next - t) * v. Heun (sampler "heun")
averages that velocity with the one at the Euler step's end, as JiT samples: LTH14/JiT denoiser.py,
`Denoiser._heun_step`, and `Denoiser.generate`, whose last step is `_euler_step` (the end of the last
step is t = 0, the clean image; read in forks of JiT, the index holding no copy of LTH14/JiT itself).
A guidance interval [lo, hi] guides only the evaluations at lo < t <= hi, as Kynkäänniemi et al.
2024 guide sigma in (sigma_lo, sigma_hi]; JiT's `Denoiser._forward_sample` masks its CFG scale to 1
outside (interval_min, interval_max) in its own time, 1 minus ours, and still runs both passes:
here a step outside the interval runs the conditional pass alone (`model_evaluations` counts them).
Initial noise is drawn as diffusers' PRXPixelPipeline draws it: one `torch.randn` of the whole
batch from a CPU `torch.Generator().manual_seed(seed)`, times the noise scale.

Guidance modes: "cfg" (classic, against the empty prompt), "none", "self" (self-guidance for
TREAD-routed models, Guided Token-Sparse Diffusion): the model's own routed pass plays the weak
model that guidance pushes away from, so no empty prompt is needed; and "pathdrop" (SPRINT's
path-drop guidance, Park et al. 2025): the weak branch is the empty prompt's pass with the deep path
dropped, the span's blocks skipped and SPRINT's mask token in their place, so the weak pass costs
only the blocks outside the span.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from pixelrun.config import GUIDANCE_MODES, SAMPLERS, SPACINGS, span_for_depth
from pixelrun.diffusion.objective import shift_time, x_to_velocity
from pixelrun.model.denoiser import Routing
from pixelrun.model.routing import path_drop_routing, random_routing, routing_generator


def time_grid(
    steps: int, shift: float = 3.0, spacing: str = "diffusers", num_train_timesteps: int = 1000
) -> torch.Tensor:
    """The steps+1 times visited by the sampler, from 1 down to exactly 0.

    - "diffusers": what `FlowMatchEulerDiscreteScheduler(shift=s)` does, so an exported pipeline
      called plainly reproduces our images: u = linspace(1, shift(1/T), N), t = shift(u), then 0.
    - "linear": Photoroom's training repository: t = shift(linspace(1, 0, N+1)).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if spacing == "diffusers":
        u_min = shift_time(1.0 / num_train_timesteps, shift)
        u = np.linspace(1.0, u_min, steps)
        t = np.append(shift_time(u, shift), 0.0)
    elif spacing == "linear":
        t = shift_time(np.linspace(1.0, 0.0, steps + 1), shift)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return torch.tensor(t, dtype=torch.float32)


def initial_noise(batch: int, height: int, width: int, seed: int, noise_scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, height, width), generator=g) * noise_scale


def _model_cfg(model):
    """The denoiser's ModelConfig, looking through torch.compile / DDP-style wrappers."""
    for m in (model, getattr(model, "_orig_mod", None), getattr(model, "module", None)):
        cfg = getattr(m, "cfg", None)
        if cfg is not None and hasattr(cfg, "patch_size"):
            return cfg
    raise ValueError("self-guidance needs the model's patch size to count tokens: the model has no cfg.patch_size")


def self_guidance_routing(
    batch: int, n_tokens: int, span: tuple[int, int], ratio: float, seed: int, device=None
) -> Routing:
    """The routing that guidance mode "self" uses for a whole sampling run: one mask per sample.

    Drawn once from `routing_generator(seed)`, a CPU generator separate from (and not correlated
    with) the noise generator, so the initial noise is the same as in the other modes and the
    masks do not depend on the device. Exposed so tests and tools can rebuild the exact mask.
    """
    routing = random_routing(batch, n_tokens, ratio, span, routing_generator(seed), device=device)
    if routing is None:
        raise ValueError("self-guidance needs routing_ratio > 0 (ratio 0 makes the routed pass the dense one)")
    return routing


def _self_routing(
    model, routing_span: tuple[int, int] | None, height: int, width: int, b: int, ratio: float, seed: int, device
) -> Routing:
    """Guidance mode "self"'s routing, its span checked against the model's depth."""
    if routing_span is None:
        raise ValueError(
            "guidance mode 'self' needs routing_span=(start, end), the model's routed blocks "
            "(see pixelrun.config.span_for_depth)"
        )
    mcfg = _model_cfg(model)
    if getattr(mcfg, "depth", None) is not None:  # a span past the last block would never scatter back
        routing_span = span_for_depth(mcfg.depth, *routing_span)
    p = mcfg.patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    return self_guidance_routing(
        b, (height // p) * (width // p), (routing_span[0], routing_span[1]), ratio, seed, device
    )


def _guided_prediction(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    guidance: float,
    both: tuple[torch.Tensor, torch.Tensor] | None,
    routing: Routing | None,
    path_drop: tuple[torch.Tensor, torch.Tensor, Routing] | None = None,
) -> torch.Tensor:
    """One step's x_hat: classic CFG when `both` (the [uncond ; cond] text and mask) is given,
    self-guidance when `routing` is, path-drop guidance when `path_drop` (the empty prompt's text and
    mask, and a routing keeping no token: SPRINT's deep stream is then the mask token everywhere) is,
    else the conditional prediction alone."""
    if path_drop is not None:
        cond = model(x, t, text, text_mask).prediction.float()
        weak = model(x, t, *path_drop[:2], routing=path_drop[2]).prediction.float()
        return weak + guidance * (cond - weak)
    if both is not None:
        pred = model(torch.cat([x, x]), torch.cat([t, t]), *both).prediction.float()
        uncond, cond = pred.chunk(2)
        return uncond + guidance * (cond - uncond)
    if routing is not None:
        dense = model(x, t, text, text_mask).prediction.float()
        routed = model(x, t, text, text_mask, routing=routing).prediction.float()
        return routed + guidance * (dense - routed)
    return model(x, t, text, text_mask).prediction.float()


def _path_drop(model, null_text, null_mask, b: int, device) -> tuple[torch.Tensor, torch.Tensor, Routing]:
    """Guidance mode "pathdrop"'s weak branch inputs: the empty prompt for the batch and a routing
    that keeps no token over the model's SPRINT span."""
    span = getattr(_model_cfg(model), "sprint_span", None)
    if span is None:
        raise ValueError("guidance mode 'pathdrop' needs a SPRINT model (routing.kind=sprint)")
    return *_empty_prompt(null_text, null_mask, b, "path-drop guidance"), path_drop_routing(b, span, device)


def _empty_prompt(null_text, null_mask, b: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's embedding and mask repeated for a batch of `b`."""
    if null_text is None or null_mask is None:
        raise ValueError(f"{who} needs the empty prompt's embedding (null_text)")
    return null_text.expand(b, -1, -1), null_mask.expand(b, -1)


@torch.no_grad()
def sample(
    model,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    null_text: torch.Tensor | None = None,
    null_mask: torch.Tensor | None = None,
    height: int,
    width: int,
    steps: int = 28,
    guidance: float = 4.0,
    guidance_mode: str = "cfg",
    shift: float = 3.0,
    spacing: str = "diffusers",
    noise_scale: float = 1.0,
    t_clamp: float = 0.05,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress=None,
    routing_span: tuple[int, int] | None = None,
    routing_ratio: float = 0.5,
    sampler: str = "euler",
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] for the prompts whose embeddings are given.

    sampler "euler" or "heun" (see the module's docstring); `guidance_interval` (lo, hi): the
    guidance below applies only to evaluations at noise levels lo < t <= hi (`guided_at`).

    guidance_mode "cfg": x_hat = x_uncond + w * (x_cond - x_uncond) against the empty prompt
    (`null_text`), run as one batch [uncond ; cond] like diffusers; skipped when w == 1 as there.
    guidance_mode "none": the conditional prediction alone.
    guidance_mode "self": each step runs a dense pass and a TREAD-routed pass, both with the real
    prompt, and x_hat = x_routed + w * (x_dense - x_routed). The routed pass skips
    `routing_span` (start, end inclusive, e.g. `config.span_for_depth(depth)`) for a fraction
    `routing_ratio` of the tokens, as in training. One mask per sample is drawn once from `seed`
    (`self_guidance_routing`) and kept for every step: a mask redrawn each step would add noise to
    the guidance direction. The two passes are separate forward calls (different token counts in
    the span). Skipped, like CFG, when w == 1 (the dense prediction alone).
    guidance_mode "pathdrop" (SPRINT models): x_weak + w * (x_cond - x_weak) (`_guided_prediction`).
    """
    if guidance_mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {guidance_mode!r}; choose one of {GUIDANCE_MODES}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    device = text.device
    b = text.shape[0]
    use_cfg = guidance_mode == "cfg" and guidance != 1.0
    use_self = guidance_mode == "self" and guidance != 1.0
    path_drop = _path_drop(model, null_text, null_mask, b, device) if guidance_mode == "pathdrop" else None
    routing = None
    if guidance_mode == "self":
        # Drawn (and validated) even when w == 1 skips the routed pass, so errors do not depend on w.
        routing = _self_routing(model, routing_span, height, width, b, routing_ratio, seed, device)
    both = None
    if use_cfg:
        null, null_b = _empty_prompt(null_text, null_mask, b, "classic CFG")
        both = (torch.cat([null, text]), torch.cat([null_b, text_mask]))
    x = initial_noise(b, height, width, seed, noise_scale).to(device)
    times = time_grid(steps, shift, spacing)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t = times[i].to(device).expand(b)
        guided = guided_at(float(times[i]), guidance_interval)  # outside: the conditional pass alone
        with amp:
            x_hat = _guided_prediction(
                model,
                x,
                t,
                text,
                text_mask,
                guidance,
                both if guided else None,
                routing if use_self and guided else None,
                path_drop if guidance != 1.0 and guided else None,
            )
        return x_to_velocity(x, x_hat, t, t_clamp)

    return integrate(velocity, x, times, sampler, progress).clamp(-1, 1)


def integrate(velocity, x: torch.Tensor, times: torch.Tensor, sampler: str = "euler", progress=None) -> torch.Tensor:
    """x carried along `times` by `velocity(x, i)` (the velocity at x and times[i]): Euler steps,
    or Heun's (the velocity averaged with the one at the Euler step's end) but for the last step,
    which is Euler's as JiT's `Denoiser.generate` ends (its end is t = 0, the clean image)."""
    steps = len(times) - 1
    for i in range(steps):
        dt = (times[i + 1] - times[i]).item()
        v = velocity(x, i)
        if sampler == "heun" and i < steps - 1:
            v = 0.5 * (v + velocity(x + dt * v, i + 1))
        x = x + dt * v
        if progress is not None:
            progress.update(1)
    return x


def guided_at(t: float, interval: tuple[float, float] | None) -> bool:
    """Whether the evaluation at noise level t is guided: always without an interval; inside
    (lo, hi] with one (so [0, 1] guides every evaluation, t = 0 is never evaluated, and [a, a] none)."""
    return interval is None or interval[0] < t <= interval[1]


def model_evaluations(
    steps: int,
    *,
    sampler: str = "euler",
    guidance: float = 4.0,
    guidance_mode: str = "cfg",
    guidance_interval: tuple[float, float] | None = None,
    shift: float = 3.0,
    spacing: str = "diffusers",
) -> int:
    """The model's forward passes per image that `sample` runs (the NFE): a guided evaluation costs
    two (CFG's [uncond ; cond] batch, self-guidance's dense and routed pass, path-drop guidance's
    full and path-dropped pass, although the latter skips the span), an unguided one
    (guidance 1, mode none, outside the interval) one; Heun evaluates each step's start and end
    but for the last step, which is Euler's."""
    times = time_grid(steps, shift, spacing)
    guides = guidance_mode in ("cfg", "self", "pathdrop") and guidance != 1.0

    def cost(i: int) -> int:
        return 2 if guides and guided_at(float(times[i]), guidance_interval) else 1

    return sum(cost(i) + (cost(i + 1) if sampler == "heun" and i < steps - 1 else 0) for i in range(steps))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (rounded, not truncated)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
