"""The training loop: stages in order, and the cadence of logs, sample grids, evaluations and
checkpoints around the step. What a run is made of is built in pixelrun/training/build.py; one optimizer step,
every loss term by name, is pixelrun/training/step.py; what a checkpoint saves, part by part,
pixelrun/training/state.py; resume is pixelrun/run/resume.py, an early stop pixelrun/run/stop.py, and
the evaluations (points and the final eval.json) pixelrun/run/evaluations.py.

    for each stage: open its batch source at the saved position
        until the stage's last step: train_step -> log -> grid? -> evaluate? -> checkpoint? -> stop?
    final checkpoint, grid, evaluation and the one-line summary
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrun.config import (
    Config,
    batch_split,
    stage_plan,
    to_yaml,
)
from pixelrun.data import Prefetcher
from pixelrun.data.sources import check_paths, describe_held_out, describe_source, grid_prompts, make_batch_source
from pixelrun.diffusion.generate import generate
from pixelrun.evaluation.evaluate import Evaluator, applicable_metrics
from pixelrun.evaluation.validation import ValidationLoss
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import DistContext, process_group
from pixelrun.infra.grids import save_grid
from pixelrun.infra.locks import folder_lock
from pixelrun.infra.progress import progress
from pixelrun.infra.records import RunSummary
from pixelrun.infra.tracking import Tracker
from pixelrun.model.import_diffusers import resolve as resolve_model_init
from pixelrun.model.text import text_encoder
from pixelrun.run.evaluations import evaluate_now, final_evaluation
from pixelrun.run.health import Health
from pixelrun.run.messages import describe_plan, describe_run, estimate_line, summary_line
from pixelrun.run.outputs import images_seen, provenance, write_denoise_grid
from pixelrun.run.outputs import run_summary as summarize_run
from pixelrun.run.parts import Run
from pixelrun.run.preflight import preflight
from pixelrun.run.resume import (
    base_loader,
    check_init_from,
    check_model_init,
    choose_start,
    fall_back,
    lora_base,
    restore,
    run_parts,
)
from pixelrun.run.stop import StopFlag, TrainingStopped, should_stop
from pixelrun.training.build import build_state
from pixelrun.training.flops import analytic_flops_per_image
from pixelrun.training.state import NonFiniteState
from pixelrun.training.step import train_step


def train(cfg: Config, stop_at_step: int | None = None, from_checkpoint: str | None = None) -> dict:
    """Run (or resume) the training described by `cfg`, on one process or under torchrun. Returns
    a summary dict.

    `stop_at_step` simulates an interruption after that step (tests): it takes the same path as
    SIGTERM, saving a checkpoint and returning early. `from_checkpoint` (`--from-checkpoint step_N`)
    resumes from an older checkpoint of the run, the newer ones set aside (pixelrun/run/resume.py).
    """
    check_paths(cfg)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    with process_group(cfg.hardware.device, cfg.parallel.replicate) as ctx:
        return run_training(cfg, ctx, stop_at_step, from_checkpoint)


def run_training(
    cfg: Config, ctx: DistContext, stop_at_step: int | None = None, from_checkpoint: str | None = None
) -> dict:
    """The whole run in an existing process group (the rehearsal runs two in one), holding the run
    directory's lock (rank 0 takes it: the ranks of one run share the directory)."""
    with folder_lock(cfg.run.dir, "run.dir", "pixelrun train", enabled=ctx.is_main):
        run = open_run(cfg, ctx, from_checkpoint)
        try:
            stopped = train_stages(run, stop_at_step)
            return finish(run, stopped)
        finally:
            run.tracker.close()


# ----------------------------------------------------------------------------- the run's parts (pixelrun/run/parts.py)


