"""One training step, top to bottom: the random draws of every sample (`diffusion.draws`),
the forward pass, every loss term by name with its weight (`compute_losses`: the terms of the
tricks in pixelrun/tricks, in the order of `tricks.table.TERMS`), and the optimizer step around
it with gradient accumulation, clipping, the schedule and the EMA (`train_step`).
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
from typing import cast

import torch

from pixelrun.config import Config
from pixelrun.data import Batch, to_model_range
from pixelrun.diffusion.draws import Draws, step_draws
from pixelrun.diffusion.objective import add_noise
from pixelrun.infra.distributed import clip_gradients, set_gradient_sync
from pixelrun.infra.precision import autocast_dtype
from pixelrun.model.denoiser import PRXDenoiser
from pixelrun.training.build import TrainState
from pixelrun.tricks.base import StepTensors
from pixelrun.tricks.table import TERMS, LossNetworks


@dataclass
class Losses:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


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
    """Every loss term of a step by name: the terms of `tricks.table.TERMS` that are on, in that
    order, each summed with its weight. `step` (the optimizer step) switches REPA off from
    repa.until on; None = a step inside the REPA span."""
    x = to_model_range(batch.images.to(device, non_blocking=True))
    # Caption dropout: the empty prompt's embedding, so classic CFG works at sampling time.
    text = torch.where(draws.drop[:, None, None], null_text, text)
    text_mask = torch.where(draws.drop[:, None], null_mask, text_mask)
    routing, t = draws.routing, draws.t
    x_t = add_noise(x, draws.eps, t, cfg.objective.noise_scale)
    dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    enabled = [term for term in TERMS if term.on(cfg, loss_nets, step)]
    blocks = tuple(b for term in enabled for b in term.features(loss_nets))
    with amp:
        out = model(x_t, t, text, text_mask, routing=routing, return_features=blocks)
    s = StepTensors(cfg, x, x_t, t, out.prediction.float(), out.features, routing, model.cfg.patch_size, amp)
    terms = {term.name: term.loss(s, loss_nets) for term in enabled}
    weights = {term.name: term.weight(cfg) for term in enabled}
    loss = sum(weights[k] * v for k, v in terms.items())  # a tensor: the flow term is always on
    return Losses(cast(torch.Tensor, loss), terms)


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
    patch = cast(PRXDenoiser, st.model).cfg.patch_size
    terms: dict[str, torch.Tensor] = {}
    for m in range(accum):
        batch = next(source)
        stored = (batch.text, batch.text_mask) if batch.text is not None else None
        text, text_mask = (a.to(device) for a in stored or encoder.encode(batch.captions))
        first = (m * ctx.world_size + ctx.rank) * micro  # this micro-batch's place in the global batch
        draws = step_draws(cfg, step, list(range(first, first + micro)), tuple(batch.images.shape[1:]), patch, device)
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
