"""`pixelrun bench`: time training steps of any preset and resolution, dense or routed, with or
without the teachers, after a warm-up. The step is training's own: built by `build.build_state`
(per-block compile, FSDP2 sharding with bf16 parameters, the optimizer, its schedule and the EMA)
and run by `step.train_step`, on one rank (a process group of one when not launched by torchrun).
Text embeddings are random tensors of the configured width, given as stored caption embeddings
(the text encoder is a cache lookup or stored in real runs), so the numbers are the denoiser's
step, the loss terms, gradient clipping, the optimizer, the schedule and the EMA, the last four
also timed apart. `pixelrun bench --gpus N` times a whole staged config with its text encoder
instead (pixelrun/tools/forecast.py).

Besides time, each variant reports the denoiser's model FLOPs per training image (pixelrun/training/flops.py:
analytic, routed when the variant routes; teachers not included), the achieved model FLOP/s and,
on a GPU whose peak is known (pixelrun/infra/devices.py), MFU. One extra one-image step is counted by torch's FlopCounterMode
as a cross-check; what it counts beyond the model is reported as the teachers' (and the REPA
projector's) FLOPs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import median
from typing import cast

import torch

from pixelrun.config import Config, ConfigError, load_config, to_dict
from pixelrun.data import Batch
from pixelrun.infra.devices import device_name, device_peak_flops, peak_flops
from pixelrun.infra.distributed import DistContext, process_group, resolve_device, world_from_env
from pixelrun.infra.precision import autocast_dtype
from pixelrun.model.denoiser import PRXDenoiser
from pixelrun.model.import_diffusers import resolve as resolve_model_init
from pixelrun.training.build import build_state
from pixelrun.training.flops import measured_step_flops, mfu
from pixelrun.training.step import train_step
from pixelrun.tricks.routing import denoiser_flops


def random_inputs(
    b: int, res: int, text_tokens: int, text_dim: int, device
) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """A batch of random square images with random text embeddings (all tokens real)."""
    batch = Batch(torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, device=device), [""] * b)
    text = torch.randn(b, text_tokens, text_dim, device=device)
    return batch, text, torch.ones(b, text_tokens, dtype=torch.bool, device=device)


@contextlib.contextmanager
def step_context(cfg: Config):
    """The ranks the bench steps on, as training has them. Under torchrun: the launcher's process
    group, as `pixelrun train` joins it. Otherwise a process group of this process alone (an
    in-memory store: no port, no launcher), so that the model is sharded with FSDP2 as a torchrun
    launch shards it (bf16 parameters gathered, gradients reduced in fp32): one rank's step is one
    GPU's step of a sharded run, communication aside."""
    if world_from_env()[1]:
        with process_group(cfg.hardware.device, cfg.parallel.replicate) as ctx:
            yield ctx
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = resolve_device(cfg.hardware.device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=device if cuda else None,
    )
    try:
        yield DistContext(0, 1, 0, device, init_device_mesh(device.type, (1,), mesh_dim_names=("shard",)))
    finally:
        dist.destroy_process_group()


def time_steps(
    cfg: Config, *, text_dim: int, steps: int, warmup: int, text_tokens: int, count_flops: bool = True
) -> dict:
    """Median times of `steps` training steps after `warmup` untimed ones: the run's own step
    (`build.build_state`, `step.train_step`: FSDP2, compile, the optimizer and its schedule, the
    EMA) on random images and text embeddings, one micro-batch per step. Split at the end of the
    backward into the forward + backward (draws, model, every loss term) and the optimizer
    (gradient clipping, optimizer, schedule, EMA), with the analytic model FLOPs; `count_flops`
    adds torch's FlopCounterMode count of a one-image step."""
    with step_context(cfg) as ctx:
        try:
            return _time_steps(
                cfg,
                ctx,
                text_dim=text_dim,
                steps=steps,
                warmup=warmup,
                text_tokens=text_tokens,
                count_flops=count_flops,
            )
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()  # the next variant or stage starts from an empty device


def _append_time(times: list[float], now: Callable[[], float]) -> None:
    times.append(now())


def _run_steps(st, source, null_text, null_mask, cfg: Config, n: int, now: Callable[[], float]):
    """`n` training steps, one micro-batch each: the terms of the last, and per step the seconds
    of the whole step, of its forward + backward and of the optimizer part after it."""
    times: list[float] = []
    forward_backward: list[float] = []
    optimizer: list[float] = []
    b = cfg.train.batch_size
    for i in range(n):
        t0 = now()
        backward_done: list[float] = []
        terms, *_ = train_step(
            st,
            source,
            None,
            null_text,
            null_mask,
            cfg,
            i,
            b,
            1,
            after_backward=partial(_append_time, backward_done, now),
        )
        t2 = now()
        times.append(t2 - t0)
        forward_backward.append(backward_done[0] - t0)
        optimizer.append(t2 - backward_done[0])
    return terms, times, forward_backward, optimizer


