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

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, image_sizes, model_fields, repa_block, routing_span, to_dict, to_yaml
from .data import Batch
from .model import PRXDenoiser, build_model, count_parameters, gather_tokens
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
    sizes = image_sizes(cfg)
    if cfg.data.source == "shapes":
        from .data.shapes import ShapesBatchSource

        return ShapesBatchSource(cfg.seed, "train", cfg.train.batch_size, sizes, cfg.data.max_shapes, rank, world_size)
    from .data.folder import FolderBatchSource, ImageFolder

    return FolderBatchSource(ImageFolder(cfg.data.path), cfg.train.batch_size, sizes, cfg.seed, rank, world_size)


class EMA:
    """Exponential moving average of the weights, kept in fp32, updated every `every` steps."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every = decay, every

    @torch.no_grad()
    def maybe_update(self, model: torch.nn.Module, step: int):
        if step % self.every == 0:
            ema_p = list(self.model.parameters())
            torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)


@dataclass
class StepResult:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class Auxiliary(torch.nn.Module):
    """What the extra loss terms need besides the model: the REPA projector (trained, in the Adam
    group, saved in checkpoints) and frozen teachers (never trained, never saved). Kept outside the
    denoiser so parallelism, EMA and export only ever see the denoiser itself."""

    def __init__(self, cfg: Config, hidden_size: int, device):
        super().__init__()
        self.repa_block = repa_block(cfg)
        self.repa_teacher = self.projector = self.lpips = self.dino = None
        if cfg.repa.weight > 0:
            from .teachers.features import load_teacher

            self.repa_teacher = load_teacher(cfg.repa.teacher)
            h = cfg.repa.hidden
            self.projector = torch.nn.Sequential(
                torch.nn.Linear(hidden_size, h), torch.nn.SiLU(), torch.nn.Linear(h, h), torch.nn.SiLU(),
                torch.nn.Linear(h, self.repa_teacher.dim))
        if cfg.perceptual.lpips_weight > 0:
            from .teachers.lpips import load_lpips

            self.lpips = load_lpips(cfg.perceptual.lpips)
        if cfg.perceptual.dino_weight > 0:
            from .teachers.features import load_teacher

            self.dino = load_teacher(cfg.perceptual.dino_teacher)
        self.to(device)

    def describe(self, cfg: Config) -> list[str]:
        lines = []
        if self.projector is not None:
            lines.append(f"REPA: block {self.repa_block} -> projector -> {self.repa_teacher.name}, weight {cfg.repa.weight}")
        if self.lpips is not None:
            lines.append(f"LPIPS: {self.lpips.source}, weight {cfg.perceptual.lpips_weight}, scale {cfg.perceptual.lpips_scale}")
        if self.dino is not None:
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


def training_step(model, batch: Batch, text, text_mask, null_text, null_mask, gen: torch.Generator, cfg: Config,
                  device, aux: Auxiliary | None = None) -> StepResult:
    """Every loss term of a step is computed here, by name, and summed with its weight."""
    o = cfg.objective
    x = batch.images.to(device, non_blocking=True)
    b = x.shape[0]
    # Caption dropout: the empty prompt's embedding, so classic CFG works at sampling time.
    drop = torch.rand(b, generator=gen, device=device) < o.caption_dropout
    text = torch.where(drop[:, None, None], null_text, text)
    text_mask = torch.where(drop[:, None], null_mask, text_mask)

    span = routing_span(cfg)
    n_tokens = (x.shape[2] // model.cfg.patch_size) * (x.shape[3] // model.cfg.patch_size)
    routing = random_routing(b, n_tokens, cfg.routing.ratio, span, gen, device=device)  # None = dense

    t = sample_times(b, gen, shift=o.time_shift, logit_mean=o.logit_mean, logit_std=o.logit_std,
                     uniform_fraction=o.uniform_fraction, t_min=o.t_min, device=device)
    eps = torch.randn(x.shape, generator=gen, device=device)
    x_t = add_noise(x, eps, t, o.noise_scale)
    dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    repa_on = aux is not None and aux.projector is not None
    with amp:
        out = model(x_t, t, text, text_mask, routing=routing, return_features=(aux.repa_block,) if repa_on else ())
    x_hat = out.prediction.float()
    terms = {"flow": velocity_loss(x_hat, x, x_t, t, o.t_clamp)}
    weights = {"flow": 1.0}
    if repa_on:
        grid = (x.shape[2] // model.cfg.patch_size, x.shape[3] // model.cfg.patch_size)
        with amp:
            terms["repa"] = repa_loss(aux, out.features[aux.repa_block], x, routing, grid)
        weights["repa"] = cfg.repa.weight
    pc = cfg.perceptual
    # PixelGen applies its perceptual losses at low noise only; in our convention that is t <= max_t.
    gate = (t <= pc.max_t).float() if pc.max_t is not None else torch.ones_like(t)
    if aux is not None and aux.lpips is not None:
        from .teachers.lpips import lpips_loss

        terms["lpips"] = (lpips_loss(aux.lpips, x_hat, x, pc.lpips_scale) * gate).mean()
        weights["lpips"] = pc.lpips_weight
    if aux is not None and aux.dino is not None:
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
                          extra_adam_modules=extra_adam_modules)
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


def load_projector(aux: Auxiliary, state: dict):
    """A checkpoint with or without a REPA projector loads into a config with or without REPA."""
    if aux.projector is None:
        return
    if "repa_projector" in state:
        aux.projector.load_state_dict(state["repa_projector"])
    else:
        tqdm.write("REPA projector: not in the checkpoint, starting from a fresh one")


def _truncate_metrics(path: Path, step: int):
    """On resume, drop log lines past the checkpoint so the file reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _format_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def train(cfg: Config, stop_at_step: int | None = None) -> dict:
    """Run (or resume) the training described by `cfg`. Returns a summary dict.

    `stop_at_step` simulates an interruption after that step (tests): it takes the same path as
    SIGTERM, saving a checkpoint and returning early.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.seed)

    encoder = TextEncoder(cfg.text.encoder, cfg.text.max_tokens, device=device, cache_gib=cfg.text.cache_gib)
    null_text, null_mask = (a.to(device) for a in encoder.encode([""]))
    model = model_from_config(cfg, encoder.dim).to(device)
    ema = EMA(model, cfg.ema.decay, cfg.ema.every)
    aux = Auxiliary(cfg, model.cfg.hidden_size, device)
    opt, sched = make_optimizer(model, cfg, extra_adam_modules=[aux.projector] if aux.projector is not None else [])
    source = make_batch_source(cfg)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    step = 0

    latest = ckpt.latest_checkpoint(run_dir) if cfg.run.resume else None
    if latest is not None:
        state = ckpt.load_state(latest)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        load_projector(aux, state)
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. REPA or the optimizer kind switched on/off since the checkpoint
            tqdm.write(f"warning: optimizer state in {latest} does not fit this config ({e}); starting it afresh")
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        source.load_state_dict(state["data"])
        step = state["step"]
        tqdm.write(f"resuming from {latest} (step {step})")
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, step) if step else metrics_path.write_text("")

    n_params = count_parameters(model)
    from .optim import describe

    tqdm.write(describe(opt.report))
    for line in aux.describe(cfg):
        tqdm.write(line)
    tqdm.write(f"model: preset {cfg.model.preset}, {n_params / 1e6:.2f}M parameters; text encoder {encoder.name} "
               f"(dim {encoder.dim}); device {device}; autocast {autocast_dtype(cfg, device) or 'off (fp32)'}")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
    grid_prompts = _grid_prompts(cfg, source)

    def save(at_step: int) -> Path:
        state = {
            "step": at_step,
            "model": model.state_dict(),
            "ema": ema.model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "data": source.state_dict(),
            **({"repa_projector": aux.projector.state_dict()} if aux.projector is not None else {}),
            "config": to_dict(cfg),
            "text_dim": encoder.dim,
        }
        return ckpt.save_checkpoint(run_dir, at_step, state, to_yaml(cfg), cfg.train.keep_checkpoints)

    def run_eval(at_step: int) -> dict | None:
        """Shapes score of the EMA weights, logged to metrics.jsonl and TensorBoard."""
        if cfg.data.source != "shapes" or not cfg.eval.prompts:
            return None
        from .evaluate import shapes_eval

        result = shapes_eval(ema.model, encoder, cfg, device, n=cfg.eval.prompts, seed=cfg.eval.seed)
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": at_step, **{f"eval/{k}": v for k, v in result["score"].items()}}) + "\n")
        for k, v in result["score"].items():
            writer.add_scalar(f"eval/{k}", v, at_step)
        tqdm.write(f"step {at_step}: shapes score {result['score']['placed']:.3f} (EMA, {cfg.eval.prompts} prompts)")
        return result

    start_step, t0, last_t, last_step = step, time.time(), time.time(), step
    stopped = None
    model.train()
    with StopFlag() as stop, tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step",
                                  dynamic_ncols=True, file=sys.stderr) as bar:
        while step < cfg.train.steps:
            batch = next(source)
            text, text_mask = (a.to(device) for a in encoder.encode(batch.captions))
            result = training_step(model, batch, text, text_mask, null_text, null_mask, gen, cfg, device, aux)
            opt.zero_grad(set_to_none=True)
            result.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                       cfg.train.grad_clip or math.inf)
            opt.step()
            sched.step()
            ema.maybe_update(model, step)
            step += 1
            bar.update(1)

            if step % max(cfg.train.log_every, 1) == 0 or step == cfg.train.steps:
                now = time.time()
                ips = (step - last_step) * cfg.train.batch_size / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                record = {"step": step, "loss": result.loss.item(),
                          **{k: v.item() for k, v in result.terms.items()},
                          "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0], "images_per_s": ips}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{ips:.0f}")

            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.steps:
                path = write_sample_grid(ema.model, encoder, cfg, grid_prompts, device, run_dir / "samples" / f"step_{step:08d}.png")
                writer.add_image("samples/ema", _read_png(path), step, dataformats="HWC")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                run_eval(step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save(step)
            if step % max(cfg.train.log_every, 1) == 0:
                last_t = time.time()  # images/s measures training alone, not grids, evals or saves
            if stop.signal is not None or (stop_at_step is not None and step >= stop_at_step):
                stopped = stop.signal or "stop_at_step"
                break
            if cfg.train.max_minutes and time.time() - t0 >= 60 * cfg.train.max_minutes:
                tqdm.write(f"train.max_minutes={cfg.train.max_minutes:g} reached at step {step}")
                break  # a time budget (equal-time comparisons): finish like a completed run

    last = save(step)
    writer.flush()
    elapsed = time.time() - t0
    if stopped is not None and step < cfg.train.steps:
        name = signal.Signals(stopped).name if isinstance(stopped, int) else stopped
        print(f"stopped by {name} at step {step}/{cfg.train.steps}; checkpoint {last}. "
              f"Run the same command again to resume.", flush=True)
        writer.close()
        return {"step": step, "checkpoint": str(last), "stopped": name, "signal": stopped}

    final_grid = write_sample_grid(ema.model, encoder, cfg, grid_prompts, device, run_dir / "samples" / "final.png")
    summary = {"step": step, "checkpoint": str(last), "samples": str(final_grid.parent), "train_seconds": elapsed,
               "steps_this_session": step - start_step}
    result = run_eval(step)
    if result is not None:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        summary["score"] = result["score"]
    writer.close()
    score = summary.get("score")
    score_text = (f"; shapes score {score['placed']:.3f} (EMA, {cfg.eval.prompts} prompts, exact set {score['exact_set']:.3f}, "
                  f"eval.json in the run)") if score else ""
    skipped = getattr(source, "skipped", 0)
    skipped_text = f"; skipped {skipped} unreadable images (first: {source.skipped_paths[0]})" if skipped else ""
    summary["skipped_images"] = skipped
    print(f"done: {step} steps ({_format_duration(elapsed)} this session); checkpoint {last}; "
          f"samples {final_grid.parent}/{score_text}{skipped_text}", flush=True)
    return summary


def _grid_prompts(cfg: Config, source) -> list[str]:
    """Fixed prompts for the sample grids: fresh shapes captions, or the first captions of a folder."""
    if cfg.data.source == "shapes":
        from .data.shapes import fixed_prompts

        return fixed_prompts(cfg.sample.grid_prompts, max_shapes=cfg.data.max_shapes)
    return list(source.folder.captions[: cfg.sample.grid_prompts])


def _read_png(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def write_sample_grid(model, encoder, cfg: Config, prompts: list[str], device, path: Path) -> Path:
    from .images import save_grid
    from .evaluate import generate

    if not prompts:
        return path
    was_training = model.training
    model.eval()
    images = generate(model, encoder, prompts, cfg, device, seed=cfg.sample.seed)
    model.train(was_training)
    return save_grid(images, prompts, path)
