"""The training loop: stages in order, resume, and the cadence of logs, sample grids, evaluations and
checkpoints around the step. What a run is made of is built in pixelrun/training/build.py; one optimizer step,
every loss term by name, is pixelrun/training/step.py.

    for each stage: open its batch source at the saved position
        until the stage's last step: train_step -> log -> grid? -> evaluate? -> checkpoint? -> stop?
    final checkpoint, grid, evaluation and the one-line summary
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrun.config import (
    Config,
    RunFailed,
    batch_split,
    model_fields,
    routing_span,
    stage_plan,
    to_dict,
    to_yaml,
    with_overrides,
)
from pixelrun.data import Prefetcher
from pixelrun.data.sources import source_kind
from pixelrun.evaluation.evaluate import Evaluator, applicable_metrics, describe_metrics, flat_metrics
from pixelrun.evaluation.validation import ValidationLoss
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import DistContext, process_group
from pixelrun.infra.grids import save_grid
from pixelrun.infra.locks import folder_lock
from pixelrun.infra.records import RunSummary
from pixelrun.infra.tracking import Tracker
from pixelrun.model.denoiser import ModelConfig, count_parameters
from pixelrun.run.outputs import POINT_IMAGES, evaluation_point, images_seen, provenance
from pixelrun.run.outputs import run_summary as summarize_run
from pixelrun.run.outputs import write_point as write_point_files
from pixelrun.training.build import (
    TrainState,
    autocast_dtype,
    build_state,
    check_init_from,
    check_paths,
    check_resume,
    make_batch_source,
    muon_precision_warning,
    text_encoder,
)
from pixelrun.training.inference import generate
from pixelrun.training.step import train_step


def train(cfg: Config, stop_at_step: int | None = None) -> dict:
    """Run (or resume) the training described by `cfg`, on one process or under torchrun. Returns
    a summary dict.

    `stop_at_step` simulates an interruption after that step (tests): it takes the same path as
    SIGTERM, saving a checkpoint and returning early.
    """
    check_paths(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    with process_group(cfg.train.device, cfg.parallel.replicate) as ctx:
        return run_training(cfg, ctx, stop_at_step)


class TrainingStopped(RunFailed):
    """The run cannot go on (its updates stay non-finite, its state would be saved non-finite): one line."""


def run_training(cfg: Config, ctx: DistContext, stop_at_step: int | None = None) -> dict:
    """The whole run in an existing process group (the rehearsal runs two in one), holding the run
    directory's lock (rank 0 takes it: the ranks of one run share the directory)."""
    with folder_lock(cfg.run.dir, "run.dir", "pixelrun train", enabled=ctx.is_main):
        run = open_run(cfg, ctx)
        try:
            stopped = train_stages(run, stop_at_step)
            return finish(run, stopped)
        finally:
            run.tracker.close()


# ----------------------------------------------------------------------------- the run's parts


@dataclass
class Run:
    """One training run: its parts, built once, and where it stands."""

    cfg: Config
    ctx: DistContext
    plan: list[tuple[int, int, Config]]  # (first step, end step, config) per stage
    splits: list[tuple[int, int, int]]  # (global batch, micro-batch, accumulation steps) per stage
    run_dir: Path
    st: TrainState
    encoder: object
    null_text: torch.Tensor
    null_mask: torch.Tensor
    evaluator: Evaluator | None
    validation: ValidationLoss | None
    tracker: Tracker
    step: int
    meta: dict | None  # the checkpoint resumed from
    start_step: int = 0
    t0: float = field(default_factory=time.time)
    stage_index: int = 0
    source: object = None
    grid_prompts: list[str] = field(default_factory=list)
    clock: tuple[float, int] = (0.0, 0)  # (time, step) images/s is measured from
    train_seconds: float = 0.0  # time in training steps over every session (no grids, evaluations, saves)
    flops_per_image: float = 0.0  # log.flops_per_image, or the denoiser's analytic count
    nonfinite_in_row: int = 0  # consecutive steps skipped for a non-finite loss or gradient norm
    skipped_steps: int = 0  # all such steps of the run, resumed sessions included
    saved_step: int = -1  # the step of the checkpoint this session wrote last

    def say(self, *lines: str) -> None:
        if self.ctx.is_main:
            for line in lines:
                tqdm.write(line)


