"""One training step, top to bottom: the random draws of every sample (`diffusion.draws`),
the forward pass, every loss term by name with its weight (`compute_losses`), and the optimizer
step around it with gradient accumulation, clipping, the schedule and the EMA (`train_step`).
The loop, the benchmark and the rehearsal all step through here.

    batch (uint8) -> [-1, 1] -> caption dropout -> noising at t -> model (routing, REPA features)
      -> x-prediction -> flow loss in velocity space (+ REPA, LPIPS, P-DINO) -> backward
      -> (accumulate) -> clip -> optimizer -> schedule -> EMA
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pixelrun.config import Config
from pixelrun.data import Batch, to_model_range
from pixelrun.diffusion.draws import Draws, step_draws
from pixelrun.diffusion.objective import add_noise, velocity_loss
from pixelrun.infra.distributed import clip_gradients, set_gradient_sync
from pixelrun.infra.precision import autocast_dtype
from pixelrun.model.denoiser import gather_tokens
from pixelrun.training.build import LossNetworks, TrainState


@dataclass
class Losses:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


def repa_loss(
    loss_nets: LossNetworks, features: torch.Tensor, x: torch.Tensor, routing, grid: tuple[int, int]
) -> torch.Tensor:
    """-mean cosine between projected block features and the teacher's patch features of the clean
    image on the same token grid. Inside a TREAD span the block only saw the kept tokens, so the
    teacher tokens are gathered at the same indices."""
    target = loss_nets.repa_teacher.features_for_grid(x, *grid)  # [B, L, C], no grad
    if routing is not None and features.shape[1] != target.shape[1]:
        target = gather_tokens(target, routing.keep)
    # through the projector as rows: on a 3-D input Linear returns a view of its 2-D result, and
    # FSDP2 warns on every step that a sharded module's view output could lose its backward hook
    pred = loss_nets.projector(features.reshape(-1, features.shape[-1])).reshape(*features.shape[:-1], -1).float()
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def pdino_loss(teacher, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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


def compute_losses(
    model,
    batch: Batch,
    text,
    text_mask,
    null_text,
    null_mask,
    draws: Draws,
    cfg: Config,
    device,
    loss_nets: LossNetworks | None = None,
    step: int | None = None,
) -> Losses:
    """Every loss term of a step is computed here, by name, and summed with its weight. `step`
    (the optimizer step) switches REPA off from repa.until on; None = a step inside the REPA span."""
    o = cfg.objective
    x = to_model_range(batch.images.to(device, non_blocking=True))
    # Caption dropout: the empty prompt's embedding, so classic CFG works at sampling time.
    text = torch.where(draws.drop[:, None, None], null_text, text)
    text_mask = torch.where(draws.drop[:, None], null_mask, text_mask)
    routing, t = draws.routing, draws.t
    x_t = add_noise(x, draws.eps, t, o.noise_scale)
    dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    repa_on = (
        loss_nets is not None
        and loss_nets.projector is not None
        and cfg.repa.weight > 0
        and (step is None or step < loss_nets.repa_stop)
    )
    with amp:
        out = model(
            x_t, t, text, text_mask, routing=routing, return_features=(loss_nets.repa_block,) if repa_on else ()
        )
    x_hat = out.prediction.float()
    terms = {"flow": velocity_loss(x_hat, x, x_t, t, o.t_clamp)}
    weights = {"flow": 1.0}
    if repa_on:
        patch = model.cfg.patch_size
        grid = (x.shape[2] // patch, x.shape[3] // patch)
        with amp:
            terms["repa"] = repa_loss(loss_nets, out.features[loss_nets.repa_block], x, routing, grid)
        weights["repa"] = cfg.repa.weight
    pc = cfg.perceptual
    # PixelGen applies its perceptual losses at low noise only; in our convention that is t < max_t.
    gate = (t < pc.max_t).float() if pc.max_t is not None else torch.ones_like(t)
    if loss_nets is not None and loss_nets.lpips is not None and pc.lpips_weight > 0:
        from pixelrun.teachers.lpips import lpips_loss

        terms["lpips"] = gated_mean(lpips_loss(loss_nets.lpips, x_hat, x, pc.lpips_scale), gate)
        weights["lpips"] = pc.lpips_weight
    if loss_nets is not None and loss_nets.dino is not None and pc.dino_weight > 0:
        terms["pdino"] = gated_mean(pdino_loss(loss_nets.dino, x_hat, x), gate)
        weights["pdino"] = pc.dino_weight
    loss = sum(weights[k] * v for k, v in terms.items())
    return Losses(loss, terms)


def update_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, ctx) -> bool:
    """Whether the loss of every rank and the global gradient norm are finite. The one host sync of
    a step that is not a logging step: the update must not run on a non-finite gradient, and
    skipping it exactly (parameters, optimizer moments and step counts, EMA all untouched) needs the
    answer before the optimizer runs. Under torchrun the ranks agree through one small all-reduce,
    so they all skip or all step."""
    bad = (~torch.isfinite(loss.detach())).float() + (~torch.isfinite(grad_norm.detach())).float()
    return ctx.sum_over_ranks(bad).item() == 0


def train_step(
    st: TrainState,
    source,
    encoder,
    null_text,
    null_mask,
    cfg: Config,
    step: int,
    micro: int,
    accum: int,
    after_backward: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """One optimizer step: `accum` micro-batches of `micro` images from `source` (forward, backward,
    gradients reduced across ranks on the last one only), clipping by the global norm, the
    optimizer, the schedule and the EMA. Returns the loss terms averaged over the micro-batches, on
    the device, the gradient norm before clipping, and whether the update was applied: a step whose
    loss or gradient norm is not finite changes no parameter, optimizer state or EMA (the schedule
    still advances: it counts steps). `after_backward` is called between the last backward and the
    clipping: where `pixelrun bench` splits its clock."""
    ctx, device = st.ctx, st.ctx.device
    terms: dict[str, torch.Tensor] = {}
    for m in range(accum):
        batch = next(source)
        stored = (batch.text, batch.text_mask) if batch.text is not None else None
        text, text_mask = (a.to(device) for a in stored or encoder.encode(batch.captions))
        first = (m * ctx.world_size + ctx.rank) * micro  # this micro-batch's place in the global batch
        draws = step_draws(
            cfg, step, list(range(first, first + micro)), tuple(batch.images.shape[1:]), st.model.cfg.patch_size, device
        )
        set_gradient_sync(st.trainable.values(), m == accum - 1)
        result = compute_losses(
            st.model, batch, text, text_mask, null_text, null_mask, draws, cfg, device, st.loss_nets, step
        )
        (result.loss / accum).backward()
        for k, v in {"loss": result.loss, **result.terms}.items():
            terms[k] = terms.get(k, 0.0) + v.detach() / accum
    if after_backward is not None:
        after_backward()
    grad_norm = clip_gradients(st.trained_params, cfg.train.grad_clip or math.inf)
    applied = update_is_finite(terms["loss"], grad_norm, ctx)
    if applied:
        st.opt.step()
    st.opt.zero_grad(set_to_none=True)
    st.sched.step()
    if applied:
        st.ema.maybe_update(st.model, step)
    return terms, grad_norm, applied
