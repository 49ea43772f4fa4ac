"""A training run's evaluations: at eval.every steps and eval.at_steps (`evaluate_now`: metrics.jsonl's
row and points/step_*.json), and at the end (`final_evaluation`: eval.json, with the shapes score of
the predictions from noised held-out images that says where a blob's kind is lost)."""

from __future__ import annotations

import json
from pathlib import Path

from pixelrun.config import Config
from pixelrun.evaluation.denoise_score import denoise_scores, describe_denoise
from pixelrun.evaluation.evaluate import describe_metrics, ema_guidance_sweep, flat_metrics
from pixelrun.infra.files import write_atomic
from pixelrun.run.outputs import POINT_IMAGES, evaluation_point, images_seen
from pixelrun.run.outputs import write_point as write_point_files
from pixelrun.run.parts import Run


def evaluated_models(run: Run, scfg: Config) -> list[tuple]:
    """(EMA decay or None, model) for each set of weights eval.weights scores: every EMA of
    ema.decays, the run's first first (metrics.jsonl and eval.json keep its numbers), or the raw."""
    return run.st.ema.by_decay() if scfg.eval.weights == "ema" else [(None, run.st.model)]


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
    models = evaluated_models(run, scfg)
    if run.evaluator is not None:
        results = ema_guidance_sweep(run.evaluator, models, run.encoder, scfg, keep_images=POINT_IMAGES)
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
            f"{scfg.eval.prompts} prompts, {result['settings']['nfe']} model evaluations per image)"
        )
        for r in results[1:]:
            ema = f"EMA {r['ema_decay']:g} " if len(models) > 1 else ""
            nfe = r["settings"]["nfe"]
            run.say(f"  {ema}at guidance {r['settings']['guidance']:g}: {describe_metrics(r['metrics'])} (NFE {nfe})")
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


def final_evaluation(run: Run, scfg: Config) -> dict | None:
    """The end's evaluation: `evaluate_now`, then on shapes data the shapes score of the evaluated
    weights' predictions from the held-out images noised to a few levels (pixelrun/evaluation/
    denoise_score.py), said in one line; eval.json gets both, without each prompt's values and the
    images. Every rank samples and predicts; rank 0 scores, writes and returns it (None elsewhere)."""
    result = evaluate_now(run, scfg)
    denoise = None
    if run.evaluator is not None and "shapes" in run.evaluator.metrics:
        model = evaluated_models(run, scfg)[0][1]  # the weights eval.json's score is of
        n, seed = scfg.eval.prompts, scfg.sample.seed
        denoise = denoise_scores(model, run.encoder, scfg, run.ctx.device, n=n, seed=seed, compute=run.ctx.is_main)
    if result is None:
        return None
    result = {k: v for k, v in result.items() if k not in ("per_prompt", "prompts", "images")}
    if denoise is not None:
        result["denoise"] = denoise
        run.say(f"denoise: {describe_denoise(denoise, result.get('score'))} (eval.json in the run)")
    write_atomic(run.run_dir / "eval.json", json.dumps(result, indent=2))  # a reader never sees half of it
    return result