def open_run(cfg: Config, ctx: DistContext, from_checkpoint: str | None = None) -> Run:
    """Everything checked before any work (the resume may continue this run, the metric networks
    load, the held-out data is there), then built, then restored from the checkpoint if there is one."""
    preflight(cfg)  # every network, all at once, before the run folder is touched
    cfg, model_init = resolve_model_init(cfg)  # model.init's architecture, from its config.json
    plan = stage_plan(cfg)
    splits = [batch_split(c, ctx.world_size) for _, _, c in plan]  # config errors before any work
    say = tqdm.write if ctx.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run.dir)
    start = choose_start(cfg, ctx, say, from_checkpoint, model_init)
    base = lora_base(cfg, start, say, model_init)  # LoRA's frozen weights, read by every session
    # The metric networks load here, so a missing one stops the run before any training. Every rank
    # samples during an evaluation; only rank 0 loads networks and computes the metrics.
    metrics = applicable_metrics(cfg) if cfg.eval.prompts else []
    evaluator = Evaluator(cfg, metrics, ctx.device, compute=ctx.is_main, progress=ctx.is_main) if metrics else None
    torch.manual_seed(cfg.seed)
    encoder = text_encoder(cfg, ctx.device)
    encoder.warn = say
    validation = ValidationLoss(cfg, encoder, ctx.device) if cfg.eval.val_images else None
    null_text, null_mask = (a.to(ctx.device) for a in encoder.encode([""]))
    if (source := start.init_from or (base.path if base and not base.imported else None)) is not None:
        check_init_from(cfg, source, encoder.dim)
    if model_init is not None:
        check_model_init(model_init, encoder.dim, cfg.text.encoder)
    st = build_state(cfg, [c for _, _, c in plan], ctx, encoder.dim, base_loader(base) if base else None)
    checkpointer, counters, position = run_parts(cfg, ctx, st, encoder.dim)
    restore(start, checkpointer, st, cfg.train.steps, say, ctx)
    if ctx.is_main:  # written once the checkpoint has loaded: a refused resume leaves the run as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker = Tracker(cfg, run_dir, start_step=counters.step, enabled=ctx.is_main)
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
        counters,
        position,
        checkpointer,
        start_step=counters.step,
        flops_per_image=cfg.log.flops_per_image or analytic_flops_per_image(cfg, encoder.dim),
        saved_step=counters.step if start.meta is not None else -1,
        health=Health(cfg.train.divergence_factor, cfg.train.divergence_window, cfg.train.divergence_weight_growth),
        started_from=start.path,
    )
    run.health.reference_norm = weight_norm(run)
    if ctx.is_main:
        provenance(ctx.device).write(run_dir / "provenance.json")
    run.say(*describe_run(cfg, ctx, st, encoder))
    run.say(*describe_plan(cfg, plan, splits, run_dir, metrics))
    return run


# ----------------------------------------------------------------------------- the loop


def train_stages(run: Run, stop_at_step: int | None) -> int | str | None:
    """Train every stage not finished yet. Returns why it stopped early (a signal, a test's
    stop_at_step, the time budget), or None."""
    cfg, stopped = run.cfg, None
    with (
        StopFlag() as stop,
        progress(
            total=cfg.train.steps, initial=run.step, desc="train", unit="step", disable=not run.ctx.is_main
        ) as bar,
    ):
        run.st.model.train()
        run.session_start = (run.step, run.train_seconds)
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
                observe_health(run, terms, grad_norm, applied)
                logged = log_step(run, terms, grad_norm, bar)
                # CUDA runs ahead of the host by a step or two at most, and the logged steps wait for
                # it (their .item()), so the sum over steps is the training time
                run.train_seconds += time.time() - began
                after_step(run, scfg)
                if logged:
                    say_estimate(run)
                    run.clock = (time.time(), run.step)  # images/s measures training, not grids or saves
                stopped = should_stop(run.ctx, stop, stop_at_step, run.step, run.t0, cfg, check_now=logged)
            close_stage(run)
            if stopped is not None:
                break
    return stopped


def say_estimate(run: Run) -> None:
    """Once a session, at its first logged step past its first: the wall time the rest will take."""
    step0, seconds0 = run.session_start
    if not run.said_estimate and run.step - step0 >= 2 and run.step < run.cfg.train.steps:
        run.said_estimate = True
        run.say(estimate_line(run.step - step0, run.train_seconds - seconds0, run.cfg.train.steps - run.step))


def open_stage(run: Run, stage_index: int) -> None:
    """This stage's batch source at the saved position, its grid prompts, and what it turns on."""
    s0, s1, scfg = run.plan[stage_index]
    global_batch, micro, accum = run.splits[stage_index]
    run.stage_index = stage_index
    source = make_batch_source(scfg, run.ctx.rank, run.ctx.world_size, say=run.say)
    run.say(describe_source(scfg, source))
    if (held_out := describe_held_out(scfg)) is not None:
        run.say(held_out)
    warning = run.position.place(
        Prefetcher(source, run.encoder.encode) if scfg.data.prefetch else source, stage_index, run.step - s0, accum
    )
    if warning:
        run.say(warning)
    run.grid_prompts = grid_prompts(scfg, run.source)
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
    """Every cadence.log_every steps and at a stage's end: the loss terms averaged over ranks (the
    one host sync of a step), the gradient norm, the learning rate, images/s and, on a device whose
    peak is known, MFU. Returns whether it logged."""
    s1 = run.plan[run.stage_index][1]
    if run.step % max(run.cfg.cadence.log_every, 1) and run.step != s1:
        return False
    from pixelrun.infra.devices import device_peak_flops
    from pixelrun.training.flops import mfu, stage_model_flops

    values = run.ctx.mean({k: v.item() for k, v in terms.items()})
    since, at = run.clock
    images_per_s = (run.step - at) * run.splits[run.stage_index][0] / max(time.time() - since, 1e-9)
    # MFU of one device: the stage's denoiser FLOPs (teachers not included) over the device's peak
    peak = device_peak_flops(run.ctx.device)
    model_flops = stage_model_flops(run.plan[run.stage_index][2], run.encoder.dim) if peak else 0.0
    row = {
        **values,
        "grad_norm": grad_norm.item(),
        "lr": run.st.sched.used[0],
        "images_per_s": images_per_s,
        **({"mfu": mfu(images_per_s * model_flops / run.ctx.world_size, peak)} if peak else {}),
        "train_seconds": run.train_seconds,
        "skipped_steps": run.skipped_steps,
    }
    run.tracker.scalars(run.step, row, prefix="train/")
    bar.set_postfix(bar_postfix(values, images_per_s))
    return True


