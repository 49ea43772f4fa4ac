"""`pixelrun bench`: time training steps of any preset and resolution, dense or routed, with or
without the teachers, after a warm-up. Text embeddings are random tensors of the configured width
(the text encoder is a cache lookup in real runs), so the numbers are the denoiser's step, the
loss terms and the optimizer.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from .config import Config, load_config, to_dict
from .data import Batch
from .train import Auxiliary, make_optimizer, model_from_config, resolve_device, training_step


def time_steps(cfg: Config, *, text_dim: int, steps: int, warmup: int, text_tokens: int) -> dict:
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, text_dim).to(device)
    aux = Auxiliary(cfg, model.cfg.hidden_size, device)
    opt, _ = make_optimizer(model, cfg, extra_adam_modules=[aux.projector] if aux.projector is not None else [])
    b, res = cfg.train.batch_size, cfg.data.resolution
    gen = torch.Generator(device).manual_seed(0)
    batch = Batch(torch.rand(b, 3, res, res, device=device) * 2 - 1, [""] * b)
    text = torch.randn(b, text_tokens, text_dim, device=device)
    mask = torch.ones(b, text_tokens, dtype=torch.bool, device=device)
    null_text, null_mask = text[:1] * 0, mask[:1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res_ = training_step(model, batch, text, mask, null_text, null_mask, gen, cfg, device, aux)
        opt.zero_grad(set_to_none=True)
        res_.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tokens = (res // model.cfg.patch_size) ** 2
    out = {"step_seconds_median": step, "step_seconds": times, "images_per_s": b / step,
           "image_tokens_per_s": b * tokens / step, "image_tokens": tokens, "batch_size": b,
           "terms": sorted(res_.terms)}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run_bench(config: str | None, overrides: list[str], *, variants: list[str], steps: int, warmup: int,
              text_dim: int, text_tokens: int, out: str | None) -> dict:
    """Each variant is a named list of overrides applied on top of the base config."""
    presets = {
        "dense": [],
        "routed": ["routing.ratio=0.5"],
        "teachers": ["repa.weight=0.5", "perceptual.lpips_weight=0.1", "perceptual.dino_weight=0.01"],
        "routed+teachers": ["routing.ratio=0.5", "repa.weight=0.5", "perceptual.lpips_weight=0.1",
                            "perceptual.dino_weight=0.01"],
    }
    results = {}
    for name in variants:
        if name not in presets:
            raise ValueError(f"unknown bench variant {name!r}; choose from {sorted(presets)}")
        cfg = load_config(config, [*overrides, *presets[name]])
        results[name] = {"overrides": [*overrides, *presets[name]],
                         **time_steps(cfg, text_dim=text_dim, steps=steps, warmup=warmup, text_tokens=text_tokens)}
    base = results.get("dense", {}).get("step_seconds_median")
    if base:
        for name, r in results.items():
            r["step_time_vs_dense"] = r["step_seconds_median"] / base
    device = resolve_device(load_config(config, overrides).train.device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "steps": steps, "warmup": warmup, "text_dim": text_dim, "text_tokens": text_tokens,
        "config": to_dict(load_config(config, overrides)), "results": results,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
