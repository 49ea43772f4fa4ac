"""The training loop. One step, top to bottom, is `training_step`; everything else is bookkeeping:
data -> text embeddings (cached) -> noising -> model -> named loss terms -> optimizer -> EMA,
with logs, sample grids, atomic checkpoints and exact resume around it.
"""
from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from .distributed import DistContext, clip_gradients, init_distributed, local, set_gradient_sync, shard, shutdown
from .config import (Config, batch_split, check_paths, image_sizes, model_fields, repa_block, routing_span,
                     stage_plan, to_dict, to_yaml)
from .data import Batch, Prefetcher, to_model_range
from .model import PRXDenoiser, Routing, build_model, compile_blocks, count_parameters, gather_tokens
from .objective import add_noise, sample_times, velocity_loss
from .routing import random_routing
from .text import TextEncoder


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"train.device={name} but CUDA is not available on this machine")
    return torch.device(name)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on this device (None = plain fp32)."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def model_from_config(cfg: Config, text_dim: int) -> PRXDenoiser:
    fields = model_fields(cfg)
    return build_model(cfg.model.preset, text_dim, **{k: v for k, v in fields.items()})


def make_batch_source(cfg: Config, rank: int = 0, world_size: int = 1):
    """This rank's batches; with data.workers = N > 0 decoded in N processes (the same batches)."""
    from .data.loader import with_workers

    pin = cfg.data.workers > 0 and cfg.train.device != "cpu" and torch.cuda.is_available()
    return with_workers(_plain_batch_source(cfg, rank, world_size), cfg.data.workers, pin_memory=pin)


def _plain_batch_source(cfg: Config, rank: int, world_size: int):
    sizes = image_sizes(cfg)
    if cfg.data.source == "shapes":
        from .data.shapes import ShapesBatchSource

        return ShapesBatchSource(cfg.seed, "train", cfg.train.batch_size, sizes, cfg.data.max_shapes, rank, world_size)
    if cfg.data.source == "emoji":
        from .data.emoji import EmojiBatchSource

        return EmojiBatchSource(cfg.seed, cfg.train.batch_size, sizes, rank, world_size)
    if cfg.data.source == "shards":
        from .data.shards import ShardBatchSource
        from .text import encoder_fingerprint

        return ShardBatchSource(cfg.data.path, cfg.train.batch_size, sizes, cfg.seed, rank, world_size,
                                captions=cfg.data.captions,
                                text_encoder=(encoder_fingerprint(cfg.text.encoder), cfg.text.max_tokens))
    from .data.folder import FolderBatchSource, ImageFolder

    folder = ImageFolder(cfg.data.path)
    if rank == 0 and folder.caption_note:
        tqdm.write(folder.caption_note)
    return FolderBatchSource(folder, cfg.train.batch_size, sizes, cfg.seed, rank, world_size)


