"""pixelrun eval: metrics of a checkpoint's images for held-out captions, as JSON.

What is evaluated, and how, is the checkpoint's own eval.* and sample.* keys, changed by overrides on
the command line (`eval.prompts=256 'eval.metrics=[shapes,fd-effnet]' sample.steps=10`), checked as
`pixelrun train` checks its overrides: the same settings as the evaluations during training
(pixelrun/run/train.py). The flags are what is not a config key: the checkpoint, the device and the
file the JSON is also written to."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixelrun.cli import common
from pixelrun.config import METRICS, ConfigError

SECTIONS = ("eval", "sample")  # the config keys this command changes; the checkpoint fixes the rest
# The flags that used to set these keys: refused, naming the override to write instead. `--guidance
# 1,2,4` (a sweep) becomes sample.guidance=1 'eval.guidance=[2,4]', the sweep key training uses too.
MOVED = {
    "--samples": "eval.prompts",
    "--prompts": "eval.prompts",
    "--metrics": "eval.metrics",
    "--prompt-seed": "eval.seed",
    "--fid-weights": "eval.fid_weights",
    "--clip-model": "eval.clip_model",
    "--dino-model": "eval.dino_model",
    "--dino-resolution": "eval.dino_resolution",
    "--dino-mmd-sigma": "eval.dino_mmd_sigma",
    "--dino-mmd-scale": "eval.dino_mmd_scale",
    "--cache-dir": "eval.cache_dir",
    "--weights": "eval.weights",
    "--steps": "sample.steps",
    "--guidance": "sample.guidance",
    "--guidance-mode": "sample.guidance_mode",
    "--seed": "sample.seed",
}

EPILOG = f"""settings are overrides of the checkpoint's config (KEY=VALUE, before or after the flags; quote a
list for the shell; default: the checkpoint's own value):
  eval.prompts=N                    held-out captions, generated and real images (default: the
                                    checkpoint's; 64 when it is 0, a run that evaluated nothing)
  'eval.metrics=[shapes,fd-effnet]' any of {", ".join(METRICS)}
                                    (default: the checkpoint's that apply to its data, else fd-effnet)
  eval.seed=N                       shapes data: the seed of the held-out captions
  eval.fid_weights=PATH             fid: pytorch-fid's pt_inception-2015-12-05-6726825d.pth
  eval.clip_model=PATH|ID           cmmd: the CLIP model
  eval.dino_model=PATH|ID           dino-mmd: the DINOv2 model; also eval.dino_resolution=N,
                                    eval.dino_mmd_sigma=S, eval.dino_mmd_scale=S
  eval.cache_dir=DIR                where the real side of each metric is cached
  eval.weights=ema|raw              the weights evaluated (--ema-decay D: which EMA of ema.decays)
  sample.sampler=euler|heun  sample.guidance_interval=[LO,HI]
                                    the sampler; the JSON's nfe: model evaluations per image
  sample.steps=N  sample.guidance=W  sample.guidance_mode=cfg|self|none|pathdrop  sample.seed=N
                                    how the images are generated, as in `pixelrun sample`
  'eval.guidance=[1,2,4]'           also evaluate at each of these guidance scales, same prompts and
                                    noise: one printed row per scale, the JSON's guidance_sweep; the
                                    top-level metrics are sample.guidance's
(shapes data: the JSON's denoise is the shapes score of the model's predictions from the held-out
images noised to t = 0.05, 0.2 and 0.5, where a blob's kind is lost; docs/evaluation.md)
(every eval.* and sample.* key: docs/configuration.md)

{common.moved_help(MOVED)}

examples:
  pixelrun eval --checkpoint runs/demo
  pixelrun eval --checkpoint runs/demo eval.prompts=256 'eval.metrics=[shapes,fd-effnet]'
  pixelrun eval --checkpoint RUN 'eval.metrics=[fid,cmmd,dino-mmd]' eval.prompts=10000 \\
      eval.fid_weights=pt_inception-2015-12-05-6726825d.pth --out results/eval.json
  pixelrun eval --checkpoint RUN sample.guidance=1 'eval.guidance=[2,4]'"""


def add_parser(subparsers) -> None:
    e = subparsers.add_parser(
        "eval",
        help="metrics of a checkpoint's images for held-out captions (JSON)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate one image per held-out caption of the checkpoint's dataset and compare\n"
        "them with the real images of the same captions.",
        epilog=EPILOG,
    )
    common.add_checkpoint_args(e, weights=False)  # the weights are eval.weights
    e.add_argument("--out", help="also write the JSON to this file (its folder is created)")
    common.add_overrides(e, SECTIONS, "eval.prompts=256 sample.steps=10")
    common.add_moved_flags(e, MOVED)
    e.set_defaults(func=run)


def run(args) -> int:
    from pixelrun.config import EvalConfig, to_dict, with_overrides
    from pixelrun.evaluation.evaluate import (
        Evaluator,
        applicable_metrics,
        cli_default_metrics,
        describe_metrics,
        guidance_sweep,
    )
    from pixelrun.infra.distributed import resolve_device
    from pixelrun.infra.files import write_atomic
    from pixelrun.infra.inference import load_for_inference

    common.refuse_moved_flags(args, "eval")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError("--out", f"{out} is a folder; give the JSON file's path, e.g. {out / 'eval.json'}")
    cfg, overrides = common.checkpoint_config(args, "eval", SECTIONS)
    given = common.override_keys(overrides)
    if cfg.eval.prompts < 1:
        if "eval.prompts" in given:
            raise ConfigError(
                "eval.prompts",
                f"must be at least 1 for pixelrun eval (one generated and one real "
                f"image per caption); got {cfg.eval.prompts}",
            )
        # The run evaluated nothing (eval.prompts=0 turns training's evaluations off): the key's default.
        overrides.append(f"eval.prompts={EvalConfig.prompts}")
        cfg = with_overrides(to_dict(cfg), overrides[-1:])
        print(
            f"pixelrun eval: the checkpoint's eval.prompts is 0; evaluating {cfg.eval.prompts} captions "
            f"(set eval.prompts=N)",
            file=sys.stderr,
        )
    if "eval.metrics" in given:
        metrics = list(cfg.eval.metrics)
        if not metrics:
            raise ConfigError("eval.metrics", f"is empty; choose from {', '.join(METRICS)}")
    else:
        metrics = cli_default_metrics(cfg)
        if not applicable_metrics(cfg):
            print(
                f"pixelrun eval: the checkpoint's eval.metrics {cfg.eval.metrics} do not apply to data.source="
                f"{cfg.data.source}; computing {','.join(metrics)} (choose with 'eval.metrics=[...]')",
                file=sys.stderr,
            )
    # the metric networks first: a missing or broken one fails before the model is even loaded
    device = resolve_device(args.device, "--device")
    evaluator = Evaluator(cfg, metrics, device, progress=True)
    model, encoder, cfg, path = load_for_inference(
        args.checkpoint, cfg.eval.weights, args.device, overrides, args.ema_decay
    )
    # the guidance sweep as training's evaluations run it; each scale printed as it comes
    sweep = len(dict.fromkeys([cfg.sample.guidance, *cfg.eval.guidance])) > 1

    def each(cfg_g, r):
        if sweep:
            line = f"guidance {cfg_g.sample.guidance:g}: {describe_metrics(r['metrics'])} (NFE {r['settings']['nfe']})"
            print(line, file=sys.stderr, flush=True)

    results = [
        {k: v for k, v in r.items() if k not in ("per_prompt", "prompts")}
        for r in guidance_sweep(evaluator, model, encoder, cfg, each=each)
    ]
    result = results[0]
    if sweep:
        result["guidance_sweep"] = _sweep_rows(results)
    if "shapes" in evaluator.metrics:
        result["denoise"] = _denoise(model, encoder, cfg, device, result)
    result["checkpoint"] = str(path)
    result["weights"] = cfg.eval.weights
    result["ema_decay"] = args.ema_decay if args.ema_decay is not None else _first_decay(cfg)
    result["nfe"] = result["settings"]["nfe"]  # model evaluations per image, beside the score
    text = json.dumps(result, indent=2)
    print(text, flush=True)  # first: a result that cannot be written is still shown
    if out is not None:
        write_atomic(out, text + "\n")  # whole or not at all
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _sweep_rows(results: list[dict]) -> list[dict]:
    """The JSON's guidance_sweep: each scale's guidance, model evaluations per image and metrics."""
    return [
        {"guidance": r["settings"]["guidance"], "nfe": r["settings"]["nfe"], "metrics": r["metrics"]} for r in results
    ]


def _denoise(model, encoder, cfg, device, result: dict) -> dict:
    """Where a blob comes from (pixelrun/evaluation/denoise_score.py): the shapes score of the
    predictions from the held-out images noised to a few levels, said beside the sampled score."""
    from pixelrun.evaluation.denoise_score import denoise_scores, describe_denoise

    scores = denoise_scores(model, encoder, cfg, device, n=cfg.eval.prompts, seed=cfg.sample.seed)
    assert scores is not None  # computed here: the single process scores
    print(f"denoise: {describe_denoise(scores, result.get('score'))}", file=sys.stderr, flush=True)
    return scores


def _first_decay(cfg) -> float | None:
    """The EMA evaluated without --ema-decay: the run's first (None for the raw weights)."""
    from pixelrun.config import ema_decays

    return ema_decays(cfg)[0] if cfg.eval.weights == "ema" else None
