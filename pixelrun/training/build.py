"""What a run is made of, built from a config: the model, its EMA copy, the teachers and the REPA
projector, the optimizer and its schedule, parallelised, and the state a checkpoint saves and
restores. Training, the benchmark and the rehearsal all build their parts here, so they are the same
parts (torchtitan's `Trainer.__init__`, as a module). The pieces live in their rooms: precision in
infra/precision.py, the model in model/denoiser.py, the text encoder in model/text.py, the batch
source in data/sources.py, the optimizer in training/optim.py and its schedule in training/schedule.py.

Live objects are arguments, settings come from the config: nothing here trains, samples or logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pixelrun.config import (
    Config,
    ConfigError,
    config_from_dict,
    image_sizes,
    model_fields,
    resume_changes,
)
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import DistContext, shard
from pixelrun.infra.precision import autocast_dtype
from pixelrun.model.denoiser import PRXDenoiser, compile_blocks, model_from_config
from pixelrun.training.ema import EMA
from pixelrun.training.optim import make_optimizer
from pixelrun.training.schedule import LRSchedule
from pixelrun.tricks.table import LossNetworks

# ----------------------------------------------------------------------------- the state of a run


@dataclass
class TrainState:
    """Everything a checkpoint saves and restores, built once per run, parallelised."""

    ctx: DistContext
    model: torch.nn.Module
    ema: EMA
    loss_nets: LossNetworks
    trainable: torch.nn.ModuleDict  # the trained modules by name: the denoiser, and the REPA projector
    opt: torch.optim.Optimizer
    sched: LRSchedule

    @property
    def trained_params(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def state_dicts(self, with_optimizer: bool = True) -> dict:
        """The tensors of a checkpoint, sharded as they are (DCP writes each rank's shards)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if with_optimizer:
            model_sd, optim_sd = get_state_dict(self.trainable, self.opt)
            return {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(self.ema.model)}
        return {"model": get_model_state_dict(self.trainable), "ema": get_model_state_dict(self.ema.model)}

    def restore(self, path: Path, meta: dict) -> None:
        """Resume: model, EMA, optimizer and schedule from a checkpoint written on any number of ranks,
        every tensor of it (`check_resume` has refused a config whose shapes differ)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        tree = self.state_dicts()
        ckpt.load_tensors(path, tree)
        set_model_state_dict(self.trainable, tree["model"])
        set_model_state_dict(self.ema.model, tree["ema"])
        set_optimizer_state_dict(self.trainable, self.opt, tree["optimizer"])
        self.sched.load_state_dict(meta["scheduler"])  # after the optimizer: it re-applies the config's settings
        torch.set_rng_state(meta["torch_rng"])

    def init_weights(self, path: Path) -> list[str]:
        """`run.init_from`: weights and EMA of a checkpoint or an exported model, nothing else. Returns
        the notes to print (a REPA projector the source lacks starts fresh)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if (path / ckpt.EXPORT_FILE).is_file():  # an exported model: weights only, loaded on each rank
            plain = PRXDenoiser(self.model.cfg)  # an unsharded twin; load_weights checks every shape
            ckpt.load_weights(path, plain)
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, plain.state_dict(), options=full)
            set_model_state_dict(self.ema.model, plain.state_dict(), options=full)
            return []
        saved = ckpt.saved_keys(path)
        tree = self.state_dicts(with_optimizer=False)
        missing = [k for k in tree["model"] if f"model.{k}" not in saved]
        ckpt.load_tensors(path, tree, partial=bool(missing))
        set_model_state_dict(self.trainable, tree["model"])
        set_model_state_dict(self.ema.model, tree["ema"])
        if any(k.startswith("repa_projector.") for k in missing):
            return ["REPA projector: not in the checkpoint, starting from a fresh one"]
        return []


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


def build_state(cfg: Config, stages: list[Config], ctx: DistContext, text_dim: int) -> TrainState:
    """The model, its EMA copy, teachers and projector, optimizer and schedule, parallelised as the
    config asks: per-block compile and activation checkpointing, then FSDP2 sharding."""
    device = ctx.device
    model = model_from_config(cfg, text_dim).to(device)
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    ema = EMA(model, cfg.ema.decay, cfg.ema.every)  # copied before compiling: the EMA only samples
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


# ----------------------------------------------------------------------------- what may continue what


def check_resume(cfg: Config, saved: dict, path: Path) -> list[str]:
    """Before any work: a resume must continue the same run. A change of the model, the optimizer or
    the data is a ConfigError naming each key; any other change is returned as a line to print."""
    refused, allowed = resume_changes(config_from_dict(saved), cfg)
    if refused:
        what = ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in refused.items())
        raise ConfigError(
            ", ".join(refused),
            f"differs from the checkpoint {path} that this command would resume: "
            f"{what}. A resume continues the same model, optimizer and data; to "
            f"start a new run from those weights, set run.init_from={path} and a "
            f"new run.dir",
        )
    return [f"changed since the checkpoint: {k}: {a} -> {b}" for k, (a, b) in allowed.items()]


def check_init_from(cfg: Config, path: Path, text_dim: int) -> None:
    """`run.init_from` loads weights into this config's model: the architecture and the text width
    must be the source's (the optimizer and data may differ: it is a new run)."""
    saved, saved_dim = ckpt.saved_config(path)
    old, new = model_fields(config_from_dict(saved)), model_fields(cfg)
    diff = [f"model.{k} {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]
    if saved_dim != text_dim:
        diff.append(
            f"text width {saved_dim} -> {text_dim} (text.encoder {saved['text']['encoder']} -> {cfg.text.encoder})"
        )
    if diff:
        raise ConfigError("run.init_from", f"{path} has another architecture: {', '.join(diff)}")
