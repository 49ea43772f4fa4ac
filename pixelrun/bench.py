"""`pixelrun bench`: time training steps of any preset and resolution, dense or routed, with or
without the teachers, after a warm-up. Text embeddings are random tensors of the configured width
(the text encoder is a cache lookup in real runs), so the numbers are the denoiser's step, the
loss terms, gradient clipping and the optimizer, the last two also timed apart. `pixelrun bench
--gpus N` times a whole staged config with its text encoder instead (pixelrun/projection.py).

Besides time, each variant reports the denoiser's model FLOPs per training image (pixelrun/flops.py,
analytic, routed when the variant routes; teachers not included), the achieved model FLOP/s and,
on a GPU whose peak is known, MFU. One extra one-image step is counted by torch's FlopCounterMode
as a cross-check; what it counts beyond the model is reported as the teachers' (and the REPA
projector's) FLOPs.
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from statistics import median

import torch

from .build import Auxiliary, autocast_dtype, make_optimizer, model_from_config
from .config import Config, ConfigError, load_config, routing_span, to_dict
from .data import Batch
from .distributed import clip_gradients, resolve_device
from .flops import training_flops_per_image
from .model import compile_blocks
from .step import draw_noise, training_step

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets, matched on
# torch.cuda.get_device_name() upper-cased; first match wins, so the specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (("A100",), 312e12),  # SXM and PCIe alike
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, None for anything else (CPUs included)."""
    name = device_name.upper()
    for keys, peak in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_inputs(b: int, res: int, text_tokens: int, text_dim: int, device) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """A batch of random square images with random text embeddings (all tokens real)."""
    batch = Batch(torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, device=device), [""] * b)
    text = torch.randn(b, text_tokens, text_dim, device=device)
    return batch, text, torch.ones(b, text_tokens, dtype=torch.bool, device=device)


