"""The FLOPs of a config, counted once for the training log (MFU and the FLOPs axis of evaluation
points), `pixelrun bench` and `pixelrun ablate`:

- the denoiser's analytic count (pixelrun/model/flops.py), routed as the config routes
  (pixelrun/tricks/routing.py): `stage_model_flops`, and `analytic_flops_per_image` for a run
  (its last stage);
- the tricks' networks (REPA's teacher and projector, LPIPS, P-DINO's teacher), which torch's
  FlopCounterMode counts on a one-image step (`measured_step_flops`) with and without them:
  `flops_per_image`, the cost `pixelrun ablate` spends budgets with;
- the EMAs past the first (ema.decays): each update is a lerp, 3 FLOPs per parameter, every
  ema.every steps, spread over a step's images (`extra_ema_flops_per_image`); the first EMA is every
  run's and stays out, so a run of one EMA counts as it always did. The sampler (sample.sampler,
  the guidance interval) costs nothing in training: its cost is the NFE each report shows;
- `mfu`: achieved model FLOP/s over the device's peak (pixelrun/infra/devices.py).
"""

from __future__ import annotations

import torch

from pixelrun.config import Config, ema_decays, model_fields, stage_plan, to_dict, with_overrides
from pixelrun.model.denoiser import ModelConfig, model_from_config
from pixelrun.tricks import repa, routing
from pixelrun.tricks.table import WITH_NETWORKS, LossNetworks


def stage_model_flops(cfg: Config, text_dim: int) -> float:
    """The denoiser's training FLOPs per image of a single-stage config: at its square resolution
    and text length, routed when it routes."""
    model_cfg = ModelConfig(text_dim=text_dim, **model_fields(cfg))
    return float(routing.denoiser_flops(cfg, model_cfg, cfg.text.max_tokens)["training_total"])


def analytic_flops_per_image(cfg: Config, text_dim: int) -> float:
    """The denoiser's training FLOPs per image (pixelrun/model/flops.py) at the last stage's square
    resolution, routed when it routes: the FLOPs axis when log.flops_per_image is not given."""
    return stage_model_flops(stage_plan(cfg)[-1][2], text_dim)


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: one device's achieved model FLOP/s over its peak (None when the
    peak is not known: no made-up number)."""
    return flops_per_s / peak if peak else None


def measured_step_flops(cfg: Config, loss_nets: LossNetworks, device, text_dim: int, text_tokens: int) -> int:
    """FLOPs of a one-image training step (forward + backward, teachers included) as torch's
    FlopCounterMode counts them (matmuls, attention, convolutions). Run on an eager, unsharded
    twin of the model: not compiled, without activation checkpointing, whose recompute model FLOPs
    leave out. SDPA is pinned to the math backend: FlopCounterMode counts the CPU flash kernel as 0
    FLOPs and the CUDA flash kernels' backward with its score recompute; the math backend's bmm's
    it counts as the model computes them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pixelrun.data import Batch
    from pixelrun.diffusion.draws import step_draws
    from pixelrun.training.step import compute_losses

    model = model_from_config(cfg, text_dim).to(device)
    res = cfg.data.resolution
    images = torch.randint(0, 256, (1, 3, res, res), dtype=torch.uint8, device=device)
    text = torch.randn(1, text_tokens, text_dim, device=device)
    mask = torch.ones(1, text_tokens, dtype=torch.bool, device=device)
    draws = step_draws(cfg, 0, [0], (3, res, res), model.cfg.patch_size, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        losses = compute_losses(model, Batch(images, [""]), text, mask, text * 0, mask, draws, cfg, device, loss_nets)
        losses.loss.backward()
    loss_nets.zero_grad(set_to_none=True)
    return counter.get_total_flops()


LERP_FLOPS = 3  # ema + w * (model - ema): a subtraction, a multiplication and an addition per parameter


def extra_ema_flops_per_image(cfg: Config, text_dim: int, global_batch: int | None = None) -> float:
    """The training FLOPs per image of the EMAs past the first: LERP_FLOPS per denoiser parameter per
    update, one update every ema.every steps of `global_batch` images (None: train.global_batch_size,
    or one rank's train.batch_size)."""
    extra = len(ema_decays(cfg)) - 1
    if extra == 0:
        return 0.0
    with torch.device("meta"):  # counted without allocating (the speedrun model is 1.2B parameters)
        params = sum(p.numel() for p in model_from_config(cfg, text_dim).parameters())
    batch = global_batch or cfg.train.global_batch_size or cfg.train.batch_size
    return float(extra * LERP_FLOPS * params) / (cfg.ema.every * batch)


def flops_per_image(cfg: Config, text_dim: int, global_batch: int | None = None) -> float:
    """The FLOPs `pixelrun ablate` spends budgets with: `_network_flops_per_image` and the EMAs past
    the first (`extra_ema_flops_per_image`, spread over `global_batch` images a step)."""
    return _network_flops_per_image(cfg, text_dim) + extra_ema_flops_per_image(cfg, text_dim, global_batch)


def _network_flops_per_image(cfg: Config, text_dim: int) -> float:
    """Training FLOPs of one image: the denoiser's analytic count plus the tricks' networks' (REPA's
    teacher and projector, LPIPS, P-DINO's teacher: `tricks.table.WITH_NETWORKS`), which
    FlopCounterMode counts as the difference between a one-image step with and without them (the
    same model, the same draws). REPA's share counts for the repa.until fraction of the steps it
    runs: the run's mean."""
    analytic = analytic_flops_per_image(cfg, text_dim)
    if not any(trick.uses_networks(cfg) for trick in WITH_NETWORKS):
        return analytic
    bare = with_overrides(to_dict(cfg), [off for trick in WITH_NETWORKS for off in trick.OFF])
    device = torch.device("cpu")
    torch.manual_seed(0)
    width = model_fields(cfg)["hidden_size"]

    def extra(c: Config) -> float:  # FLOPs the tricks' networks of `c` add to one image
        tokens = c.text.max_tokens
        return float(
            measured_step_flops(c, LossNetworks(c, width, device), device, text_dim, tokens)
            - measured_step_flops(bare, LossNetworks(bare, width, device), device, text_dim, tokens)
        )

    if not repa.runs_part(cfg):
        return analytic + extra(cfg)
    no_repa = with_overrides(to_dict(cfg), repa.OFF)
    return analytic + cfg.repa.until * extra(cfg) + (1 - cfg.repa.until) * extra(no_repa)