def open_run(cfg: Config, ctx: DistContext) -> Run:
    """Everything checked before any work (the resume may continue this run, the metric networks
    load, the held-out data is there), then built, then restored from the checkpoint if there is one."""
    plan = stage_plan(cfg)
    splits = [batch_split(c, ctx.world_size) for _, _, c in plan]  # config errors before any work
    say = tqdm.write if ctx.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run.dir)
    if ctx.is_main:  # the run's lock is held: a temporary folder here is a save that died
        ckpt.remove_stale(run_dir)
    latest, meta = ckpt.verified_latest(run_dir, ctx, say) if cfg.run.resume else (None, None)
    init_src = ckpt.resolve_checkpoint(cfg.run.init_from) if cfg.run.init_from and meta is None else None
    for line in check_resume(cfg, meta["config"], latest) if meta is not None else []:
        say(line)
    # The metric networks load here, so a missing one stops the run before any training. Every rank
    # samples during an evaluation; only rank 0 loads networks and computes the metrics.
    metrics = applicable_metrics(cfg) if cfg.eval.prompts else []
    evaluator = Evaluator(cfg, metrics, ctx.device, compute=ctx.is_main, progress=ctx.is_main) if metrics else None
    torch.manual_seed(cfg.seed)
    encoder = text_encoder(cfg, ctx.device)
    encoder.warn = say
    validation = ValidationLoss(cfg, encoder, ctx.device) if cfg.eval.val_images else None
    null_text, null_mask = (a.to(ctx.device) for a in encoder.encode([""]))
    if init_src is not None:
        check_init_from(cfg, init_src, encoder.dim)
    st = build_state(cfg, [c for _, _, c in plan], ctx, encoder.dim)
    step = 0
    if meta is not None:
        st.restore(latest, meta)
        step = meta["step"]
        say(f"resuming from {latest} (step {step}, saved on {meta['world_size']} rank(s))")
        if step >= cfg.train.steps:
            say(f"nothing to train: the checkpoint is at step {step} and train.steps is {cfg.train.steps}")
    elif init_src is not None:
        for line in [*st.init_weights(init_src), f"initialised weights and EMA from {init_src}"]:
            say(line)
    if ctx.is_main:  # written once the checkpoint has loaded: a refused resume leaves the run as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker = Tracker(cfg, run_dir, start_step=step, enabled=ctx.is_main)
    run = Run(
        cfg,
        ctx,
        plan,
        splits,
        run_dir,
        st,
        encoder,
        null_text,
        null_mask,
        evaluator,
        validation,
        tracker,
        step,
        meta,
        start_step=step,
        train_seconds=float((meta or {}).get("train_seconds", 0.0)),
        flops_per_image=cfg.log.flops_per_image or analytic_flops_per_image(cfg, encoder.dim),
        skipped_steps=(meta or {}).get("skipped_steps", 0),
        saved_step=step if meta is not None else -1,
    )
    if ctx.is_main:
        provenance(ctx.device).write(run_dir / "provenance.json")
    _describe(run)
    return run


def analytic_flops_per_image(cfg: Config, text_dim: int) -> float:
    """The denoiser's training FLOPs per image (pixelrun/model/flops.py) at the last stage's square
    resolution, routed when it routes: the FLOPs axis when log.flops_per_image is not given."""
    from pixelrun.model.flops import training_flops_per_image

    last = stage_plan(cfg)[-1][2]
    model_cfg = ModelConfig(text_dim=text_dim, **model_fields(last))
    res = last.data.resolution
    return float(
        training_flops_per_image(model_cfg, res, res, last.text.max_tokens, last.routing.ratio, routing_span(last))[
            "training_total"
        ]
    )


