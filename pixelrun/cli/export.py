"""pixelrun export: a checkpoint's weights as one safetensors file with its config, or as a
diffusers PRXPixelPipeline directory."""

from __future__ import annotations

import sys

from pixelrun.config import ConfigError


def add_parser(subparsers) -> None:
    x = subparsers.add_parser(
        "export",
        help="write a checkpoint's weights as one safetensors file with its config, "
        "or as a diffusers PRXPixelPipeline directory",
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (its newest checkpoint that passes its checksums, a damaged newer one skipped "
        "with a line) or checkpoint directory (--format diffusers also takes an exported model)",
    )
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--weights", choices=["ema", "raw"], default="ema")
    x.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="which EMA, by its decay, of a run that keeps several (ema.decays; default: the first)",
    )
    x.add_argument(
        "--format",
        choices=["safetensors", "diffusers", "lora"],
        default="safetensors",
        help="safetensors: pixelrun's own layout (model.safetensors, config.yaml); diffusers: a "
        "PRXPixelPipeline directory (transformer, text encoder, tokenizer, scheduler); a LoRA run's "
        "adapters are merged into both. lora: a LoRA run's adapters alone, as diffusers' LoRA files "
        "hold them (pytorch_lora_weights.safetensors)",
    )
    x.add_argument(
        "overrides",
        nargs="*",
        help="--format diffusers only: sampling overrides, e.g. sample.spacing=diffusers sample.shift=3",
    )
    x.set_defaults(func=run)


def run(args) -> int:
    """--format safetensors: one consolidated safetensors file (EMA weights by default) and the config,
    from a checkpoint written on any number of ranks; `pixelrun sample --checkpoint OUT` accepts it.
    --format diffusers: a directory that diffusers' `PRXPixelPipeline.from_pretrained` loads
    (pixelrun/tools/export_diffusers.py); overrides may change the sampling settings it carries."""
    from pixelrun.config import to_yaml
    from pixelrun.infra import checkpoint as ckpt
    from pixelrun.infra.inference import checkpoint_config, load_for_inference, load_model, open_checkpoint

    if args.overrides and args.format != "diffusers":
        raise ConfigError("overrides", "only --format diffusers takes overrides (sampling settings)")
    # verified once, before any work: a damaged newest checkpoint of a run is skipped with a line, a
    # damaged checkpoint asked for by name refused in one
    choice = open_checkpoint(args.checkpoint)
    cfg, path, _ = checkpoint_config(choice, args.overrides)  # no weights loaded yet
    _check_target(args.out, path)
    if args.format == "diffusers":
        from pixelrun.tools.export_diffusers import check_config, export_diffusers

        check_config(cfg)  # refuse before loading anything
        model, encoder, cfg, path = load_for_inference(choice, args.weights, "cpu", args.overrides, args.ema_decay)
        _check_target(args.out, path)  # an earlier checkpoint when the newest one's weights failed
        out = export_diffusers(model, encoder, cfg, args.out, ckpt.export_marker(args.format, path, args.weights))
        import importlib.util

        if importlib.util.find_spec("ftfy") is None:
            print("note: PRXPixelPipeline needs the package ftfy to encode prompts (pip install ftfy)", file=sys.stderr)
        print(
            f"exported {args.weights} weights of {path} as a diffusers PRXPixelPipeline to {out} "
            f"(sample with use_resolution_binning=False, height=width={cfg.data.resolution}, "
            f"num_inference_steps={cfg.sample.steps}, guidance_scale={cfg.sample.guidance}, "
            f"generator=torch.Generator().manual_seed(seed))"
        )
        return 0
    if not ckpt.is_complete(path):
        raise ConfigError("--checkpoint", f"{path} is already an exported model")
    if args.format == "lora":
        return _export_lora(args, choice, cfg, path)
    model, cfg, path = load_model(choice, args.weights, decay=args.ema_decay)
    _check_target(args.out, path)
    out = ckpt.export_weights(path, args.out, model, to_yaml(cfg), model.cfg.text_dim, args.weights)
    which = f"EMA {args.ema_decay:g}" if args.ema_decay is not None else args.weights
    print(f"exported {which} weights of {path} (step {ckpt.load_meta(path).step}) to {out}")
    return 0


def _export_lora(args, choice, cfg, path) -> int:
    """--format lora: the adapters of a LoRA run's checkpoint, unmerged (pixelrun/tools/export_diffusers.py)."""
    from pixelrun.infra import checkpoint as ckpt
    from pixelrun.infra.inference import load_model
    from pixelrun.model.lora import LORA_FILE, lora_on
    from pixelrun.tools.export_diffusers import export_lora

    if not lora_on(cfg):
        raise ConfigError(
            "--format", f"lora writes a LoRA run's adapters; {path} trained every weight (train.lora.rank null)"
        )
    model, cfg, path = load_model(choice, args.weights, decay=args.ema_decay, merge=False)
    _check_target(args.out, path)
    out = export_lora(model, cfg, args.out, ckpt.export_marker(args.format, path, args.weights))
    print(
        f"exported the {args.weights} adapters of {path} (rank {cfg.train.lora.rank}) to {out / LORA_FILE}; "
        f"their base weights: {cfg.run.init_from}"
    )
    return 0


def _check_target(out: str, source) -> None:
    from pixelrun.infra import checkpoint as ckpt

    try:
        ckpt.check_export_target(out, source)
    except ckpt.UnsafeOutput as e:
        raise ConfigError("--out", str(e)) from None