def measured_step_flops(model, aux, cfg: Config, device, text_dim: int, text_tokens: int) -> int:
    """FLOPs of a one-image training step (forward + backward, teachers included) as torch's
    FlopCounterMode counts them (matmuls, attention, convolutions). Run on the eager model: before
    compiling and without activation checkpointing, whose recompute model FLOPs leave out. SDPA is
    pinned to the math backend: FlopCounterMode counts the CPU flash kernel as 0 FLOPs and the
    CUDA flash kernels' backward with its score recompute; the math backend's bmm's it counts as
    the model computes them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    res = cfg.data.resolution
    batch, text, mask = random_inputs(1, res, text_tokens, text_dim, device)
    noise = draw_noise(cfg, 0, [0], (3, res, res), model.cfg.patch_size, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        training_step(model, batch, text, mask, text * 0, mask, noise, cfg, device, aux).loss.backward()
    model.zero_grad(set_to_none=True)
    aux.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(cfg: Config, *, text_dim: int, steps: int, warmup: int, text_tokens: int,
               count_flops: bool = True) -> dict:
    """Median times of `steps` training steps after `warmup` untimed ones, split into the forward
    + backward (draws, model, every loss term) and the optimizer (gradient clipping + step), with
    the analytic model FLOPs; `count_flops` adds torch's FlopCounterMode count of a one-image step."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, text_dim).to(device)
    aux = Auxiliary(cfg, model.cfg.hidden_size, device)
    opt, _ = make_optimizer(model, cfg, extra_adam_modules=[aux.projector] if aux.projector is not None else [])
    b, res = cfg.train.batch_size, cfg.data.resolution
    flops = training_flops_per_image(model.cfg, res, res, text_tokens, cfg.routing.ratio, routing_span(cfg))
    measured = measured_step_flops(model, aux, cfg, device, text_dim, text_tokens) if count_flops else None
    # Speed options only after the count: they change how, not what, the model computes.
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.parallel.compile:
        compile_blocks(model)  # the warm-up steps pay the compilation
    params = [p for group in opt.param_groups for p in group["params"]]
    batch, text, mask = random_inputs(b, res, text_tokens, text_dim, device)
    null_text, null_mask = text[:1] * 0, mask[:1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times, forward_backward, optimizer = [], [], []
    for i in range(warmup + steps):
        t0 = now()
        noise = draw_noise(cfg, i, list(range(b)), (3, res, res), model.cfg.patch_size, device)
        res_ = training_step(model, batch, text, mask, null_text, null_mask, noise, cfg, device, aux)
        opt.zero_grad(set_to_none=True)
        res_.loss.backward()
        t1 = now()
        clip_gradients(params, cfg.train.grad_clip or math.inf)  # as the training loop does
        opt.step()
        t2 = now()
        times.append(t2 - t0)
        forward_backward.append(t1 - t0)
        optimizer.append(t2 - t1)
    warm, times = times[:warmup], times[warmup:]
    step = median(times)
    tokens = flops["image_tokens"]
    achieved = flops["training_total"] * b / step
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    teachers = aux.repa_teacher is not None or aux.lpips is not None or aux.dino is not None
    out = {"step_seconds_median": step, "step_seconds": times,
           "forward_backward_seconds_median": median(forward_backward[warmup:]),
           "optimizer_seconds_median": median(optimizer[warmup:]),
           "images_per_s": b / step, "image_tokens_per_s": b * tokens / step, "image_tokens": tokens,
           "kept_tokens": flops["kept_tokens"], "batch_size": b, "terms": sorted(res_.terms),
           "optimizer": cfg.train.optimizer + (f" (Newton-Schulz {cfg.train.muon_precision})"
                                               if cfg.train.optimizer == "muon" else ""),
           "precision": "bf16" if autocast_dtype(cfg, device) == torch.bfloat16 else "fp32",
           "compiled": cfg.parallel.compile, "activation_checkpointing": cfg.parallel.activation_checkpointing,
           "warmup_seconds": sum(warm),  # includes the compilation when compiled
           "model_flops_per_image": flops["training_total"], "model_flops_forward_per_image": flops["forward_total"],
           "model_flops_by_part": flops["training"],
           "achieved_model_flops_per_s": achieved, "peak_flops": peak, "mfu": achieved / peak if peak else None,
           "measured_step_flops_per_image": measured,
           "teacher_flops_per_image": measured - flops["training_total"] if teachers and measured else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return out


VARIANTS: dict[str, list[str]] = {
    "dense": [],
    "routed": ["routing.ratio=0.5"],
    "teachers": ["repa.weight=0.5", "perceptual.lpips_weight=0.1", "perceptual.dino_weight=0.01"],
    "routed+teachers": ["routing.ratio=0.5", "repa.weight=0.5", "perceptual.lpips_weight=0.1",
                        "perceptual.dino_weight=0.01"],
}


def variant_overrides(overrides: list[str], variant: str) -> list[str]:
    """The overrides with the variant's own appended; its keys win over the same keys among the
    overrides (a key may appear only once)."""
    mine = {o.split("=", 1)[0].strip() for o in VARIANTS[variant]}
    return [o for o in overrides if o.split("=", 1)[0].strip() not in mine] + VARIANTS[variant]


def run_bench(config: str | None, overrides: list[str], *, variants: list[str], steps: int, warmup: int,
              text_dim: int, text_tokens: int, out: str | None) -> dict:
    """Each variant is a named list of overrides applied on top of the base config."""
    if steps < 1 or warmup < 0:
        raise ConfigError("--steps" if steps < 1 else "--warmup", "needs at least one timed step and no negative warm-up")
    for name in variants:  # all checked before any (slow) work
        if name not in VARIANTS:
            raise ConfigError("--variants", f"unknown bench variant {name!r}; choose from {', '.join(VARIANTS)}")
    results = {}
    for name in variants:
        over = variant_overrides(overrides, name)
        cfg = load_config(config, over)
        results[name] = {"overrides": over,
                         **time_steps(cfg, text_dim=text_dim, steps=steps, warmup=warmup, text_tokens=text_tokens)}
    base = results.get("dense", {}).get("step_seconds_median")
    if base:
        for r in results.values():
            r["step_time_vs_dense"] = r["step_seconds_median"] / base
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.train.device)
    name = device_name(device)
    report = {
        "device": name, "peak_flops": peak_flops(name) if device.type == "cuda" else None,
        "torch": torch.__version__, "steps": steps, "warmup": warmup, "text_dim": text_dim, "text_tokens": text_tokens,
        "config": to_dict(cfg), "results": results,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