def _describe(run: Run) -> None:
    from pixelrun.training.optim import describe

    cfg, ctx, st = run.cfg, run.ctx, run.st
    run.say(
        describe(st.opt.report),
        f"model: preset {cfg.model.preset}, {count_parameters(st.model) / 1e6:.2f}M parameters"
        f"{' (sharded)' if ctx.distributed else ''}; text encoder {run.encoder.name} (dim {run.encoder.dim}); "
        f"device {ctx.device}{f' x {ctx.world_size} ranks' if ctx.distributed else ''}; autocast "
        f"{autocast_dtype(cfg, ctx.device) or 'off (fp32)'}",
    )
    if warning := muon_precision_warning(cfg, ctx.device):
        run.say(warning)


# ----------------------------------------------------------------------------- the loop


def train_stages(run: Run, stop_at_step: int | None) -> int | str | None:
    """Train every stage not finished yet. Returns why it stopped early (a signal, a test's
    stop_at_step, the time budget), or None."""
    cfg, stopped = run.cfg, None
    with (
        StopFlag() as stop,
        tqdm(
            total=cfg.train.steps,
            initial=run.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not run.ctx.is_main,
        ) as bar,
    ):
        run.st.model.train()
        for stage_index, (_, s1, scfg) in enumerate(run.plan):
            if run.step >= s1:
                continue
            open_stage(run, stage_index)
            _, micro, accum = run.splits[stage_index]
            run.clock = (time.time(), run.step)
            while run.step < s1 and stopped is None:
                began = time.time()
                terms, grad_norm, applied = train_step(
                    run.st, run.source, run.encoder, run.null_text, run.null_mask, scfg, run.step, micro, accum
                )
                run.step += 1
                bar.update(1)
                count_nonfinite(run, applied, terms, grad_norm)
                logged = log_step(run, terms, grad_norm, bar)
                # CUDA runs ahead of the host by a step or two at most, and the logged steps wait for
                # it (their .item()), so the sum over steps is the training time
                run.train_seconds += time.time() - began
                after_step(run, scfg)
                if logged:
                    run.clock = (time.time(), run.step)  # images/s measures training, not grids or saves
                stopped = _should_stop(run.ctx, stop, stop_at_step, run.step, run.t0, cfg, check_now=logged)
            close_stage(run)
            if stopped is not None:
                break
    return stopped


def open_stage(run: Run, stage_index: int) -> None:
    """This stage's batch source at the saved position, its grid prompts, and what it turns on."""
    s0, s1, scfg = run.plan[stage_index]
    global_batch, micro, accum = run.splits[stage_index]
    run.stage_index = stage_index
    source = make_batch_source(scfg, run.ctx.rank, run.ctx.world_size, say=run.say)
    run.source = Prefetcher(source) if scfg.data.prefetch else source
    _restore_position(run.source, scfg, run.meta, stage_index, run.step - s0, accum, run.ctx, run.say)
    run.grid_prompts = source_kind(scfg).grid_prompts(scfg, run.source)
    if len(run.plan) > 1:
        run.say(
            f"stage {stage_index + 1}/{len(run.plan)} {run.cfg.stages[stage_index].name!r}: steps {s0}..{s1}, "
            f"{scfg.data.resolution}px, global batch {global_batch}"
        )
    run.say(*run.st.loss_nets.describe(scfg))
    if run.ctx.distributed or accum > 1:
        run.say(
            f"batch: global {global_batch} = {run.ctx.world_size} rank(s) x micro-batch {micro} x {accum} "
            f"accumulation step(s)"
        )


def close_stage(run: Run) -> None:
    close = getattr(run.source, "close", None)
    if close is not None:
        close()  # the batch in flight is not needed: its position is not saved; worker processes end


def log_step(run: Run, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, bar) -> bool:
    """Every train.log_every steps and at a stage's end: the loss terms averaged over ranks (the
    one host sync of a step), the gradient norm, the learning rate and images/s. Returns whether it
    logged."""
    s1 = run.plan[run.stage_index][1]
    if run.step % max(run.cfg.train.log_every, 1) and run.step != s1:
        return False
    values = run.ctx.mean({k: v.item() for k, v in terms.items()})
    since, at = run.clock
    images_per_s = (run.step - at) * run.splits[run.stage_index][0] / max(time.time() - since, 1e-9)
    row = {
        **values,
        "grad_norm": grad_norm.item(),
        "lr": run.st.sched.used[0],
        "images_per_s": images_per_s,
        "train_seconds": run.train_seconds,
        "skipped_steps": run.skipped_steps,
    }
    run.tracker.scalars(run.step, row, prefix="train/")
    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{images_per_s:.0f}")
    return True


