"""What a run is made of, built from a config: precision, the model, the batch source, the text
encoder, the teachers and the REPA projector, the optimizer and its schedule, the EMA copy, and the
state a checkpoint saves and restores. Training, the benchmark, evaluation and the rehearsal all
build their parts here, so they are the same parts (torchtitan's `Trainer.__init__`, as a module).

Live objects are arguments, settings come from the config: nothing here trains, samples or logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixelrun.config import (
    Config,
    ConfigError,
    image_sizes,
    model_fields,
    repa_block,
    repa_hidden,
    repa_stop_step,
)
from pixelrun.data.sources import source_kind
from pixelrun.infra.distributed import DistContext, shard
from pixelrun.model.denoiser import PRXDenoiser, build_model, compile_blocks
from pixelrun.training.ema import EMA
from pixelrun.training.state import ModelWeights, OptimizerState, ScheduleState, Stateful

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


# ----------------------------------------------------------------------------- teachers and projector


class LossNetworks(torch.nn.Module):
    """What the extra loss terms need besides the model: the REPA projector (trained, in the Adam
    group, saved in checkpoints) and frozen teachers (never trained, never saved). Kept outside the
    denoiser so parallelism, EMA and export only ever see the denoiser itself."""

    def __init__(self, cfg: Config, hidden_size: int, device, stages: list[Config] = ()):
        """Builds what `cfg` (or any of `stages`: a staged run keeps one projector throughout)
        switches on."""
        super().__init__()
        every = [cfg, *stages]
        self.repa_block = repa_block(cfg)
        self.repa_stop = repa_stop_step(cfg)  # REPA is off from this step on (repa.until)
        self.repa_teacher = self.projector = self.lpips = self.dino = None
        if any(c.repa.weight > 0 for c in every):
            from pixelrun.teachers.features import load_teacher

            self.repa_teacher = load_teacher(cfg.repa.teacher)
            h = repa_hidden(cfg)
            self.projector = torch.nn.Sequential(
                torch.nn.Linear(hidden_size, h),
                torch.nn.SiLU(),
                torch.nn.Linear(h, h),
                torch.nn.SiLU(),
                torch.nn.Linear(h, self.repa_teacher.dim),
            )
        if any(c.perceptual.lpips_weight > 0 for c in every):
            from pixelrun.teachers.lpips import load_lpips

            self.lpips = load_lpips(cfg.perceptual.lpips)
        if any(c.perceptual.dino_weight > 0 for c in every):
            from pixelrun.teachers.features import load_teacher

            self.dino = load_teacher(cfg.perceptual.dino_teacher)
        self.to(device)

    def describe(self, cfg: Config) -> list[str]:
        lines = []
        if self.projector is not None and cfg.repa.weight > 0:
            lines.append(
                f"REPA: block {self.repa_block} -> projector -> {self.repa_teacher.name}, weight {cfg.repa.weight}"
            )
        if self.lpips is not None and cfg.perceptual.lpips_weight > 0:
            lines.append(
                f"LPIPS: {self.lpips.source}, weight {cfg.perceptual.lpips_weight}, scale {cfg.perceptual.lpips_scale}"
            )
        if self.dino is not None and cfg.perceptual.dino_weight > 0:
            lines.append(f"P-DINO: {self.dino.name}, weight {cfg.perceptual.dino_weight}")
        return lines


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
