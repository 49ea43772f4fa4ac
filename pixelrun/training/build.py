"""What a run is made of, built from a config: the model, its EMA copy, the teachers and the REPA
projector, the optimizer and its schedule, parallelised; its checkpoint's parts (`TrainState.parts`).
Training, the benchmark and the rehearsal all build their parts here, so they are the same parts
(torchtitan's `Trainer.__init__`, as a module). The pieces live in their rooms: precision in
infra/precision.py, the model in model/denoiser.py, the text encoder in model/text.py, the batch
source in data/sources.py, the tricks' networks in tricks/, the optimizer in training/optim.py and
its schedule in training/schedule.py; resuming is run/resume.py.

Live objects are arguments, settings come from the config: nothing here trains, samples or logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pixelrun.config import Config, ema_decays, image_sizes, model_fields
from pixelrun.infra.distributed import DistContext, shard
from pixelrun.infra.precision import autocast_dtype
from pixelrun.model.denoiser import PRXDenoiser, compile_blocks, model_from_config
from pixelrun.model.lora import add_adapters, lora_on
from pixelrun.training.ema import EMA
from pixelrun.training.optim import make_optimizer
from pixelrun.training.schedule import LRSchedule
from pixelrun.training.state import ModelWeights, OptimizerState, ScheduleState, Stateful
from pixelrun.tricks.table import LossNetworks

# ----------------------------------------------------------------------------- the state of a run


@dataclass
class TrainState:
    """The trained state of a run, built once, parallelised; `parts()` are its checkpoint's parts."""

    ctx: DistContext
    model: PRXDenoiser
    ema: EMA
    loss_nets: LossNetworks
    trainable: torch.nn.ModuleDict  # the trained modules by name: the denoiser, and the REPA projector
    opt: torch.optim.Optimizer
    sched: LRSchedule

    @property
    def trained_params(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def parts(self) -> dict[str, Stateful]:
        """The checkpoint's parts that this state holds, in load order (pixelrun/training/state.py);
        the run adds its RNG, data position, counters and identity."""
        return {
            "model": ModelWeights(self.trainable),
            "optimizer": OptimizerState(self.trainable, self.opt),
            "ema": self.ema,
            "schedule": ScheduleState(self.sched),
        }


def block_graphs(stages: list[Config]) -> int:
    """How many input variants a compiled block meets in a run of `stages` (each a graph under
    `compile_blocks`' static shapes): per stage, every bucket's token count N at the micro-batch,
    with grad, and its TREAD count K when routing; without grad, the validation loss's square
    images in chunks of the micro-batch and the remainder. Sampling runs the EMA copy, which is not
    compiled. Plus a margin of 4."""
    from pixelrun.model.routing import kept_count

    variants = set()
    for c in stages:
        p, b = model_fields(c)["patch_size"], c.train.batch_size
        for h, w in image_sizes(c):
            n = (h // p) * (w // p)
            variants |= {(True, b, n)} | ({(True, b, kept_count(n, c.routing.ratio))} if c.routing.ratio else set())
        if c.eval.val_images:
            square = (c.data.resolution // p) ** 2
            variants |= {(False, min(b, c.eval.val_images), square), (False, c.eval.val_images % b or b, square)}
    return len(variants) + 4


def build_state(
    cfg: Config,
    stages: list[Config],
    ctx: DistContext,
    text_dim: int,
    base: Callable[[PRXDenoiser], None] | None = None,
) -> TrainState:
    """The model, its EMA copy, teachers and projector, optimizer and schedule, parallelised as the
    config asks: per-block compile and activation checkpointing, then FSDP2 sharding. With
    train.lora.rank, `base` loads the frozen base weights into the plain model before the adapters
    are added (pixelrun/model/lora.py); without it (the bench) they are the seed's."""
    device = ctx.device
    model = model_from_config(cfg, text_dim).to(device)
    if lora_on(cfg):
        if base is not None:
            base(model)
        add_adapters(model, cfg.train.lora)
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    ema = EMA(model, ema_decays(cfg), cfg.ema.every)  # copied before compiling: the EMAs only sample
    if cfg.parallel.compile:
        compile_blocks(model, block_graphs(stages or [cfg]))
    loss_nets = LossNetworks(cfg, model.cfg.hidden_size, device, stages=stages)
    dtype = autocast_dtype(cfg, device)
    shard(model, ctx, dtype, blocks=model.blocks)
    ema.shard(ctx)
    trainable = torch.nn.ModuleDict({"denoiser": model})
    if loss_nets.projector is not None:
        trainable["repa_projector"] = shard(loss_nets.projector, ctx, dtype)
    opt, sched = make_optimizer(
        model, cfg, extra_adam_modules=[loss_nets.projector] if loss_nets.projector is not None else []
    )
    return TrainState(ctx, model, ema, loss_nets, trainable, opt, sched)
