"""pixelrun bench: time training steps per variant (dense / routed, with / without teachers) with
FLOPs and MFU, or with --gpus N project a whole run's hours onto N GPUs. The config is set by
--config and dotted overrides; the flags are the measurement's own settings, none a config key."""

from __future__ import annotations

import argparse
import json

from pixelrun.config import ConfigError

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


def add_parser(subparsers) -> None:
    b = subparsers.add_parser(
        "bench",
        help="time training steps: dense / routed, with / without teachers; FLOPs and MFU (JSON); "
        "--gpus N: project a whole run's hours onto N GPUs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time training steps of the configured model on random data, per variant, after a warm-up. "
        "With --gpus N, time every stage of the config instead (teachers and text encoder included) "
        "and project the run's hours onto N GPUs.",
        epilog=f"""speed options are config overrides:
  parallel.compile=true                  torch.compile each block (the warm-up steps pay the compile;
                                         use --warmup 2 or more)
  parallel.activation_checkpointing=true recompute block activations in the backward
  hardware.precision=bf16|fp32              (auto: bf16 on CUDA, fp32 on the CPU)
  optimizer.name=muon optimizer.muon_precision=bf16|fp32

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
  pixelrun bench --config configs/speedrun/speedrun.yaml --gpus 32""",
    )
    b.add_argument("--config", help="YAML config (default: the built-in demo)")
    b.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. model.preset=base data.resolution=512"
    )
    b.add_argument(
        "--variants",
        help="comma list of: dense, routed (routing.ratio=0.5), teachers (REPA + LPIPS + P-DINO), "
        "routed+teachers (default: dense,routed)",
    )
    b.add_argument(
        "--steps", type=int, default=5, help="timed steps per variant or stage (the median is reported; default 5)"
    )
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    b.add_argument("--text-dim", type=int, help="width of the random text embeddings (default 384, MiniLM)")
    b.add_argument("--text-tokens", type=int, help="text tokens per image (default 32)")
    b.add_argument("--gpus", type=int, help="project the configured run (every stage) onto this many GPUs")
    b.add_argument(
        "--micro-batch",
        type=int,
        help="with --gpus: measure at this micro-batch instead of each stage's "
        "(accumulation steps make up the global batch)",
    )
    b.add_argument(
        "--loader-cores",
        type=int,
        default=8,
        help="with --gpus: CPU cores decoding images per GPU, for the per-core loader rate (default 8, "
        "the reference's 8 loader processes per rank)",
    )
    b.add_argument(
        "--memory",
        action="store_true",
        help="print the config's model states per GPU (weights, gradients, optimizer moments, EMA; full or "
        "LoRA) on --gpus GPUs, computed without running a step, e.g. for model.preset=prxpixel-7b",
    )
    b.add_argument("--out", help="write the full report (with the resolved config) here")
    b.set_defaults(func=run)


def run(args) -> int:
    if args.memory:
        return _memory(args)
    if args.gpus is not None:
        from pixelrun.tools.forecast import format_projection, project

        for flag, value in (
            ("--variants", args.variants),
            ("--text-dim", args.text_dim),
            ("--text-tokens", args.text_tokens),
        ):
            if value is not None:
                raise ConfigError(
                    flag,
                    "does not apply with --gpus: the projection times every stage with the "
                    "configured text encoder, teachers and losses",
                )
        report = project(
            args.config,
            args.overrides,
            gpus=args.gpus,
            micro_batch=args.micro_batch,
            loader_cores=args.loader_cores,
            steps=args.steps,
            warmup=args.warmup,
            out=args.out,
        )
        print(format_projection(report))
        return 0
    if args.micro_batch is not None:
        raise ConfigError("--micro-batch", "applies with --gpus only (otherwise set train.batch_size)")
    from pixelrun.tools.bench import run_bench

    report = run_bench(
        args.config,
        args.overrides,
        variants=(args.variants or "dense,routed").split(","),
        steps=args.steps,
        warmup=args.warmup,
        text_dim=args.text_dim or 384,
        text_tokens=args.text_tokens or 32,
        out=args.out,
    )
    summary = {
        name: {k: r.get(k) for k in BENCH_SUMMARY if k in r or k != "step_time_vs_dense"}
        for name, r in report["results"].items()
    }
    print(json.dumps({"device": report["device"], "results": summary}, indent=2))
    return 0


def _memory(args) -> int:
    from pixelrun.config import load_config
    from pixelrun.tools.memory import format_memory, state_memory

    gpus = args.gpus or 1
    if gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1; got {gpus}")
    cfg = load_config(args.config, args.overrides)
    dim = args.text_dim or 384
    print(format_memory(state_memory(cfg, dim, gpus), cfg.model.preset))
    if not args.text_dim:
        print("(text width 384, MiniLM's; --text-dim for another encoder: it only sizes the text projection)")
    return 0