def _time_steps(
    cfg: Config, ctx: DistContext, *, text_dim: int, steps: int, warmup: int, text_tokens: int, count_flops: bool
) -> dict:
    device = ctx.device
    torch.manual_seed(cfg.seed)
    st = build_state(cfg, [cfg], ctx, text_dim)
    b, res = cfg.train.batch_size, cfg.data.resolution
    flops = denoiser_flops(cfg, cast(PRXDenoiser, st.model).cfg, text_tokens)
    measured = measured_step_flops(cfg, st.loss_nets, device, text_dim, text_tokens) if count_flops else None
    batch, text, mask = random_inputs(b, res, text_tokens, text_dim, device)
    source = itertools.repeat(Batch(batch.images, batch.captions, text, mask))  # as stored caption embeddings
    null_text, null_mask = text[:1] * 0, mask[:1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    terms, times, forward_backward, optimizer = _run_steps(st, source, null_text, null_mask, cfg, warmup + steps, now)
    warm, times = times[:warmup], times[warmup:]
    step = median(times)
    tokens = flops["image_tokens"]
    achieved = flops["training_total"] * b / step
    peak = device_peak_flops(device)
    teachers = st.loss_nets.teachers
    out = {
        "step_seconds_median": step,
        "step_seconds": times,
        "forward_backward_seconds_median": median(forward_backward[warmup:]),
        "optimizer_seconds_median": median(optimizer[warmup:]),
        "images_per_s": b / step,
        "image_tokens_per_s": b * tokens / step,
        "image_tokens": tokens,
        "kept_tokens": flops["kept_tokens"],
        "batch_size": b,
        "terms": sorted(k for k in terms if k != "loss"),
        "optimizer": cfg.optimizer.name
        + (
            f" (Newton-Schulz {cfg.optimizer.muon_precision}, {cfg.optimizer.muon_ns_steps} steps)"
            if cfg.optimizer.name == "muon"
            else ""
        ),
        "precision": "bf16" if autocast_dtype(cfg, device) == torch.bfloat16 else "fp32",
        "compiled": cfg.parallel.compile,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,
        "sharded": f"FSDP2 over {ctx.world_size} rank(s)" if ctx.distributed else None,
        "warmup_seconds": sum(warm),  # includes the compilation when compiled
        "model_flops_per_image": flops["training_total"],
        "model_flops_forward_per_image": flops["forward_total"],
        "model_flops_by_part": flops["training"],
        "achieved_model_flops_per_s": achieved,
        "peak_flops": peak,
        "mfu": mfu(achieved, peak),
        "measured_step_flops_per_image": measured,
        "teacher_flops_per_image": measured - flops["training_total"] if teachers and measured else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return out


VARIANTS: dict[str, list[str]] = {
    "dense": [],
    "routed": ["routing.ratio=0.5"],
    "teachers": ["repa.weight=0.5", "perceptual.lpips_weight=0.1", "perceptual.dino_weight=0.01"],
    "routed+teachers": [
        "routing.ratio=0.5",
        "repa.weight=0.5",
        "perceptual.lpips_weight=0.1",
        "perceptual.dino_weight=0.01",
    ],
}


def variant_overrides(overrides: list[str], variant: str) -> list[str]:
    """The overrides with the variant's own appended; its keys win over the same keys among the
    overrides (a key may appear only once)."""
    mine = {o.split("=", 1)[0].strip() for o in VARIANTS[variant]}
    return [o for o in overrides if o.split("=", 1)[0].strip() not in mine] + VARIANTS[variant]


def run_bench(
    config: str | None,
    overrides: list[str],
    *,
    variants: list[str],
    steps: int,
    warmup: int,
    text_dim: int,
    text_tokens: int,
    out: str | None,
) -> dict:
    """Each variant is a named list of overrides applied on top of the base config."""
    if steps < 1 or warmup < 0:
        raise ConfigError(
            "--steps" if steps < 1 else "--warmup", "needs at least one timed step and no negative warm-up"
        )
    for name in variants:  # all checked before any (slow) work
        if name not in VARIANTS:
            raise ConfigError("--variants", f"unknown bench variant {name!r}; choose from {', '.join(VARIANTS)}")
    results = {}
    for name in variants:
        over = variant_overrides(overrides, name)
        cfg, _ = resolve_model_init(load_config(config, over))  # model.init: time its architecture, random weights
        results[name] = {
            "overrides": over,
            **time_steps(cfg, text_dim=text_dim, steps=steps, warmup=warmup, text_tokens=text_tokens),
        }
    base = results.get("dense", {}).get("step_seconds_median")
    if base:
        for r in results.values():
            r["step_time_vs_dense"] = r["step_seconds_median"] / base
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.hardware.device)
    name = device_name(device)
    report = {
        "device": name,
        "peak_flops": peak_flops(name) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "text_dim": text_dim,
        "text_tokens": text_tokens,
        "config": to_dict(cfg),
        "results": results,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