def count_nonfinite(run: Run, applied: bool, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
    """Count a skipped step and say so; train.max_nonfinite_steps of them in a row stop the run
    (TrainingStopped) before anything else happens, so nothing of the diverged steps is saved."""
    if applied:
        run.nonfinite_in_row = 0
        return
    run.nonfinite_in_row += 1
    run.skipped_steps += 1
    limit = run.cfg.train.max_nonfinite_steps
    what = f"loss {terms['loss'].item():g}, gradient norm {grad_norm.item():g}"
    if run.nonfinite_in_row >= limit:
        last = ckpt.latest_checkpoint(run.run_dir)
        raise TrainingStopped(
            f"training stopped at step {run.step}: the loss or gradient norm was not finite for "
            f"{limit} steps in a row ({what}; train.max_nonfinite_steps={limit}); nothing of them "
            f"was applied or saved; the last checkpoint is {last or 'none'}. Lower train.lr or raise "
            f"train.warmup_steps, then run again"
        )
    run.say(
        f"step {run.step}: not finite ({what}); the update was skipped ({run.nonfinite_in_row} in a row, "
        f"{limit} stop the run)"
    )


def after_step(run: Run, scfg: Config) -> None:
    """A grid every train.sample_every steps, an evaluation every eval.every, a checkpoint every
    train.checkpoint_every and at each stage's end (the next stage can always resume from it)."""
    cfg, step = run.cfg, run.step
    s1 = run.plan[run.stage_index][1]
    if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.steps:
        path = sample_grid(run, scfg, f"step_{step:08d}.png")
        run.tracker.image("samples/ema", path, step)
    if ((cfg.eval.every and step % cfg.eval.every == 0) or step in cfg.eval.at_steps) and step < cfg.train.steps:
        evaluate_now(run, scfg)
    if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or (step == s1 and s1 < cfg.train.steps):
        save(run)


# ----------------------------------------------------------------------------- what happens between steps


def save(run: Run) -> Path:
    """A checkpoint of this step: every stateful part, and where each rank's data stands. Never of a
    non-finite state (TrainingStopped instead), and once per step."""
    st = run.st
    final = ckpt.checkpoint_root(run.run_dir) / f"step_{run.step:08d}"
    if run.saved_step == run.step:
        return final
    tensors = st.state_dicts()
    bad = ckpt.first_nonfinite(tensors, run.ctx)
    if bad is not None:
        raise TrainingStopped(
            f"training stopped at step {run.step}: {bad} holds non-finite values, so no checkpoint "
            f"was written; the last checkpoint is {ckpt.latest_checkpoint(run.run_dir) or 'none'}"
        )
    meta = {
        "step": run.step,
        "stage": run.stage_index,
        "scheduler": st.sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "data": run.ctx.gather_objects(run.source.state_dict()),
        "world_size": run.ctx.world_size,
        "trainable": sorted(st.trainable.keys()),
        "optimizer_kind": run.cfg.train.optimizer,
        "config": to_dict(run.cfg),
        "text_dim": run.encoder.dim,
        "train_seconds": run.train_seconds,
        "skipped_steps": run.skipped_steps,
    }
    path = ckpt.save_checkpoint(
        run.run_dir, run.step, tensors, meta, to_yaml(run.cfg), run.cfg.train.keep_checkpoints, run.ctx
    )
    run.saved_step = run.step
    return path


def sample_grid(run: Run, scfg: Config, name: str) -> Path:
    """A labelled grid of the fixed prompts from the EMA weights (every rank samples: a sharded
    model's forward is collective; rank 0 writes it)."""
    path = run.run_dir / "samples" / name
    if not run.grid_prompts:
        return path
    images = generate(run.st.ema.model, run.encoder, run.grid_prompts, scfg, run.ctx.device, seed=scfg.sample.seed)
    return save_grid(images, run.grid_prompts, path) if run.ctx.is_main else path


def evaluate_now(run: Run, scfg: Config) -> dict | None:
    """eval.metrics of the eval.weights (EMA by default) on the fixed held-out captions and seeds, at
    sample.guidance and at each scale of the eval.guidance sweep, and the validation loss by noise
    level of the raw and EMA weights. metrics.jsonl gets one row (eval/<metric> at sample.guidance,
    val/flow/<bin>, val_ema/flow/<bin>); points/step_*.json gets everything, each prompt's values
    and the first generated images included (what `pixelrun ablate` and `pixelrun report` read); the
    metric settings go to eval/settings.json when they change (a new stage)."""
    row, results = {}, []
    if run.validation is not None:
        row.update(run.validation(run.st.model, scfg))
        row.update(run.validation(run.st.ema.model, scfg, prefix="val_ema"))
    model = run.st.ema.model if scfg.eval.weights == "ema" else run.st.model
    if run.evaluator is not None:
        for g in dict.fromkeys([scfg.sample.guidance, *scfg.eval.guidance]):
            gcfg = with_overrides(to_dict(scfg), [f"sample.guidance={g}"]) if g != scfg.sample.guidance else scfg
            results.append(
                run.evaluator(
                    model,
                    run.encoder,
                    gcfg,
                    sample_seed=scfg.sample.seed,
                    keep_images=POINT_IMAGES if not results else 0,
                )
            )
    result = results[0] if results else None
    if not run.ctx.is_main or not (row or result):
        return result
    if result is not None:
        row.update(flat_metrics(result["metrics"]))
        settings_path = run.run_dir / "eval" / "settings.json"
        settings = json.dumps(result["settings"], indent=2)
        if not settings_path.exists() or settings_path.read_text() != settings:
            settings_path.parent.mkdir(exist_ok=True)
            settings_path.write_text(settings)
        run.say(
            f"step {run.step}: {describe_metrics(result['metrics'])} ({scfg.eval.weights.upper()}, "
            f"{scfg.eval.prompts} prompts)"
        )
        for r in results[1:]:
            run.say(f"  at guidance {r['settings']['guidance']:g}: {describe_metrics(r['metrics'])}")
    run.tracker.scalars(run.step, row)
    write_point(run, scfg, row, results)
    return result


def write_point(run: Run, scfg: Config, row: dict, results: list[dict]) -> Path:
    """points/step_XXXXXXXX.json: this evaluation whole, against steps, images, FLOPs and training
    time; its first generated images as points/step_XXXXXXXX/NNN.png."""
    images = results[0].pop("images", None) if results else None
    seen = images_seen(run.plan, run.splits, run.step)
    point = evaluation_point(
        run.step, run.cfg.train.steps, seen, run.flops_per_image, run.train_seconds, scfg, row, results
    )
    return write_point_files(run.run_dir, point, images)


def finish(run: Run, stopped) -> dict:
    """The final checkpoint; unless stopped early, the final grid, evaluation and the summary line."""
    scfg = run.plan[run.stage_index][2]
    if run.source is None:  # the run was already complete: no stage trained this session
        run.stage_index = len(run.plan) - 1
        scfg = run.plan[-1][2]
        run.source = make_batch_source(scfg, run.ctx.rank, run.ctx.world_size)
        run.grid_prompts = source_kind(scfg).grid_prompts(scfg, run.source)
    last = save(run)
    close_stage(run)
    elapsed = time.time() - run.t0
    if stopped is not None and stopped != "max_minutes" and run.step < run.cfg.train.steps:
        name = signal.Signals(stopped).name if isinstance(stopped, int) else stopped
        run.say(
            f"stopped by {name} at step {run.step}/{run.cfg.train.steps}; checkpoint {last}. "
            f"Run the same command again to resume."
        )
        return {"step": run.step, "checkpoint": str(last), "stopped": name, "signal": stopped}
    final_grid = sample_grid(run, scfg, "final.png")
    summary = {
        "step": run.step,
        "checkpoint": str(last),
        "samples": str(final_grid.parent),
        "session_seconds": elapsed,
        "steps_this_session": run.step - run.start_step,
    }
    result = evaluate_now(run, scfg)
    if result is not None:  # rank 0 only
        result = {k: v for k, v in result.items() if k not in ("per_prompt", "prompts", "images")}
        (run.run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        summary["eval"] = result["metrics"]
        if "score" in result:
            summary["score"] = result["score"]
    summary.update(_data_counts(run))
    if run.ctx.is_main:
        run_summary(run).write(run.run_dir / "run-summary.json")
    run.say(_summary_line(run, summary, last, final_grid, elapsed))
    return summary


def run_summary(run: Run) -> RunSummary:
    """run-summary.json's record: what the finished run reached and what it cost."""
    return summarize_run(
        run.run_dir,
        steps=run.step,
        images=images_seen(run.plan, run.splits, run.step),
        flops_per_image=run.flops_per_image,
        train_seconds=run.train_seconds,
        global_batch=run.splits[-1][0],
        device=run.ctx.device,
        world_size=run.ctx.world_size,
    )


def _data_counts(run: Run) -> dict:
    """Every rank's skipped samples and cut captions: rank 0 may have skipped nothing itself."""
    src = run.source
    counts = run.ctx.gather_objects(
        (getattr(src, "skipped", 0), (getattr(src, "skipped_paths", None) or [None])[0], run.encoder.truncated)
    )
    return {
        "skipped_images": sum(n for n, _, _ in counts),
        "first_skipped": next((p for _, p, _ in counts if p), None),
        "truncated_captions": sum(n for *_, n in counts),
    }


def _summary_line(run: Run, summary: dict, last: Path, final_grid: Path, elapsed: float) -> str:
    cfg = run.cfg
    score = summary.get("score")
    others = {k: v for k, v in summary.get("eval", {}).items() if k != "shapes"}
    text = (
        (
            f"; shapes score {score['placed']:.3f} (EMA, {cfg.eval.prompts} prompts, exact set "
            f"{score['exact_set']:.3f}, eval.json in the run)"
        )
        if score
        else ""
    )
    if others:
        text += f"; {describe_metrics(others)} (EMA, {cfg.eval.prompts} prompts, eval.json in the run)"
    if summary["skipped_images"]:
        text += f"; skipped {summary['skipped_images']} unusable samples (first: {summary['first_skipped']})"
    if summary["truncated_captions"]:
        text += (
            f"; {summary['truncated_captions']} distinct captions were cut to text.max_tokens="
            f"{cfg.text.max_tokens} tokens"
        )
    return (
        f"done: {run.step} steps ({_format_duration(elapsed)} this session); checkpoint {last}; "
        f"samples {final_grid.parent}/{text}"
    )


# ----------------------------------------------------------------------------- helpers


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


def _format_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def _restore_position(
    source, cfg: Config, meta: dict | None, stage_index: int, steps_into_stage: int, accum: int, ctx: DistContext, say
) -> None:
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
    say(
        f"warning: the data position was saved on {meta['world_size'] if meta else '?'} rank(s) and cannot be "
        f"carried to {ctx.world_size}; this stage's image order starts afresh"
    )


def _should_stop(
    ctx: DistContext, stop: StopFlag, stop_at_step, step: int, t0: float, cfg: Config, check_now: bool = True
):
    """Why to stop after this step (a signal, a test's stop_at_step, the time budget), or None.
    Ranks agree: a signal that reached any rank, or rank 0's clock, stops them all together. That
    agreement is a collective with a host sync, so under torchrun it happens on logging steps only
    (`check_now`): a stop then waits at most train.log_every steps."""
    if ctx.distributed and not check_now:
        return None
    why = stop.signal or ("stop_at_step" if stop_at_step is not None and step >= stop_at_step else None)
    over_time = bool(cfg.train.max_minutes and time.time() - t0 >= 60 * cfg.train.max_minutes)
    if ctx.distributed:
        code = {
            "signal": float(stop.signal or 0),
            "stop_at": float(why == "stop_at_step"),
            "time": float(over_time and ctx.is_main),
        }
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