class EMA:
    """Exponential moving average of the weights, kept in fp32, updated every `every` steps.

    Under FSDP2 the EMA copy is sharded exactly like the model, so each rank averages its own
    shards with no communication."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every = decay, every

    @torch.no_grad()
    def maybe_update(self, model: torch.nn.Module, step: int):
        if step % self.every == 0:
            ema_p = [local(p) for p in self.model.parameters()]
            torch._foreach_lerp_(ema_p, [local(p.detach()) for p in model.parameters()], 1.0 - self.decay)


@dataclass
class StepResult:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class Auxiliary(torch.nn.Module):
    """What the extra loss terms need besides the model: the REPA projector (trained, in the Adam
    group, saved in checkpoints) and frozen teachers (never trained, never saved). Kept outside the
    denoiser so parallelism, EMA and export only ever see the denoiser itself."""

    def __init__(self, cfg: Config, hidden_size: int, device, stages: list[Config] = ()):
        """Builds what `cfg` (or any of `stages`: a staged run keeps one projector throughout)
        switches on."""
        super().__init__()
        every = [cfg, *stages]
        self.repa_block = repa_block(cfg)
        self.repa_teacher = self.projector = self.lpips = self.dino = None
        if any(c.repa.weight > 0 for c in every):
            from .teachers.features import load_teacher

            self.repa_teacher = load_teacher(cfg.repa.teacher)
            h = cfg.repa.hidden
            self.projector = torch.nn.Sequential(
                torch.nn.Linear(hidden_size, h), torch.nn.SiLU(), torch.nn.Linear(h, h), torch.nn.SiLU(),
                torch.nn.Linear(h, self.repa_teacher.dim))
        if any(c.perceptual.lpips_weight > 0 for c in every):
            from .teachers.lpips import load_lpips

            self.lpips = load_lpips(cfg.perceptual.lpips)
        if any(c.perceptual.dino_weight > 0 for c in every):
            from .teachers.features import load_teacher

            self.dino = load_teacher(cfg.perceptual.dino_teacher)
        self.to(device)

    def describe(self, cfg: Config) -> list[str]:
        lines = []
        if self.projector is not None and cfg.repa.weight > 0:
            lines.append(f"REPA: block {self.repa_block} -> projector -> {self.repa_teacher.name}, weight {cfg.repa.weight}")
        if self.lpips is not None and cfg.perceptual.lpips_weight > 0:
            lines.append(f"LPIPS: {self.lpips.source}, weight {cfg.perceptual.lpips_weight}, scale {cfg.perceptual.lpips_scale}")
        if self.dino is not None and cfg.perceptual.dino_weight > 0:
            lines.append(f"P-DINO: {self.dino.name}, weight {cfg.perceptual.dino_weight}")
        return lines


def repa_loss(aux: Auxiliary, features: torch.Tensor, x: torch.Tensor, routing, grid: tuple[int, int]) -> torch.Tensor:
    """-mean cosine between projected block features and the teacher's patch features of the clean
    image on the same token grid. Inside a TREAD span the block only saw the kept tokens, so the
    teacher tokens are gathered at the same indices."""
    target = aux.repa_teacher.features_for_grid(x, *grid)  # [B, L, C], no grad
    if routing is not None and features.shape[1] != target.shape[1]:
        target = gather_tokens(target, routing.keep)
    pred = aux.projector(features).float()
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def pdino_loss(teacher, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 - cosine of teacher patch tokens of x_hat and x, mean over patches. The grid
    follows the image's own aspect ratio (no squashing to a square)."""
    h, w = x.shape[-2:]
    grid = (max(1, round(h / teacher.patch)), max(1, round(w / teacher.patch)))
    f_hat = teacher.features_for_grid(x_hat, *grid, grad=True)
    f = teacher.features_for_grid(x, *grid)
    return 1 - F.cosine_similarity(f_hat, f, dim=-1).mean(dim=1)


@dataclass
class SampleNoise:
    """Every random draw of a training step, per sample: caption dropout, time, noise, routing."""

    drop: torch.Tensor  # [B] bool
    t: torch.Tensor  # [B]
    eps: torch.Tensor  # [B, C, H, W]
    routing: Routing | None


_NOISE_STREAM = 0x6E6F697365  # "noise": keeps these streams apart from other users of the seed