def bar_postfix(values: dict[str, float], images_per_s: float) -> dict[str, str]:
    """The training bar's figures: each loss term by name (the total mixes terms of other signs and
    scales: REPA's is a negative cosine), then images/s."""
    terms = {k: v for k, v in values.items() if k != "loss"} or values
    rate = f"{images_per_s:.3g}" if images_per_s < 1000 else f"{images_per_s:.0f}"
    return {**{k: f"{v:.4g}" for k, v in terms.items()}, "img/s": rate}


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
        raise TrainingStopped(
            f"training stopped at step {run.step}: the loss or gradient norm was not finite for "
            f"{limit} steps in a row ({what}; train.max_nonfinite_steps={limit}); nothing of them "
            f"was applied or saved; {where_next(run)}. Lower optimizer.lr (now {run.cfg.optimizer.lr:g}) or "
            f"raise schedule.warmup_steps, then run again"
        )
    run.say(
        f"step {run.step}: not finite ({what}); the update was skipped ({run.nonfinite_in_row} in a row, "
        f"{limit} stop the run)"
    )


def observe_health(run: Run, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, applied: bool) -> None:
    """Feed the step's loss and gradient norm to the divergence detector; say when it trips (a
    skipped step is said by count_nonfinite). The step's one host sync, `applied`, has already waited
    for the device, so reading two numbers more costs no wait."""
    loss, norm = torch.stack([terms.get("flow", terms["loss"]).detach().float(), grad_norm.detach().float()]).tolist()
    why = run.health.observe(run.step, loss, norm, applied)
    if why is not None and applied:
        run.say(f"step {run.step}: diverging: {why}")


def weight_norm(run: Run) -> float:
    """The global norm of the trained weights (every rank calls it: a sum over ranks; with replicated
    weights every rank counts its copy, which a ratio of two norms of one session does not see)."""
    params = [p.detach() for p in run.st.trained_params]
    local = [(p.to_local() if hasattr(p, "to_local") else p).float().pow(2).sum() for p in params]
    total = torch.stack(local).sum() if local else torch.zeros((), device=run.ctx.device)
    return float(run.ctx.sum_over_ranks(total).sqrt().item())


def healthy_to_save(run: Run) -> bool:
    """Whether the state may be checkpointed: no rank's detector says it diverged, and the weights are
    within their bound (every rank calls it: the ranks agree, as the save is collective). Says once
    per unhealthy episode that a due checkpoint is not written."""
    run.norm = weight_norm(run)
    why = run.health.check_weights(run.step, run.norm)
    unhealthy = run.ctx.sum_over_ranks(torch.tensor(float(not run.health.healthy), device=run.ctx.device)).item()
    if not unhealthy:
        run.said_unsaved = False
        return True
    if not run.said_unsaved:
        run.said_unsaved = True
        reason = why or run.health.reason or "another rank's loss spiked"
        run.say(
            f"step {run.step}: no checkpoint written: the state has diverged ({reason}); none is until it "
            f"recovers; {where_next(run, fall=False)}"
        )
    return False


def where_next(run: Run, fall: bool = True) -> str:
    """Where the next run resumes, after this session diverged (`fall`: a resume that diverged
    before writing a checkpoint of its own falls back one checkpoint further)."""
    last = ckpt.latest_checkpoint(run.run_dir)
    if not fall:
        return f"the last healthy checkpoint is {last.name if last else 'none'}"
    if not run.ctx.is_main:
        return "see rank 0"
    return fall_back(run.run_dir, run.started_from, run.wrote)


