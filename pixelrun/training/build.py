"""What a run is made of, built from a config: precision, the model, the batch source, the text
encoder, the teachers and the REPA projector, the optimizer and its schedule, the EMA copy, and the
state a checkpoint saves and restores. Training, the benchmark, evaluation and the rehearsal all
build their parts here, so they are the same parts (torchtitan's `Trainer.__init__`, as a module).

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
from pixelrun.data.sources import source_kind
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import DistContext, shard
from pixelrun.model.denoiser import PRXDenoiser, build_model, compile_blocks
from pixelrun.training.ema import EMA
from pixelrun.tricks.table import LossNetworks

# ----------------------------------------------------------------------------- device, model, data


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on this device (None = plain fp32)."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 / AMX); without, torch emulates
    them tens of times slower than fp32 (measured in docs/benchmarks.md, Muon on the CPU)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def muon_precision_warning(cfg: Config, device: torch.device) -> str | None:
    """bf16 Newton-Schulz is the default on every device (as torch.optim.Muon runs it), but a CPU
    without native bf16 runs it tens of times slower than fp32: say so rather than let a run crawl."""
    if (
        cfg.train.optimizer == "muon"
        and cfg.train.muon_precision == "bf16"
        and device.type == "cpu"
        and not native_cpu_bf16()
    ):
        return (
            "warning: Muon's Newton-Schulz runs in bf16, which this CPU emulates (no AVX512-BF16/AMX): "
            "tens of times slower than with train.muon_precision=fp32"
        )
    return None


def model_from_config(cfg: Config, text_dim: int) -> PRXDenoiser:
    return build_model(cfg.model.preset, text_dim, **model_fields(cfg))


def check_paths(cfg: Config) -> None:
    """What only the machine that runs the job can check (kept out of `config.validate` so a config
    written for a cluster still loads anywhere). Called before any work."""
    source_kind(cfg).check(cfg)
    if cfg.log.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "log.wandb",
                "is true but the wandb package is not installed: pip install wandb "
                "(or pip install 'pixelrun[wandb]'), or set log.wandb=false",
            )


def make_batch_source(cfg: Config, rank: int = 0, world_size: int = 1, say=None):
    """This rank's batches; with data.workers = N > 0 decoded in N processes (the same batches).
    `say` gets the source's notes (malformed caption lines, stored embeddings used or not)."""
    from pixelrun.data.loader import with_workers

    pin = cfg.data.workers > 0 and cfg.train.device != "cpu" and torch.cuda.is_available()
    source = with_workers(source_kind(cfg).build(cfg, rank, world_size, say), cfg.data.workers, pin_memory=pin)
    if say is not None and getattr(source, "text_note", None):  # shards: stored caption embeddings or not
        say(source.text_note)
    return source


def text_encoder(cfg: Config, device):
    from pixelrun.model.text import TextEncoder

    return TextEncoder(cfg.text.encoder, cfg.text.max_tokens, device=device, cache_gib=cfg.text.cache_gib)


# ----------------------------------------------------------------------------- optimizer


def lr_multiplier(step: int, steps: int, warmup: int, cooldown: float) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of train.lr: a linear warm-up
    over `warmup` steps, constant, then (warmup-stable-decay) a linear decay over the last
    round(cooldown * steps) steps, reaching 1/cooldown_steps at the last step (never 0: every step
    of the budget still moves the weights)."""
    m = min(1.0, (step + 1) / max(1, warmup))
    decay = round(cooldown * steps)
    if decay and step >= steps - decay:
        m = min(m, (steps - step) / decay)
    return m


class LRSchedule:
    """The learning rate as a pure function of the step and the config (JiT's `util/lr_sched.py`
    does the same per epoch), so a resume applies the config it runs with: a changed train.lr,
    warm-up or cooldown takes effect, and only the step count comes back from a checkpoint. The
    other optimizer settings of the config (betas, eps, weight decay, Muon's momentum) are re-applied
    after an optimizer state is loaded for the same reason (torch's load_state_dict restores the
    saved ones). Keeps LambdaLR's names (`step`, `get_last_lr`, `state_dict` with `last_epoch`)."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: Config):
        self.opt, t = opt, cfg.train
        self.steps, self.warmup, self.cooldown = t.steps, t.warmup_steps, t.cooldown
        self.settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.last_epoch = 0
        self._apply()
        self.used = self.get_last_lr()

    def _apply(self) -> None:
        m = lr_multiplier(self.last_epoch, self.steps, self.warmup, self.cooldown)
        for group, base in zip(self.opt.param_groups, self.settings):
            group.update(base)
            group["lr"] = base["lr"] * m

    def step(self) -> None:
        self.used = self.get_last_lr()  # what the optimizer step just taken ran with: what the logs show
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """The step count only (also from a checkpoint that saved a LambdaLR's state)."""
        self.last_epoch = int(state["last_epoch"])
        self._apply()


def make_optimizer(model: torch.nn.Module, cfg: Config, extra_adam_modules=()):
    """AdamW, or Muon + AdamW (optim.py), with its learning-rate schedule (`LRSchedule`)."""
    from pixelrun.training.optim import build_optimizer

    t = cfg.train
    opt = build_optimizer(
        model,
        kind=t.optimizer,
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        muon_lr=t.muon_lr,
        muon_momentum=t.muon_momentum,
        muon_ns_dtype=t.muon_precision,
        muon_ns_steps=t.muon_ns_steps,
        extra_adam_modules=extra_adam_modules,
    )
    return opt, LRSchedule(opt, cfg)


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
