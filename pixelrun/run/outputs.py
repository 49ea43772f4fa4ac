"""What a run leaves for other programs to read, built as the typed records of
pixelrun/infra/records.py: the evaluation points (points/step_XXXXXXXX.json and their first images),
run-summary.json and provenance.json. `pixelrun ablate` and `pixelrun report` read them back."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from pixelrun.config import Config
from pixelrun.diffusion.denoise import DENOISE_IMAGES, denoise_rows, save_denoise_grid
from pixelrun.evaluation.heldout import real_images_and_prompts
from pixelrun.infra.devices import device_name
from pixelrun.infra.grids import save_png
from pixelrun.infra.records import EvalPoint, GuidanceResult, Provenance, RunSummary, read_metrics

POINT_IMAGES = 8  # generated images kept per evaluation point, for grids of the same prompts across runs


def images_seen(plan: list, splits: list, step: int) -> int:
    """Training images up to `step`, over the stages (each with its own global batch): `plan` is
    stage_plan's (first step, end step, config) per stage, `splits` batch_split's per stage."""
    return sum(max(0, min(step, s1) - s0) * split[0] for (s0, s1, _), split in zip(plan, splits))


def evaluation_point(
    step: int,
    steps: int,
    images: int,
    flops_per_image: float,
    train_seconds: float,
    scfg: Config,
    row: dict,
    results: list[dict],
) -> EvalPoint:
    """One evaluation (the evaluator's results, sample.guidance first) with where the run stood."""
    return EvalPoint(
        step=step,
        fraction=step / steps,
        images=images,
        flops=images * flops_per_image,
        train_seconds=train_seconds,
        weights=scfg.eval.weights,
        sample_seed=scfg.sample.seed,
        prompts=results[0]["prompts"] if results else [],
        val={k: v for k, v in row.items() if k.startswith(("val/", "val_ema/"))},
        results=[
            GuidanceResult(
                guidance=r["settings"]["guidance"],
                guidance_mode=r["settings"]["guidance_mode"],
                metrics=r["metrics"],
                per_prompt=r["per_prompt"],
                ema_decay=r.get("ema_decay"),
                nfe=r["settings"].get("nfe"),
            )
            for r in results
        ],
        settings=results[0]["settings"] if results else None,
    )


def write_point(run_dir: Path, point: EvalPoint, images: Any) -> Path:
    """points/step_XXXXXXXX.json and the point's first generated images beside it (`images`: the
    evaluator's batch of them, or None)."""
    path = Path(run_dir) / "points" / EvalPoint.file_name(point.step)
    if images is not None:
        for i, image in enumerate(images):
            save_png(image, EvalPoint.image_folder(path) / f"{i:03d}.png")
    return point.write(path)


def run_summary(
    run_dir: Path,
    *,
    steps: int,
    images: int,
    flops_per_image: float,
    train_seconds: float,
    global_batch: int,
    device: torch.device | str,
    world_size: int,
) -> RunSummary:
    """What a finished run reached and what it cost: steps, images, FLOPs, training time, throughput
    (the median of the logged images/s, each over the steps since the previous log; `global_batch`
    is the last stage's), peak memory, and the machine's load as it ended (the reports mark
    images/s measured on a machine busier than its CPUs)."""
    rates = [
        row["images_per_s"]
        for row in read_metrics(Path(run_dir) / "metrics.jsonl")
        if isinstance(row.get("images_per_s"), (int, float)) and row["images_per_s"] > 0
    ]
    rate = float(sorted(rates)[len(rates) // 2]) if rates else images / max(train_seconds, 1e-9)
    return RunSummary(
        status="done",
        steps=steps,
        images=images,
        flops=images * flops_per_image,
        flops_per_image=flops_per_image,
        train_seconds=train_seconds,
        images_per_s=rate,
        step_seconds=global_batch / rate,
        peak_memory_bytes=peak_memory_bytes(device),
        device=device_name(torch.device(device)),
        world_size=world_size,
        **machine_load(),
    )


def machine_load() -> dict:
    """The 1-minute load average (None where the system has none) and the CPUs this process may use."""
    import os

    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"load_1min": load, "cpus": cpus}


def provenance(device: torch.device | str) -> Provenance:
    """What produced a run: the code (git commit and whether the tree had changes), the packages,
    the machine and the command (modded-nanogpt keeps the same at the top of every log)."""
    import platform
    import socket
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("pixelrun", "torch", "numpy", "transformers", "diffusers", "webdataset"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    status = _git("status", "--porcelain")
    return Provenance(
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=bool(status) if status is not None else None,
        packages=packages,
        python=platform.python_version(),
        host=socket.gethostname(),
        device=device_name(torch.device(device)),
        command=" ".join(sys.argv),
    )


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def peak_memory_bytes(device: torch.device | str) -> int:
    """The CUDA allocator's peak on a GPU; the process's peak resident memory on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def write_denoise_grid(run_dir: Path, model, encoder, cfg: Config, device, is_main: bool) -> Path | None:
    """samples/denoise.png: held-out images and the model's predictions from them at several noise
    levels (pixelrun/diffusion/denoise.py), beside the final grid; none when the run makes no grids.
    Every rank predicts (a sharded model's forward is collective); rank 0 writes."""
    if not cfg.sample.grid_prompts:
        return None
    images, captions = real_images_and_prompts(cfg, DENOISE_IMAGES, at_most=True)
    if not captions:
        return None
    rows = denoise_rows(model, encoder, images, captions, cfg, device, seed=cfg.sample.seed)
    path = run_dir / "samples" / "denoise.png"
    return save_denoise_grid(rows, captions, path) if is_main else path
