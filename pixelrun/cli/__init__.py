"""pixelrun train | sample | eval | export | bench | ablate | report | presets | data."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from pixelrun.config import ConfigError, RunFailed, TextConfig
from pixelrun.data import NoUsableData


def _parse_size(text: str) -> tuple[int, int]:
    """--size WxH (width first, as most image tools write it) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError("--size", f"must be WxH in pixels (for example 96x64: 96 wide, 64 high), "
                                    f"got {text!r}") from None
    if w < 1 or h < 1:
        raise ConfigError("--size", f"both sides must be at least 1 pixel (WxH, e.g. 96x64), got {text!r}")
    return h, w


def _parse_guidances(text: str) -> list[float]:
    """--guidance 4 or 1,2,4 (a sweep) -> the scales, in order."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guidance takes numbers separated by commas (1,2,4), got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--guidance is empty")
    return list(dict.fromkeys(values))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pixelrun")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_train(args) -> int:
    from pixelrun.config import load_config

    cfg = load_config(args.config, args.overrides)  # all validation happens here, before any work
    if args.rehearse:
        from pixelrun.run.rehearse import rehearse

        summary = rehearse(cfg)  # rank 0: the report; other ranks: {}
        if "resume" in summary and not summary["resume"]["same"]:
            return 1  # the rehearsal ran, and found that a resume does not continue the run exactly
    else:
        from pixelrun.run.train import train

        summary = train(cfg)  # checks the data paths first, before any work
    return 128 + summary["signal"] if isinstance(summary.get("signal"), int) else 0


def _sample_overrides(args) -> list[str]:
    """The sampling flags as config overrides, checked first so an error names the flag."""
    out = []
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError("--steps", f"must be >= 1; got {args.steps}")
        out.append(f"sample.steps={args.steps}")
    if args.guidance is not None:
        if not math.isfinite(args.guidance):
            raise ConfigError("--guidance", f"must be a finite number >= 1; got {args.guidance}")
        if args.guidance < 1:
            raise ConfigError("--guidance", f"must be >= 1 (1 = no guidance; larger follows the prompt more); "
                                            f"got {args.guidance:g}")
        out.append(f"sample.guidance={args.guidance}")
    if args.guidance_mode == "self":
        from pixelrun.training.inference import checkpoint_config

        if checkpoint_config(args.checkpoint)[0].routing.ratio == 0:
            raise ConfigError("--guidance-mode", "self-guidance contrasts a dense and a TREAD-routed pass, and this "
                                                 "checkpoint was trained without routing (routing.ratio=0): use "
                                                 "--guidance-mode cfg")
    if args.guidance_mode:
        out.append(f"sample.guidance_mode={args.guidance_mode}")
    return out


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("--prompts-file", f"cannot read {args.prompts_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("--prompts-file", f"{args.prompts_file} is not a UTF-8 text file (one prompt per "
                                                f"line)") from None
        if "\x00" in text:
            raise ConfigError("--prompts-file", f"{args.prompts_file} holds NUL bytes: not a text file of prompts")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("--prompt", "give at least one prompt (--prompt TEXT, repeatable, or --prompts-file FILE)")
    return prompts


def _sample_dir(out: Path) -> list[Path]:
    """`--out` holds this command's images only: a new or empty folder, or an earlier `pixelrun sample`
    output, whose files (listed in its prompts.json) are returned: the whole folder is replaced once
    the new images exist. Anything else in it, or the current folder, is refused, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ConfigError("--out", f"{out} is the current folder or one above it; write into a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    try:
        earlier = json.loads((out / "prompts.json").read_text())
        made = {*earlier["prompts"], "grid.png", "prompts.json"}
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError("--out", f"{out} is not empty and holds no earlier `pixelrun sample` output; choose a new "
                                   f"or empty folder") from None
    others = [p.name for p in out.iterdir() if p.name not in made]
    if others:
        raise ConfigError("--out", f"{out} holds files this command did not write ({', '.join(sorted(others)[:3])}); "
                                   f"choose a new or empty folder")
    return [out / name for name in made]


GRID_MAX = 64  # images on a sample grid.png; beyond this it grows too tall to open (each image has its own file)


def cmd_sample(args) -> int:
    from tqdm import tqdm

    from pixelrun.infra.checkpoint import atomic_dir
    from pixelrun.infra.grids import save_grid, save_png
    from pixelrun.training.inference import generate, load_for_inference

    prompts = _read_prompts(args)
    size = _parse_size(args.size) if args.size is not None else None
    out = Path(args.out)
    _sample_dir(out)
    model, encoder, cfg, path = load_for_inference(args.checkpoint, args.weights, args.device, _sample_overrides(args))
    encoder.warn = lambda message: None  # said once below, for this command's prompts
    h, w = size or (cfg.data.resolution, cfg.data.resolution)
    p = model.cfg.patch_size
    if h % p or w % p:
        raise ConfigError("--size", f"{w}x{h} (WxH) is not a multiple of the patch size {p}")
    seed = cfg.sample.seed if args.seed is None else args.seed
    with tqdm(total=cfg.sample.steps * ((len(prompts) + 31) // 32), desc="sample", unit="step", file=sys.stderr) as bar:
        images = generate(model, encoder, prompts, cfg, next(model.parameters()).device, seed=seed, height=h, width=w,
                          progress=bar)
    if encoder.truncated:
        print(f"note: {encoder.truncated} prompt(s) are longer than text.max_tokens={cfg.text.max_tokens} tokens and "
              f"were cut: the model saw only their start (first: {encoder.first_truncated[:80]!r})", file=sys.stderr)
    # Written beside `out` and swapped in whole: an interruption leaves the earlier output as it was.
    with atomic_dir(out) as tmp:
        names = [f"{i:03d}.png" for i in range(len(images))]
        for name, img in zip(names, images):
            save_png(img, tmp / name)
        (tmp / "prompts.json").write_text(json.dumps({"checkpoint": str(path), "seed": seed, "steps": cfg.sample.steps,
                                                      "guidance": cfg.sample.guidance,
                                                      "guidance_mode": cfg.sample.guidance_mode, "size": f"{w}x{h}",
                                                      "prompts": dict(zip(names, prompts))}, indent=2))
        if len(images) > 1:
            save_grid(images[:GRID_MAX], prompts[:GRID_MAX], tmp / "grid.png")
            names.append("grid.png")
    for name in names:
        print(out / name)
    if len(images) > GRID_MAX:
        print(f"note: grid.png shows the first {GRID_MAX} of {len(images)} images; every image has its own file",
              file=sys.stderr)
    return 0


def _eval_overrides(args) -> list[str]:
    """The eval flags as config overrides (values JSON-quoted: a valid YAML string whatever the path)."""
    flags = {"prompts": args.samples, "seed": args.prompt_seed, "fid_weights": args.fid_weights,
             "clip_model": args.clip_model, "dino_model": args.dino_model, "dino_resolution": args.dino_resolution,
             "cache_dir": args.cache_dir, "dino_mmd_sigma": args.dino_mmd_sigma, "dino_mmd_scale": args.dino_mmd_scale}
    return [f"eval.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]


def cmd_eval(args) -> int:
    from pixelrun.config import to_dict, with_overrides
    from pixelrun.evaluation.evaluate import (
        Evaluator,
        applicable_metrics,
        cli_default_metrics,
        describe_metrics,
        parse_metrics,
    )
    from pixelrun.infra.distributed import resolve_device
    from pixelrun.training.inference import checkpoint_config, load_for_inference

    if args.samples < 1:
        raise ConfigError("--samples", f"must be at least 1 (one generated and one real image per caption); "
                                       f"got {args.samples}")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError("--out", f"{out} is a folder; give the JSON file's path, e.g. {out / 'eval.json'}")
    sweep = args.guidance or [None]
    for g in sweep[1:]:
        args.guidance = g
        _sample_overrides(args)  # each scale checked like a single one, before any work
    args.guidance = sweep[0]
    overrides = _sample_overrides(args) + _eval_overrides(args)
    cfg, _, _ = checkpoint_config(args.checkpoint, overrides)
    if args.metrics:
        metrics, key = parse_metrics(args.metrics), "--metrics"
    else:
        metrics, key = cli_default_metrics(cfg), "eval.metrics"
        if not applicable_metrics(cfg):
            print(f"pixelrun eval: the checkpoint's eval.metrics {cfg.eval.metrics} do not apply to data.source="
                  f"{cfg.data.source}; computing {','.join(metrics)} (choose with --metrics)", file=sys.stderr)
    # the metric networks first: a missing or broken one fails before the model is even loaded
    evaluator = Evaluator(cfg, metrics, resolve_device(args.device, "--device"), progress=True, key=key)
    model, encoder, cfg, path = load_for_inference(args.checkpoint, args.weights, args.device, overrides)
    seed = cfg.sample.seed if args.seed is None else args.seed
    results = []
    for g in sweep:
        cfg_g = cfg if g is None or g == cfg.sample.guidance else with_overrides(to_dict(cfg), [f"sample.guidance={g}"])
        r = evaluator(model, encoder, cfg_g, sample_seed=seed)
        results.append({k: v for k, v in r.items() if k not in ("per_prompt", "prompts")})
        if len(sweep) > 1:
            print(f"guidance {cfg_g.sample.guidance:g}: {describe_metrics(r['metrics'])}", file=sys.stderr, flush=True)
    result = results[0]
    if len(sweep) > 1:
        result["guidance_sweep"] = [{"guidance": r["settings"]["guidance"], "metrics": r["metrics"]} for r in results]
    result["checkpoint"] = str(path)
    result["weights"] = args.weights
    text = json.dumps(result, indent=2)
    print(text, flush=True)  # first: a result that cannot be written is still shown
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)  # whole or not at all
        print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """--format safetensors: one consolidated safetensors file (EMA weights by default) and the config,
    from a checkpoint written on any number of ranks; `pixelrun sample --checkpoint OUT` accepts it.
    --format diffusers: a directory that diffusers' `PRXPixelPipeline.from_pretrained` loads
    (pixelrun/tools/export_diffusers.py); overrides may change the sampling settings it carries."""
    from pixelrun.config import to_yaml
    from pixelrun.infra import checkpoint as ckpt
    from pixelrun.training.build import model_from_config
    from pixelrun.training.inference import checkpoint_config, load_for_inference

    if args.overrides and args.format != "diffusers":
        raise ConfigError("overrides", "only --format diffusers takes overrides (sampling settings)")
    cfg, path, text_dim = checkpoint_config(args.checkpoint, args.overrides)  # no weights loaded yet
    try:
        ckpt.check_export_target(args.out, path)
    except ckpt.UnsafeOutput as e:
        raise ConfigError("--out", str(e)) from None
    marker = ckpt.export_marker(args.format, path, args.weights)
    if args.format == "diffusers":
        from pixelrun.tools.export_diffusers import check_config, export_diffusers

        check_config(cfg)  # refuse before loading anything
        model, encoder, cfg, path = load_for_inference(args.checkpoint, args.weights, "cpu", args.overrides)
        out = export_diffusers(model, encoder, cfg, args.out, marker)
        import importlib.util

        if importlib.util.find_spec("ftfy") is None:
            print("note: PRXPixelPipeline needs the package ftfy to encode prompts (pip install ftfy)", file=sys.stderr)
        print(f"exported {args.weights} weights of {path} as a diffusers PRXPixelPipeline to {out} "
              f"(sample with use_resolution_binning=False, height=width={cfg.data.resolution}, "
              f"num_inference_steps={cfg.sample.steps}, guidance_scale={cfg.sample.guidance}, "
              f"generator=torch.Generator().manual_seed(seed))")
        return 0
    if not ckpt.is_complete(path):
        raise ConfigError("--checkpoint", f"{path} is already an exported model")
    out = ckpt.export_weights(path, args.out, model_from_config(cfg, text_dim), to_yaml(cfg), text_dim, args.weights)
    print(f"exported {args.weights} weights of {path} (step {ckpt.load_meta(path)['step']}) to {out}")
    return 0


def cmd_data_convert(args) -> int:
    """Images (a folder, a JSONL manifest, Parquet / Arrow tables, a Hugging Face dataset) ->
    WebDataset shards resized to their buckets once."""
    import shlex

    from pixelrun.data.convert import convert, format_bytes, skip_text

    if args.shard_size < 1:
        raise ConfigError("--shard-size", f"must be >= 1; got {args.shard_size}")
    if args.workers < 0:
        raise ConfigError("--workers", f"must be >= 0; got {args.workers}")
    if args.patch < 1:
        raise ConfigError("--patch", f"must be >= 1; got {args.patch}")
    if args.resolution < 1:
        raise ConfigError("--resolution", f"must be positive; got {args.resolution}")
    if args.resolution % args.patch:
        hint = ("; the default tiny model has patch 8: pass --patch 8 (32 is the patch of the base and small presets)"
                if args.patch == 32 and args.resolution % 8 == 0 else "")
        raise ConfigError("--resolution", f"{args.resolution} is not a multiple of --patch {args.patch}{hint}")
    try:
        index = convert(args.src, args.out, args.resolution, patch=args.patch, shard_size=args.shard_size,
                        image_format=args.format, text_encoder=args.text_encoder, max_tokens=args.max_tokens,
                        workers=args.workers, captions=args.captions, image_column=args.image_column,
                        limit=args.limit, split=args.split, embedding_dtype=args.embedding_dtype)
    except FileExistsError as e:
        raise ConfigError("--out", str(e)) from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError("--src", str(e)) from None
    emb, size = index["text_embeddings"], index["bytes_per_sample"]
    print(f"wrote {index['count']} samples in {len(index['shards'])} shard(s), {len(index['buckets'])} bucket(s), to "
          f"{args.out}; {skip_text(index['skipped'], index['skipped_names'], index['read'])}; "
          f"{format_bytes(size['on_disk'])} per sample on disk"
          + (f" (text embeddings {format_bytes(size['text_embeddings'])}, {emb['dtype']}, {emb['fingerprint']})"
             if emb else ""))
    # Every argument quoted for bash: an unquoted brace pattern would expand into several arguments.
    train = ["pixelrun", "train", "data.source=shards", f"data.path={args.out}", f"data.resolution={args.resolution}"]
    if index.get("captions"):
        train.append(f"data.captions={index['captions']}")
    if emb:
        train += [f"text.encoder={args.text_encoder}", f"text.max_tokens={args.max_tokens}"]
    print("train with: " + " ".join(shlex.quote(a) for a in train))
    return 0


def cmd_data_inspect(args) -> int:
    from pixelrun.data.convert import format_report, inspect_shards

    report = inspect_shards(args.spec, args.contact_sheet, args.n, args.resolution, args.patch)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


ABLATE_ACTIONS = ("run", "plan", "status", "report", "commands")


def cmd_ablate(args) -> int:
    """run (the default): plan, train what is not done, then the report; plan: check the SPEC and
    print the steps each variant gets, writing nothing; status: where each run stands; report: the
    report from the run folders (a SPEC or the ablation's folder); commands: write and print one
    torchrun command per run, for a scheduler."""
    from pixelrun.experiments import ablate

    action, target = (args.args[0], args.args[1:]) if args.args[0] in ABLATE_ACTIONS else ("run", args.args)
    if len(target) != 1:
        raise ConfigError("SPEC", f"pixelrun ablate [{'|'.join(ABLATE_ACTIONS)}] SPEC.yaml: give one SPEC file"
                                  + (" (or, for report, the ablation's folder)" if action == "report" else ""))
    if action == "report":
        folder = Path(target[0])
        out = folder if (folder / "ablation.json").is_file() else Path(ablate.load_spec(folder).out)
        return _ablation_report(out)
    spec = ablate.load_spec(target[0])
    if args.parallel is not None:
        if args.parallel < 1:
            raise ConfigError("--parallel", f"must be >= 1; got {args.parallel}")
        spec.launch.parallel = args.parallel
    plan = ablate.plan_ablation(spec, say=lambda line: print(line, file=sys.stderr))
    for line in ablate.describe_plan(plan):
        print(line, file=sys.stderr)
    if action == "plan":
        return 0
    if action == "status":
        print("\n".join(ablate.status_lines(plan)))
        return 0
    ablate.write_plan(plan)
    if action == "commands":
        print((plan.out / "commands.sh").read_text(), end="")
        print(f"wrote {plan.out / 'commands.sh'}; build the report afterwards with: pixelrun ablate report "
              f"{plan.out}", file=sys.stderr)
        return 0
    result = ablate.execute(plan)
    if result["interrupted"]:
        print("interrupted: every run saved where it stood; run the same command to resume", file=sys.stderr)
        return 130
    code = _ablation_report(plan.out)
    if result["failed"]:
        print(f"pixelrun ablate: {len(result['failed'])} run(s) failed: "
              f"{', '.join(f'{v} seed {s}' for v, s in result['failed'])} (logs in {plan.out / 'logs'}); "
              f"the report covers the others", file=sys.stderr)
        return 1
    return code


def _ablation_report(out: Path) -> int:
    from pixelrun.experiments.report import write_ablation_report

    for path in write_ablation_report(out):
        print(path)
    return 0


def cmd_presets(args) -> int:
    """Parameter counts of the size presets (built on the meta device: no memory, no time), with the
    offline MiniLM's text width (what `pixelrun train` prints for the default run) and with a
    T5Gemma-2B's (the recipe's), or with `--text-dim` alone."""
    import torch

    from pixelrun.config import PRESETS
    from pixelrun.model.denoiser import build_model, count_parameters

    widths = [args.text_dim] if args.text_dim else [384, 2304]
    names = {384: "MiniLM", 2304: "T5Gemma-2B"}
    heads = [f"params, text {names.get(d, d)}" + (f" ({d})" if d in names else "") for d in widths]
    print(f"{'preset':<8}{'patch':>6}{'width':>7}{'depth':>6}{'heads':>6}{'bottleneck':>11}"
          + "".join(f"{h:>33}" for h in heads))
    for name, f in PRESETS.items():
        counts = []
        for d in widths:
            with torch.device("meta"):
                counts.append(count_parameters(build_model(name, d)))
        print(f"{name:<8}{f['patch_size']:>6}{f['hidden_size']:>7}{f['depth']:>6}{f['num_heads']:>6}"
              f"{str(f['bottleneck_size']):>11}" + "".join(f"{n:>33,}" for n in counts))
    print("(the text encoder's width only changes the text projection)")
    return 0


# What `pixelrun bench` prints for each variant; its --help lists the same keys from here. --out
# keeps these and more (every step's time, FLOPs by part, the resolved config).
BENCH_SUMMARY: dict[str, str] = {
    "step_seconds_median": "median training step (training's own: FSDP2, optimizer, schedule, EMA)",
    "forward_backward_seconds_median": "its draws, model, loss terms and backward",
    "optimizer_seconds_median": "its gradient clipping, optimizer step, schedule and EMA",
    "step_time_vs_dense": "step time / the dense variant's (when dense runs)",
    "images_per_s": "",
    "image_tokens_per_s": "",
    "warmup_seconds": "the untimed steps, compilation included",
    "model_flops_per_image": "analytic forward + backward of the denoiser (pixelrun/model/flops.py; routed when "
                             "routing, no teachers)",
    "achieved_model_flops_per_s": "",
    "mfu": "against the dense bf16 peak of H100 / H200 / A100; null elsewhere",
    "measured_step_flops_per_image": "torch's FlopCounterMode on a one-image step",
    "teacher_flops_per_image": "the measured count minus the model's (teachers, REPA projector); null without",
    "peak_memory_gib": "CUDA; null on the CPU",
    "optimizer": "adamw, or muon with its Newton-Schulz precision",
    "precision": "autocast: bf16 or fp32",
    "compiled": "",
    "activation_checkpointing": "",
}


def _bench_help() -> str:
    width = max(map(len, BENCH_SUMMARY))
    return "\n".join(f"  {k:<{width}}  {v}".rstrip() for k, v in BENCH_SUMMARY.items())


def cmd_bench(args) -> int:
    if args.gpus is not None:
        from pixelrun.tools.forecast import format_projection, project

        for flag, value in (("--variants", args.variants), ("--text-dim", args.text_dim),
                            ("--text-tokens", args.text_tokens)):
            if value is not None:
                raise ConfigError(flag, "does not apply with --gpus: the projection times every stage with the "
                                        "configured text encoder, teachers and losses")
        report = project(args.config, args.overrides, gpus=args.gpus, micro_batch=args.micro_batch,
                         loader_cores=args.loader_cores, steps=args.steps, warmup=args.warmup, out=args.out)
        print(format_projection(report))
        return 0
    if args.micro_batch is not None:
        raise ConfigError("--micro-batch", "applies with --gpus only (otherwise set train.batch_size)")
    from pixelrun.tools.bench import run_bench

    report = run_bench(args.config, args.overrides, variants=(args.variants or "dense,routed").split(","),
                       steps=args.steps, warmup=args.warmup, text_dim=args.text_dim or 384,
                       text_tokens=args.text_tokens or 32, out=args.out)
    summary = {name: {k: r.get(k) for k in BENCH_SUMMARY if k in r or k != "step_time_vs_dense"}
               for name, r in report["results"].items()}
    print(json.dumps({"device": report["device"], "results": summary}, indent=2))
    return 0


def cmd_report(args) -> int:
    from pixelrun.experiments.report import write_run_report

    for path in write_run_report(args.run, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pixelrun", description="Pixel-space text-to-image diffusion training.")
    ap.add_argument("--version", action="version", version=f"pixelrun {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a model; no arguments = the built-in CPU demo")
    t.add_argument("--config", help="YAML config file (default: the built-in demo, configs/demo.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    t.add_argument("--rehearse", action="store_true",
                   help="run this config with every switch as written but at rehearsal size (small width, a few "
                        "tokens per side, a few steps per stage, grids, evaluations and checkpoints between), "
                        "resume it once and compare, then print a report; in RUN_DIR-rehearsal")
    t.set_defaults(func=cmd_train)

    def add_model_args(p, guidance_sweep: bool = False):
        p.add_argument("--checkpoint", required=True,
                       help="a run directory (its newest checkpoint), a checkpoints/step_* directory or a "
                            "`pixelrun export` (safetensors) directory")
        p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's sample.steps)")
        if guidance_sweep:
            p.add_argument("--guidance", type=_parse_guidances,
                           help="guidance scale, >= 1: 1 = no guidance, larger follows the prompt more (default: the "
                                "checkpoint's sample.guidance); several, comma-separated (1,2,4), evaluate each: one "
                                "row per value, the JSON under guidance_sweep")
        else:
            p.add_argument("--guidance", type=float,
                           help="guidance scale, >= 1: 1 = no guidance, larger follows the prompt more (default: the "
                                "checkpoint's sample.guidance)")
        p.add_argument("--guidance-mode", choices=["cfg", "self", "none"],
                       help="cfg: against the empty prompt; self: dense vs TREAD-routed pass (models trained with "
                            "routing); none: the conditional prediction alone; default: the checkpoint's")
        p.add_argument("--seed", type=int, help="noise seed (default: the checkpoint's sample.seed)")
        p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                       help="ema: the averaged weights (default; what grids and evaluations use); raw: the trained ones")
        p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")

    s = sub.add_parser("sample", help="generate images for prompts",
                       description="Writes OUT/000.png, 001.png, ... (one per prompt, in order), OUT/grid.png with "
                                   "the prompts as labels when there are several, and OUT/prompts.json (checkpoint, "
                                   "seed, steps, guidance, size, prompt of each file).")
    add_model_args(s)
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts-file", help="a text file with one prompt per line (added after any --prompt)")
    s.add_argument("--out", required=True, help="output folder: new, empty, or an earlier `pixelrun sample` output "
                                                "(its files are replaced)")
    s.add_argument("--size", help="WxH in pixels, width first, e.g. 96x64 (default: the "
                                                    "resolution the checkpoint was last trained at)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="metrics of a checkpoint's images for held-out captions (JSON)",
                       description="Generate one image per held-out caption of the checkpoint's dataset and "
                                   "compare them with the real images of the same captions.")
    add_model_args(e, guidance_sweep=True)
    e.add_argument("--metrics", help="comma list of: shapes (shapes data), fd-effnet (EfficientNet-Lite0 Fréchet "
                                     "distance, offline), fid (needs --fid-weights), cmmd (CLIP, --clip-model), "
                                     "dino-mmd (DINOv2, --dino-model); default: the checkpoint's eval.metrics "
                                     "that apply to its data, else fd-effnet")
    e.add_argument("--samples", "--prompts", dest="samples", type=int, default=64,
                   help="captions, generated images and real images (default 64)")
    e.add_argument("--prompt-seed", type=int, help="shapes data: seed of the eval-split captions (default: eval.seed)")
    e.add_argument("--fid-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (eval.fid_weights)")
    e.add_argument("--clip-model", help="CMMD's CLIP: local path or hub id (eval.clip_model)")
    e.add_argument("--dino-model", help="DINO-MMD's DINOv2: local path or hub id (eval.dino_model; default PRX's "
                                        "facebook/dinov2-with-registers-large)")
    e.add_argument("--dino-resolution", type=int, help="side DINO-MMD's input is resized to (eval.dino_resolution; "
                                                       "default 518, PRX's; 224 for facebook/dinov2-base)")
    e.add_argument("--dino-mmd-sigma", type=float, help="DINO-MMD's RBF bandwidth (eval.dino_mmd_sigma)")
    e.add_argument("--dino-mmd-scale", type=float, help="DINO-MMD's scale factor (eval.dino_mmd_scale)")
    e.add_argument("--cache-dir", help="where real-image statistics are cached (eval.cache_dir)")
    e.add_argument("--out", help="also write the JSON to this file (its folder is created)")
    e.set_defaults(func=cmd_eval)
    b = sub.add_parser(
        "bench", help="time training steps: dense / routed, with / without teachers; FLOPs and MFU (JSON); "
                      "--gpus N: project a whole run's hours onto N GPUs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time training steps of the configured model on random data, per variant, after a warm-up. "
                    "With --gpus N, time every stage of the config instead (teachers and text encoder included) "
                    "and project the run's hours onto N GPUs.",
        epilog=f"""speed options are config overrides:
  parallel.compile=true                  torch.compile each block (the warm-up steps pay the compile;
                                         use --warmup 2 or more)
  parallel.activation_checkpointing=true recompute block activations in the backward
  train.precision=bf16|fp32              (auto: bf16 on CUDA, fp32 on the CPU)
  train.optimizer=muon train.muon_precision=bf16|fp32

printed per variant (--out keeps these and more: every step's time, FLOPs by part, the config):
{_bench_help()}

--gpus N prints per stage: the measured micro-step (forward + backward with every loss term and
teacher, the text encoder on the stage's captions), the optimizer on one device and per rank, the
step on N GPUs, images/s, the loader rate needed per GPU and per core, projected hours and
GPU-hours; then the total beside the seed's 24 h on 32 H200s. Hub networks that are not on this
machine are timed with random weights of their architecture. Assumes weak scaling (communication
not measured).

examples:
  pixelrun bench model.preset=base data.resolution=512 train.batch_size=2 --steps 3 --warmup 1
  pixelrun bench --config configs/speedrun/speedrun.yaml --gpus 32""")
    b.add_argument("--config", help="YAML config (default: the built-in demo)")
    b.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.preset=base data.resolution=512")
    b.add_argument("--variants",
                   help="comma list of: dense, routed (routing.ratio=0.5), teachers (REPA + LPIPS + P-DINO), "
                        "routed+teachers (default: dense,routed)")
    b.add_argument("--steps", type=int, default=5, help="timed steps per variant or stage (the median is reported; "
                                                        "default 5)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    b.add_argument("--text-dim", type=int, help="width of the random text embeddings (default 384, MiniLM)")
    b.add_argument("--text-tokens", type=int, help="text tokens per image (default 32)")
    b.add_argument("--gpus", type=int, help="project the configured run (every stage) onto this many GPUs")
    b.add_argument("--micro-batch", type=int, help="with --gpus: measure at this micro-batch instead of each stage's "
                                                   "(accumulation steps make up the global batch)")
    b.add_argument("--loader-cores", type=int, default=8,
                   help="with --gpus: CPU cores decoding images per GPU, for the per-core loader rate (default 8, "
                        "the reference's 8 loader processes per rank)")
    b.add_argument("--out", help="write the full report (with the resolved config) here")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", help="write a checkpoint's weights as one safetensors file with its config, "
                                      "or as a diffusers PRXPixelPipeline directory")
    x.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory "
                                                       "(--format diffusers also takes an exported model)")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--weights", choices=["ema", "raw"], default="ema")
    x.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors",
                   help="safetensors: pixelrun's own layout (model.safetensors, config.yaml); diffusers: a "
                        "PRXPixelPipeline directory (transformer, text encoder, tokenizer, scheduler)")
    x.add_argument("overrides", nargs="*", help="--format diffusers only: sampling overrides, e.g. "
                                                "sample.spacing=diffusers sample.shift=3")
    x.set_defaults(func=cmd_export)

    ab = sub.add_parser("ablate", help="train named variants of a config at an equal budget with paired seeds, and "
                                       "report each against the baseline with intervals",
                        description="pixelrun ablate [run|plan|status|report|commands] SPEC.yaml. run (default): "
                                    "train every (variant, seed) not done yet, then write the report; rerun it after "
                                    "a crash or Ctrl-C to resume. plan: check the SPEC and print each variant's steps. "
                                    "status: where each run stands. report: rebuild the report from the run folders "
                                    "(SPEC or the ablation's folder). commands: one torchrun command per run, for a "
                                    "scheduler (written to OUT/commands.sh). SPEC keys: docs/ablations.md.")
    ab.add_argument("args", nargs="+", metavar="[ACTION] SPEC", help=f"an action ({', '.join(ABLATE_ACTIONS)}; "
                                                                     f"default run) and the SPEC file")
    ab.add_argument("--parallel", type=int, help="runs at a time on this machine (default: the SPEC's launch.parallel)")
    ab.set_defaults(func=cmd_ablate)

    pr = sub.add_parser("presets", help="the model size presets and their parameter counts")
    pr.add_argument("--text-dim", type=int, help="count with this text encoder width only (default: both MiniLM's "
                                                 "384 and T5Gemma-2B's 2304)")
    pr.set_defaults(func=cmd_presets)

    rp = sub.add_parser("report", help="a run's curves and sample grids as PNGs and one self-contained HTML page",
                        description="Plots every loss term, the validation loss by noise level, the evaluation "
                                    "metrics, the learning rate, gradient norm and images/s of RUN's metrics.jsonl, "
                                    "and writes them with RUN's sample grids into report.html (images embedded: it "
                                    "opens without a server). Runs while training too.")
    rp.add_argument("run", help="a run folder (the one `pixelrun train` writes, with metrics.jsonl)")
    rp.add_argument("--out", help="output folder (default RUN/report)")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("data", help="write WebDataset shards for data.source=shards, or inspect shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser(
        "convert", help="resize images once to their aspect buckets and write .tar shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write WebDataset shards for data.source=shards, every image resized once to its aspect bucket.",
        epilog="""examples:
  pixelrun data convert --src photos/ --out shards512 --resolution 512
  pixelrun data convert --src FLUX-Reason-6M/ --out shards512 --resolution 512 \\
      --captions caption_detail:0.7,caption_original:0.3 --workers 8
  pixelrun data convert --src 'data/train-*.parquet::more/x.parquet' --out d --resolution 48 --patch 8 --limit 1000

Rows or files whose image is missing, unreadable, truncated or enormous, and rows without any caption, are
skipped; the final line counts them by reason and names the first (file and row), index.json keeps the
first 100 of each. The last line is the training command for the shards, quoted for bash.""")
    dc.add_argument("--src", required=True,
                    help="an image folder (captions as for data.source=folder); a JSONL manifest (image path under "
                         "file/image/file_name, relative to the manifest; every other string field is a caption "
                         "field); Parquet: a file, a folder (every .parquet under it) or a glob; a datasets "
                         "save_to_disk folder or .arrow file; or a Hugging Face dataset id (needs the datasets "
                         "package, pip install 'pixelrun[hub]'; it downloads into datasets' cache first). "
                         "Several Parquet / Arrow sources join with '::'")
    dc.add_argument("--out", required=True, help="output folder (shards 00000.tar, ... and index.json)")
    dc.add_argument("--resolution", type=int, required=True, help="bucket resolution, e.g. 512 or 1024; train "
                                                                  "with the same data.resolution")
    dc.add_argument("--patch", type=int, default=32,
                    help="patch size of the model that will train on the shards; buckets are multiples of it "
                         "(default 32: the base and small presets; the default tiny model has patch 8, so "
                         "--resolution 48 needs --patch 8)")
    dc.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    dc.add_argument("--format", choices=["jpg", "png"], default="jpg",
                    help="jpg (quality 95, 4:4:4; default: small, fast to decode) or png (lossless)")
    dc.add_argument("--image-column", help="tables: the image column (default: the first column datasets declared "
                                           "as an Image, else the first binary or {bytes, path} column)")
    dc.add_argument("--captions", help="tables: caption columns with weights, as data.captions: "
                                       "prompt:0.7,caption_long:0.3 (default: the first of caption, prompt, text). "
                                       "Every chosen column is stored in the sample's .json (train picks among them "
                                       "with data.captions=json.NAME:W,...); txt is the first the row has")
    dc.add_argument("--split", default="train", help="the split of a Hub dataset or a saved DatasetDict "
                                                     "(default train)")
    dc.add_argument("--limit", type=int, help="convert only the first N images / rows")
    dc.add_argument("--text-encoder", help="also store each caption's embedding for this encoder "
                                           "(minilm, a local path or a Hugging Face id)")
    dc.add_argument("--max-tokens", type=int, default=TextConfig.max_tokens,
                    help=f"token limit of the stored embeddings; must equal text.max_tokens when training "
                         f"(default {TextConfig.max_tokens})")
    dc.add_argument("--embedding-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="dtype of the stored embeddings (default bfloat16, as the reference stores T5Gemma "
                         "latents: float16 overflows on T5-family activations; a non-finite value is an error)")
    dc.add_argument("--workers", type=int, default=0,
                    help="processes that decode, resize and encode images (default 0: in this process; the "
                         "shards are byte for byte the same)")
    dc.set_defaults(func=cmd_data_convert)
    di = dsub.add_parser("inspect", help="counts per bucket, caption lengths, broken samples, stored embeddings")
    di.add_argument("spec", help="shards: a folder of .tar files, a brace pattern, URLs or pipe: commands")
    di.add_argument("--contact-sheet", help="also write a PNG of the first --n samples with their captions")
    di.add_argument("--n", type=int, default=64, help="samples on the contact sheet (default 64)")
    di.add_argument("--resolution", type=int, help="count samples per aspect bucket of this resolution "
                                                   "(default: per stored size, the buckets of converted shards)")
    di.add_argument("--patch", type=int, default=32, help="patch size of those buckets (default 32)")
    di.add_argument("--json", action="store_true", help="print the report as JSON")
    di.set_defaults(func=cmd_data_inspect)
    return ap


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with `key=value` overrides accepted anywhere on the line, before or after flags:
    argparse fills the `overrides` positional from the first run of positionals only, so the later
    ones come back unrecognised and join it here. Anything else unrecognised is argparse's error."""
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if _OVERRIDE.match(a)]
    unknown = [a for a in rest if not _OVERRIDE.match(a)]
    if extra and not hasattr(args, "overrides"):
        unknown = rest  # this subcommand takes no overrides
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"pixelrun: config error: {e}", file=sys.stderr)
        return 2
    except NoUsableData as e:
        print(f"pixelrun: config error: data.path: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"pixelrun: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"pixelrun: {e}", file=sys.stderr)
        return 1


def _quiet_libraries() -> None:
    """transformers draws a "Loading weights" bar for every network it loads (text encoder, teachers,
    metric networks): noise around pixelrun's own progress bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