def after_step(run: Run, scfg: Config) -> None:
    """A grid every cadence.sample_every steps, an evaluation every eval.every, a checkpoint every
    cadence.checkpoint_every and at each stage's end (the next stage can always resume from it)."""
    cfg, step = run.cfg, run.step
    s1 = run.plan[run.stage_index][1]
    if cfg.cadence.sample_every and step % cfg.cadence.sample_every == 0 and step < cfg.train.steps:
        path = sample_grid(run, scfg, f"step_{step:08d}.png")
        run.tracker.image("samples/ema", path, step)
    if ((cfg.eval.every and step % cfg.eval.every == 0) or step in cfg.eval.at_steps) and step < cfg.train.steps:
        evaluate_now(run, scfg)
    if (cfg.cadence.checkpoint_every and step % cfg.cadence.checkpoint_every == 0) or (
        step == s1 and s1 < cfg.train.steps
    ):
        save(run)


# ----------------------------------------------------------------------------- what happens between steps


def save(run: Run) -> Path | None:
    """A checkpoint of this step: every stateful part, and where each rank's data stands. Never of a
    non-finite state (TrainingStopped instead) nor of a diverged one (None: not written), and once
    per step."""
    final = ckpt.checkpoint_root(run.run_dir) / f"step_{run.step:08d}"
    if run.saved_step == run.step:
        return final
    if not healthy_to_save(run):
        return None
    try:
        path = run.checkpointer.save(run.run_dir, run.step, to_yaml(run.cfg), run.cfg.cadence.keep_checkpoints, run.ctx)
    except NonFiniteState as e:
        raise TrainingStopped(
            f"training stopped at step {run.step}: {e.name} holds non-finite values, so no checkpoint "
            f"was written; the last checkpoint is {ckpt.latest_checkpoint(run.run_dir) or 'none'}"
        ) from None
    run.saved_step, run.wrote = run.step, True
    run.health.reference_norm = run.norm  # the bound is relative to this healthy checkpoint
    return path


def sample_grid(run: Run, scfg: Config, name: str) -> Path:
    """A labelled grid of the fixed prompts from the EMA weights (every rank samples: a sharded
    model's forward is collective; rank 0 writes it)."""
    path = run.run_dir / "samples" / name
    if not run.grid_prompts:
        return path
    images = generate(run.st.ema.model, run.encoder, run.grid_prompts, scfg, run.ctx.device, seed=scfg.sample.seed)
    return save_grid(images, run.grid_prompts, path) if run.ctx.is_main else path


def finish(run: Run, stopped) -> dict:
    """The final checkpoint; unless stopped early, the final grid, evaluation and the summary line."""
    scfg = run.plan[run.stage_index][2]
    if run.source is None:  # the run was already complete: no stage trained this session
        run.stage_index = len(run.plan) - 1
        scfg = run.plan[-1][2]
        run.source = make_batch_source(scfg, run.ctx.rank, run.ctx.world_size)
        run.grid_prompts = grid_prompts(scfg, run.source)
    last = save(run)
    close_stage(run)
    elapsed = time.time() - run.t0
    if stopped is not None and stopped != "max_minutes" and run.step < run.cfg.train.steps:
        name = signal.Signals(stopped).name if isinstance(stopped, int) else stopped
        written = (
            f"checkpoint {last}"
            if last
            else f"the state had diverged, so no checkpoint was written; {where_next(run, fall=False)}"
        )
        run.say(
            f"stopped by {name} at step {run.step}/{run.cfg.train.steps}; {written}. Run the same command again to resume."
        )
        return {"step": run.step, "checkpoint": str(last) if last else None, "stopped": name, "signal": stopped}
    if last is None:
        raise TrainingStopped(
            f"training diverged at step {run.health.since} ({run.health.reason or 'another rank'}) and had not "
            f"recovered by "
            f"step {run.step}, so no checkpoint was written since; {where_next(run)}. Lower optimizer.lr "
            f"(now {run.cfg.optimizer.lr:g}) or raise schedule.warmup_steps, then run again"
        )
    final_grid = sample_grid(run, scfg, "final.png")
    write_denoise_grid(run.run_dir, run.st.ema.model, run.encoder, scfg, run.ctx.device, run.ctx.is_main)
    summary = {
        "step": run.step,
        "checkpoint": str(last),
        "samples": str(final_grid.parent),
        "session_seconds": elapsed,
        "steps_this_session": run.step - run.start_step,
    }
    result = final_evaluation(run, scfg)
    if result is not None:  # rank 0 only
        summary["eval"] = result["metrics"]
        if "score" in result:
            summary["score"] = result["score"]
    summary.update(_data_counts(run))
    if run.ctx.is_main:
        run_summary(run).write(run.run_dir / "run-summary.json")
    run.say(summary_line(run.cfg, run.step, summary, last, final_grid, elapsed))
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