def sample_generator(seed: int, step: int, sample: int, device) -> torch.Generator:
    """The generator of one sample of one step, from a hash of (seed, step, sample). Keying the
    draws by the sample's place in the global batch (not by rank or micro-batch) is what makes a
    step the same on 1 rank x 8 as on 2 ranks x 4 or 1 rank x 4 x 2 accumulation steps, and what
    makes resume exact with no generator state to save. Masks still differ per sample, per step and
    per rank (ranks hold different samples)."""
    state = np.random.SeedSequence([seed & (2**63 - 1), step, sample, _NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


def draw_noise(cfg: Config, step: int, samples: list[int], image_shape: tuple[int, int, int], patch: int,
               device) -> SampleNoise:
    """The draws for the samples `samples` (indices within the step's global batch) of `step`.

    The small draws (dropout, time, routing) come from a CPU generator per sample, so they are the
    same on every device and cost microseconds; only the image noise is drawn on the device, from a
    device generator seeded the same way (on an H200, drawing everything on the GPU took 9% of a
    1.2B-model step in kernel launches)."""
    o = cfg.objective
    span = routing_span(cfg)
    n_tokens = (image_shape[1] // patch) * (image_shape[2] // patch)
    device = torch.device(device)
    drop, t, eps, keep = [], [], [], []
    for j in samples:
        g = sample_generator(cfg.seed, step, j, "cpu")
        drop.append(torch.rand(1, generator=g) < o.caption_dropout)
        t.append(sample_times(1, g, shift=o.time_shift, logit_mean=o.logit_mean, logit_std=o.logit_std,
                              uniform_fraction=o.uniform_fraction, t_min=o.t_min))
        r = random_routing(1, n_tokens, cfg.routing.ratio, span, g)  # None = dense
        if r is not None:
            keep.append(r.keep)
        g_dev = g if device.type == "cpu" else sample_generator(cfg.seed, step, j, device)
        eps.append(torch.randn((1, *image_shape), generator=g_dev, device=device))
    routing = Routing(torch.cat(keep).to(device, non_blocking=True), *span) if keep else None
    return SampleNoise(torch.cat(drop).to(device, non_blocking=True), torch.cat(t).to(device, non_blocking=True),
                       torch.cat(eps), routing)


def training_step(model, batch: Batch, text, text_mask, null_text, null_mask, noise: SampleNoise, cfg: Config,
                  device, aux: Auxiliary | None = None) -> StepResult:
    """Every loss term of a step is computed here, by name, and summed with its weight."""
    o = cfg.objective
    x = to_model_range(batch.images.to(device, non_blocking=True))
    # Caption dropout: the empty prompt's embedding, so classic CFG works at sampling time.
    text = torch.where(noise.drop[:, None, None], null_text, text)
    text_mask = torch.where(noise.drop[:, None], null_mask, text_mask)
    routing, t = noise.routing, noise.t
    x_t = add_noise(x, noise.eps, t, o.noise_scale)
    dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    repa_on = aux is not None and aux.projector is not None and cfg.repa.weight > 0
    with amp:
        out = model(x_t, t, text, text_mask, routing=routing, return_features=(aux.repa_block,) if repa_on else ())
    x_hat = out.prediction.float()
    terms = {"flow": velocity_loss(x_hat, x, x_t, t, o.t_clamp)}
    weights = {"flow": 1.0}
    if repa_on:
        patch = model.cfg.patch_size
        grid = (x.shape[2] // patch, x.shape[3] // patch)
        with amp:
            terms["repa"] = repa_loss(aux, out.features[aux.repa_block], x, routing, grid)
        weights["repa"] = cfg.repa.weight
    pc = cfg.perceptual
    # PixelGen applies its perceptual losses at low noise only; in our convention that is t <= max_t.
    gate = (t <= pc.max_t).float() if pc.max_t is not None else torch.ones_like(t)
    if aux is not None and aux.lpips is not None and pc.lpips_weight > 0:
        from .teachers.lpips import lpips_loss

        terms["lpips"] = (lpips_loss(aux.lpips, x_hat, x, pc.lpips_scale) * gate).mean()
        weights["lpips"] = pc.lpips_weight
    if aux is not None and aux.dino is not None and pc.dino_weight > 0:
        terms["pdino"] = (pdino_loss(aux.dino, x_hat, x) * gate).mean()
        weights["pdino"] = pc.dino_weight
    loss = sum(weights[k] * v for k, v in terms.items())
    return StepResult(loss, terms)


def make_optimizer(model: torch.nn.Module, cfg: Config, extra_adam_modules=()):
    """AdamW, or Muon + AdamW (optim.py), with a linear warm-up then a constant learning rate."""
    from .optim import build_optimizer

    t = cfg.train
    opt = build_optimizer(model, kind=t.optimizer, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                          weight_decay=t.weight_decay, muon_lr=t.muon_lr, muon_momentum=t.muon_momentum,
                          muon_ns_dtype=t.muon_precision, extra_adam_modules=extra_adam_modules)
    warm = max(1, t.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return opt, sched


class StopFlag:
    """SIGINT / SIGTERM ask for a clean stop: the loop finishes its step, saves, and exits.
    A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _truncate_metrics(path: Path, step: int):
    """On resume, drop log lines past the checkpoint so the file reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _format_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


@dataclass
class TrainState:
    """What a checkpoint restores, built once per run."""

    ctx: DistContext
    model: torch.nn.Module
    ema: EMA
    aux: Auxiliary
    trainable: torch.nn.ModuleDict  # the trained modules by name: the denoiser, and the REPA projector
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler


def _state_dicts(st: TrainState, with_optimizer: bool = True) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if with_optimizer:
        model_sd, optim_sd = get_state_dict(st.trainable, st.opt)
        return {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(st.ema.model)}
    return {"model": get_model_state_dict(st.trainable), "ema": get_model_state_dict(st.ema.model)}


def restore(st: TrainState, path: Path, meta: dict, cfg: Config, weights_only: bool = False) -> None:
    """Load weights, EMA and (when it fits this config) the optimizer from a checkpoint written on
    any number of ranks. A REPA projector or optimizer kind that differs from the config's is
    started afresh, with a line saying so."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if (path / ckpt.EXPORT_FILE).is_file():  # an exported model: weights only, loaded on each rank
        if not weights_only:
            raise ValueError(f"{path} is an exported model; it can start a run (run.init_from) but not resume one")
        plain = PRXDenoiser(st.model.cfg)  # an unsharded twin; load_weights checks every shape
        ckpt.load_weights(path, plain)
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(st.model, plain.state_dict(), options=full)
        set_model_state_dict(st.ema.model, plain.state_dict(), options=full)
        return
    saved = ckpt.saved_keys(path)
    fits = (not weights_only and meta.get("trainable") == sorted(st.trainable.keys())
            and meta.get("optimizer_kind") == cfg.train.optimizer)
    tree = _state_dicts(st, with_optimizer=fits)
    missing = [k for k in tree["model"] if f"model.{k}" not in saved]
    ckpt.load_tensors(path, tree, partial=bool(missing) or not fits)
    set_model_state_dict(st.trainable, tree["model"])
    set_model_state_dict(st.ema.model, tree["ema"])
    if fits:
        set_optimizer_state_dict(st.trainable, st.opt, tree["optimizer"])
    if st.ctx.is_main:
        if any(k.startswith("repa_projector.") for k in missing):
            tqdm.write("REPA projector: not in the checkpoint, starting from a fresh one")
        if not fits and not weights_only:
            tqdm.write(f"warning: the optimizer state in {path} does not fit this config (optimizer kind or trained "
                       f"modules changed); starting it afresh")


def _build_state(cfg: Config, plan, ctx: DistContext, text_dim: int) -> TrainState:
    device = ctx.device
    model = model_from_config(cfg, text_dim).to(device)
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    ema = EMA(model, cfg.ema.decay, cfg.ema.every)  # copied before compiling: the EMA only samples
    if cfg.parallel.compile:
        compile_blocks(model)
    aux = Auxiliary(cfg, model.cfg.hidden_size, device, stages=[c for _, _, c in plan])
    dtype = autocast_dtype(cfg, device)
    shard(model, ctx, dtype, blocks=model.blocks)
    shard(ema.model, ctx, None, blocks=ema.model.blocks)
    trainable = torch.nn.ModuleDict({"denoiser": model})
    if aux.projector is not None:
        trainable["repa_projector"] = shard(aux.projector, ctx, dtype)
    opt, sched = make_optimizer(model, cfg, extra_adam_modules=[aux.projector] if aux.projector is not None else [])
    return TrainState(ctx, model, ema, aux, trainable, opt, sched)


def train(cfg: Config, stop_at_step: int | None = None) -> dict:
    """Run (or resume) the training described by `cfg`, on one process or under torchrun. Returns
    a summary dict.

    `stop_at_step` simulates an interruption after that step (tests): it takes the same path as
    SIGTERM, saving a checkpoint and returning early.
    """
    check_paths(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx = init_distributed(cfg.train.device, cfg.parallel.replicate)
    try:
        summary = _train(cfg, ctx, stop_at_step)
    except BaseException:
        if ctx.distributed:
            shutdown(clean=False)
        raise
    if ctx.distributed:
        shutdown(clean=True)
    return summary


def _train(cfg: Config, ctx: DistContext, stop_at_step: int | None) -> dict:
    plan = stage_plan(cfg)
    splits = [batch_split(c, ctx.world_size) for _, _, c in plan]  # config errors before any work
    device, main = ctx.device, ctx.is_main
    say = tqdm.write if main else (lambda *a, **k: None)
    from .evaluate import Evaluator, applicable_metrics, describe_metrics, flat_metrics

    # The metric networks load here, so a missing one stops the run before any training. Every rank
    # samples during an evaluation; only rank 0 loads networks and computes the metrics.
    eval_metrics = applicable_metrics(cfg) if cfg.eval.prompts else []
    evaluator = Evaluator(cfg, eval_metrics, device, compute=main, progress=main) if eval_metrics else None
    run_dir = Path(cfg.run.dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.seed)

    encoder = TextEncoder(cfg.text.encoder, cfg.text.max_tokens, device=device, cache_gib=cfg.text.cache_gib)
    null_text, null_mask = (a.to(device) for a in encoder.encode([""]))
    st = _build_state(cfg, plan, ctx, encoder.dim)
    model, ema, aux, opt, sched = st.model, st.ema, st.aux, st.opt, st.sched
    trained_params = [p for g in opt.param_groups for p in g["params"]]
    step, meta = 0, None

    latest = ckpt.latest_checkpoint(run_dir) if cfg.run.resume else None
    if latest is not None:
        meta = ckpt.load_meta(latest)
        restore(st, latest, meta, cfg)
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(meta["torch_rng"])
        step = meta["step"]
        say(f"resuming from {latest} (step {step}, saved on {meta['world_size']} rank(s))")
    elif cfg.run.init_from:
        src = ckpt.resolve_checkpoint(cfg.run.init_from)
        restore(st, src, ckpt.load_meta(src) if ckpt.is_complete(src) else {}, cfg, weights_only=True)
        say(f"initialised weights and EMA from {src}")
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, step) if step else metrics_path.write_text("")

    from .optim import describe

    say(describe(opt.report))
    say(f"model: preset {cfg.model.preset}, {count_parameters(model) / 1e6:.2f}M parameters"
        f"{' (sharded)' if ctx.distributed else ''}; text encoder {encoder.name} (dim {encoder.dim}); device {device}"
        f"{f' x {ctx.world_size} ranks' if ctx.distributed else ''}; autocast {autocast_dtype(cfg, device) or 'off (fp32)'}")

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
    source = grid_prompts = None  # built at the start of each stage this session trains

    def save(at_step: int) -> Path:
        meta_out = {
            "step": at_step, "stage": stage_index, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "data": ctx.gather_objects(source.state_dict()), "world_size": ctx.world_size,
            "trainable": sorted(st.trainable.keys()), "optimizer_kind": cfg.train.optimizer,
            "config": to_dict(cfg), "text_dim": encoder.dim,
        }
        return ckpt.save_checkpoint(run_dir, at_step, _state_dicts(st), meta_out, to_yaml(cfg),
                                    cfg.train.keep_checkpoints, ctx)

    def run_eval(at_step: int, c: Config) -> dict | None:
        """eval.metrics of the EMA weights on the fixed held-out captions and seeds, logged to
        metrics.jsonl and TensorBoard as eval/<metric>; the settings go to eval/settings.json when
        they change (a new stage). Every rank samples: a sharded model's forward is collective."""
        if evaluator is None:
            return None
        result = evaluator(ema.model, encoder, c, sample_seed=c.sample.seed)
        if not main:
            return None
        row = flat_metrics(result["metrics"])
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": at_step, **row}) + "\n")
        for k, v in row.items():
            writer.add_scalar(k, v, at_step)
        settings_path = run_dir / "eval" / "settings.json"
        settings = json.dumps(result["settings"], indent=2)
        if not settings_path.exists() or settings_path.read_text() != settings:
            settings_path.parent.mkdir(exist_ok=True)
            settings_path.write_text(settings)
        say(f"step {at_step}: {describe_metrics(result['metrics'])} (EMA, {c.eval.prompts} prompts)")
        return result

    def grid(c: Config, name: str) -> Path:
        path = write_sample_grid(ema.model, encoder, c, grid_prompts, device, run_dir / "samples" / name, save=main)
        return path

    start_step, t0, last_t, last_step = step, time.time(), time.time(), step
    stopped = None
    model.train()
    with StopFlag() as stop, tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                                  file=sys.stderr, disable=not main) as bar:
        for stage_index, (s0, s1, scfg) in enumerate(plan):
            if step >= s1:
                continue
            global_batch, micro, accum = splits[stage_index]
            source = make_batch_source(scfg, ctx.rank, ctx.world_size)
            if scfg.data.prefetch:
                source = Prefetcher(source)
            _restore_position(source, scfg, meta, stage_index, step - s0, accum, ctx, say)
            grid_prompts = _grid_prompts(scfg, source)
            if getattr(source, "text_note", None):  # shards: whether their stored caption embeddings are used
                say(source.text_note)
            if len(plan) > 1:
                say(f"stage {stage_index + 1}/{len(plan)} {cfg.stages[stage_index].name!r}: steps {s0}..{s1}, "
                    f"{scfg.data.resolution}px, global batch {global_batch}")
            for line in aux.describe(scfg):
                say(line)
            if ctx.distributed or accum > 1:
                say(f"batch: global {global_batch} = {ctx.world_size} rank(s) x micro-batch {micro} x {accum} "
                    f"accumulation step(s)")
            while step < s1:
                terms: dict[str, torch.Tensor] = {}  # kept on the device: no host sync until logged
                for m in range(accum):
                    batch = next(source)
                    stored = (batch.text, batch.text_mask) if batch.text is not None else None
                    text, text_mask = (a.to(device) for a in stored or encoder.encode(batch.captions))
                    first = (m * ctx.world_size + ctx.rank) * micro
                    noise = draw_noise(scfg, step, list(range(first, first + micro)), tuple(batch.images.shape[1:]),
                                       model.cfg.patch_size, device)
                    set_gradient_sync(st.trainable.values(), m == accum - 1)
                    result = training_step(model, batch, text, text_mask, null_text, null_mask, noise, scfg, device, aux)
                    (result.loss / accum).backward()
                    for k, v in {"loss": result.loss, **result.terms}.items():
                        terms[k] = terms.get(k, 0.0) + v.detach() / accum
                grad_norm = clip_gradients(trained_params, cfg.train.grad_clip or math.inf)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                ema.maybe_update(model, step)
                step += 1
                bar.update(1)

                if step % max(cfg.train.log_every, 1) == 0 or step == s1:
                    terms = ctx.mean({k: v.item() for k, v in terms.items()})
                    now = time.time()
                    ips = (step - last_step) * global_batch / max(now - last_t, 1e-9)
                    last_t, last_step = now, step
                    record = {"step": step, **terms, "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                              "images_per_s": ips}
                    if main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        for k, v in record.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{ips:.0f}")

                if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.steps:
                    path = grid(scfg, f"step_{step:08d}.png")
                    if main:
                        writer.add_image("samples/ema", _read_png(path), step, dataformats="HWC")
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                    run_eval(step, scfg)
                if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or (step == s1 and s1 < cfg.train.steps):
                    save(step)  # also at each stage boundary, so the next stage can always resume from it
                if step % max(cfg.train.log_every, 1) == 0:
                    last_t = time.time()  # images/s measures training alone, not grids, evals or saves
                log_step = step % max(cfg.train.log_every, 1) == 0 or step == s1
                why = _should_stop(ctx, stop, stop_at_step, step, t0, cfg, check_now=log_step)
                if why is not None:
                    stopped = why
                    break
            if isinstance(source, Prefetcher):
                source.close()  # the batch in flight is not needed: its position is not saved
            if stopped is not None:
                break

    if source is None:  # the run was already complete: no stage trained this session
        source = make_batch_source(scfg, ctx.rank, ctx.world_size)
        grid_prompts = _grid_prompts(scfg, source)
    last = save(step)
    if writer is not None:
        writer.flush()
    elapsed = time.time() - t0
    if stopped is not None and stopped != "max_minutes" and step < cfg.train.steps:
        name = signal.Signals(stopped).name if isinstance(stopped, int) else stopped
        if main:
            print(f"stopped by {name} at step {step}/{cfg.train.steps}; checkpoint {last}. "
                  f"Run the same command again to resume.", flush=True)
            writer.close()
        return {"step": step, "checkpoint": str(last), "stopped": name, "signal": stopped}

    final_grid = grid(scfg, "final.png")
    summary = {"step": step, "checkpoint": str(last), "samples": str(final_grid.parent), "train_seconds": elapsed,
               "steps_this_session": step - start_step}
    result = run_eval(step, scfg)
    if result is not None:  # rank 0 only
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        summary["eval"] = result["metrics"]
        if "score" in result:
            summary["score"] = result["score"]
    # Every rank's count and first skipped item: rank 0 may have skipped nothing itself.
    counts = ctx.gather_objects((getattr(source, "skipped", 0), (getattr(source, "skipped_paths", None) or [None])[0]))
    skipped = sum(n for n, _ in counts)
    first_skipped = next((p for _, p in counts if p), None)
    summary["skipped_images"] = skipped
    if main:
        writer.close()
        score = summary.get("score")
        others = {k: v for k, v in summary.get("eval", {}).items() if k != "shapes"}
        score_text = (f"; shapes score {score['placed']:.3f} (EMA, {cfg.eval.prompts} prompts, exact set "
                      f"{score['exact_set']:.3f}, eval.json in the run)") if score else ""
        if others:
            score_text += f"; {describe_metrics(others)} (EMA, {cfg.eval.prompts} prompts, eval.json in the run)"
        skipped_text = f"; skipped {skipped} unreadable images (first: {first_skipped})" if skipped else ""
        print(f"done: {step} steps ({_format_duration(elapsed)} this session); checkpoint {last}; "
              f"samples {final_grid.parent}/{score_text}{skipped_text}", flush=True)
    return summary


def _restore_position(source, cfg: Config, meta: dict | None, stage_index: int, steps_into_stage: int, accum: int,
                      ctx: DistContext, say) -> None:
    """Put a fresh batch source where the checkpoint left this stage. The shapes stream is a pure
    function of its batch counter (the same on every rank), so it resumes on any number of ranks;
    an image folder's per-rank position only carries over to the same number of ranks."""
    if steps_into_stage == 0:
        return
    if hasattr(source, "next_batch"):
        source.load_state_dict({"next_batch": steps_into_stage * accum})
        return
    if meta is not None and meta.get("stage") == stage_index and meta["world_size"] == ctx.world_size:
        source.load_state_dict(meta["data"][ctx.rank])
        return
    say(f"warning: the data position was saved on {meta['world_size'] if meta else '?'} rank(s) and cannot be "
        f"carried to {ctx.world_size}; this stage's image order starts afresh")


def _should_stop(ctx: DistContext, stop: StopFlag, stop_at_step, step: int, t0: float, cfg: Config,
                 check_now: bool = True):
    """Why to stop after this step (a signal, a test's stop_at_step, the time budget), or None.
    Ranks agree: a signal that reached any rank, or rank 0's clock, stops them all together. That
    agreement is a collective with a host sync, so under torchrun it happens on logging steps only
    (`check_now`): a stop then waits at most train.log_every steps."""
    if ctx.distributed and not check_now:
        return None
    why = stop.signal or ("stop_at_step" if stop_at_step is not None and step >= stop_at_step else None)
    over_time = bool(cfg.train.max_minutes and time.time() - t0 >= 60 * cfg.train.max_minutes)
    if ctx.distributed:
        code = {"signal": float(stop.signal or 0), "stop_at": float(why == "stop_at_step"),
                "time": float(over_time and ctx.is_main)}
        agreed = {k: v * ctx.world_size for k, v in ctx.mean(code).items()}  # sums over ranks
        if agreed["signal"]:
            why = stop.signal or int(signal.SIGTERM)
        elif agreed["stop_at"]:
            why = "stop_at_step"
        over_time = agreed["time"] > 0
    if why is None and over_time:
        if ctx.is_main:
            tqdm.write(f"train.max_minutes={cfg.train.max_minutes:g} reached at step {step}")
        return "max_minutes"  # a time budget (equal-time comparisons): finish like a completed run
    return why


def _grid_prompts(cfg: Config, source) -> list[str]:
    """Fixed prompts for the sample grids: fresh shapes captions, held-out emoji captions, or the
    first captions of a folder or of the shards."""
    if cfg.data.source == "shapes":
        from .data.shapes import fixed_prompts

        return fixed_prompts(cfg.sample.grid_prompts, max_shapes=cfg.data.max_shapes)
    if cfg.data.source == "emoji":
        from .data.emoji import fixed_prompts

        return fixed_prompts(cfg.sample.grid_prompts)
    if cfg.data.source == "shards":
        return source.preview_captions(cfg.sample.grid_prompts)
    return list(source.folder.captions[: cfg.sample.grid_prompts])


def _read_png(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def write_sample_grid(model, encoder, cfg: Config, prompts: list[str], device, path: Path, save: bool = True) -> Path:
    from .images import save_grid
    from .evaluate import generate

    if not prompts:
        return path
    was_training = model.training
    model.eval()
    images = generate(model, encoder, prompts, cfg, device, seed=cfg.sample.seed)
    model.train(was_training)
    return save_grid(images, prompts, path) if save else path
