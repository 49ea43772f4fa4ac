"""What a training run says in words: its parts when it starts (`describe_run`) and the one line
that ends it (`summary_line`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelrun.config import Config
from pixelrun.evaluation.evaluate import describe_metrics, describe_shapes
from pixelrun.infra.distributed import DistContext
from pixelrun.infra.precision import autocast_dtype, muon_precision_warning
from pixelrun.model.denoiser import count_parameters
from pixelrun.training.build import TrainState


def describe_run(cfg: Config, ctx: DistContext, st: TrainState, encoder: Any) -> list[str]:
    """The optimizer's groups, the model, the text encoder, the device and the precision, and a
    warning where Muon would crawl."""
    from pixelrun.training.optim import describe

    lines = [
        describe(st.opt.report),  # type: ignore[attr-defined]  # build_optimizer's attribute
        f"model: preset {cfg.model.preset}, {count_parameters(st.model) / 1e6:.2f}M parameters"
        f"{' (sharded)' if ctx.distributed else ''}; text encoder {encoder.name} (dim {encoder.dim}, "
        f"{str(encoder.model.dtype).removeprefix('torch.')}); "  # the dtype the tower was loaded in
        f"device {ctx.device}{f' x {ctx.world_size} ranks' if ctx.distributed else ''}; autocast "
        f"{autocast_dtype(cfg, ctx.device) or 'off (fp32)'}",
    ]
    if warning := muon_precision_warning(cfg, ctx.device):
        lines.append(warning)
    return lines


def describe_plan(cfg: Config, plan: list, splits: list, run_dir: Path, metrics: list[str]) -> list[str]:
    """The run's size and where it writes, and what it evaluates (or that it evaluates nothing, and
    the key that would), for its start."""
    steps = plan[-1][1]
    images = sum((s1 - s0) * split[0] for (s0, s1, _), split in zip(plan, splits))
    lines = [f"plan: {steps} steps, {images:,} images in all (global batch {splits[-1][0]}); run folder {run_dir}"]
    when = f"every {cfg.eval.every} steps and at the end" if cfg.eval.every else "at the end"
    if metrics:
        auto = " (eval.metrics=[auto]: the shapes score on shapes data, fd-effnet on other data)"
        own = f" from {cfg.eval.prompts_file}" if cfg.eval.prompts_file else ""
        lines.append(
            f"evaluation: {', '.join(metrics)} on {cfg.eval.prompts} prompts{own} ({cfg.eval.weights} weights), "
            f"{when}{auto if 'auto' in cfg.eval.metrics else ''}"
        )
    elif not cfg.eval.prompts:
        lines.append("evaluation: none (eval.prompts=0)")
    else:
        lines.append(
            f"evaluation: none: eval.metrics={cfg.eval.metrics} does not apply to data.source={cfg.data.source}; "
            f"set 'eval.metrics=[fd-effnet]' for the offline Fréchet distance to held-out images"
        )
    return lines


def estimate_line(steps_done: int, seconds: float, steps_left: int) -> str:
    """The remaining wall time from the steps timed so far (training only: grids, evaluations and
    checkpoints come on top)."""
    per = seconds / max(steps_done, 1)
    return (
        f"estimate: {per:.3g} s/step over the first {steps_done} steps: about {format_duration(per * steps_left)} "
        f"for the {steps_left} left, plus sample grids, evaluations and checkpoints"
    )


def summary_line(cfg: Config, step: int, summary: dict, last: Path, final_grid: Path, elapsed: float) -> str:
    """The run's last line: where its checkpoint and samples are, its final evaluation (the shapes
    score's placed measure with kind and exact set beside it), and what the data left out."""
    score = summary.get("score")
    others = {k: v for k, v in summary.get("eval", {}).items() if k != "shapes"}
    weights, prompts = cfg.eval.weights.upper(), f"{cfg.eval.prompts} prompts"
    text = (
        "; " + describe_shapes(score, f"exact set {score['exact_set']:.3f}", weights, prompts, "eval.json in the run")
        if score
        else ""
    )
    if others:
        text += f"; {describe_metrics(others)} ({weights}, {prompts}, eval.json in the run)"
    if summary["skipped_images"]:
        text += f"; skipped {summary['skipped_images']} unusable samples (first: {summary['first_skipped']})"
    if summary["truncated_captions"]:
        text += (
            f"; {summary['truncated_captions']} distinct captions were cut to text.max_tokens="
            f"{cfg.text.max_tokens} tokens"
        )
    return (
        f"done: {step} steps ({format_duration(elapsed)} this session); checkpoint {last}; "
        f"samples {final_grid.parent}/{text}"
    )


def format_duration(seconds: float) -> str:
    """The reports' wall time (pixelrun/infra/units.py): '3 min 49 s'."""
    from pixelrun.infra.units import duration

    return duration(seconds)
