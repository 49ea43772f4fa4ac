"""Muon's cost on this CPU (issue 10): Newton-Schulz of the `base` preset's block matrices, grouped
by shape vs one matrix at a time, in bf16 and fp32; then a training step of `base` at 512px, batch
2, with Muon (bf16 and fp32 Newton-Schulz) vs AdamW, through `pixelrun bench`'s own timing.

The arms alternate (ABAB..., the first arm swapped each round) and each is repeated, so a busy
spell of a shared machine hits both; medians are reported with every time kept in the JSON.

    python benchmarks/muon_cpu.py --out benchmarks/results/muon-cpu/muon_cpu.json
    python benchmarks/muon_cpu.py --blocks 1 --rounds 1 --no-steps    # a quick look

On a CPU without native bf16 (this project's AVX2 VM) bf16 matmuls are emulated and far slower
than fp32: there, time bf16 on a block or two (--blocks, --dtypes bf16) and leave muon_bf16 out
of --step-arms.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

from pixelrun.model.denoiser import build_model
from pixelrun.tools.bench import run_bench
from pixelrun.training.newton_schulz import newton_schulz_flops, orthogonalize, orthogonalize_many
from pixelrun.training.optim import split_parameters

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def block_matrices(preset: str, blocks: int) -> list[torch.Tensor]:
    """Random matrices shaped like the Muon matrices of the preset's first `blocks` blocks."""
    with torch.device("meta"):
        model = build_model(preset, 384)
    shapes = [tuple(p.shape) for p in split_parameters(model)[0]]
    per_block = len(shapes) // len(model.blocks)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in shapes[: blocks * per_block]]


def one_by_one(mats, dtype):
    return [orthogonalize(m, dtype=dtype) for m in mats]


def grouped(mats, dtype):
    return orthogonalize_many(mats, dtype=dtype)


def time_newton_schulz(mats, dtypes: list[str], rounds: int) -> dict:
    arms = {"grouped": grouped, "one_by_one": one_by_one}
    times = {d: {a: [] for a in arms} for d in dtypes}
    for r in range(rounds):
        for d in dtypes:
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for a in order:
                t0 = time.perf_counter()
                arms[a](mats, DTYPES[d])
                times[d][a].append(time.perf_counter() - t0)
                print(f"newton-schulz {d} {a}: {times[d][a][-1]:.2f} s", flush=True)
    flops = sum(newton_schulz_flops(m.shape) for m in mats)
    return {
        d: {
            a: {"seconds_median": median(ts), "seconds": ts, "gflop_per_s": flops / median(ts) / 1e9}
            for a, ts in arms_t.items()
        }
        | {"grouped_vs_one_by_one": median(arms_t["grouped"]) / median(arms_t["one_by_one"])}
        for d, arms_t in times.items()
    }


STEP_ARMS = {
    "adamw": ["optimizer.name=adamw"],
    "muon_fp32": ["optimizer.name=muon", "optimizer.muon_precision=fp32"],
    "muon_bf16": ["optimizer.name=muon", "optimizer.muon_precision=bf16"],
}


def time_steps(names: list[str], rounds: int, steps: int, warmup: int) -> dict:
    base = ["model.preset=base", "data.resolution=512", "train.batch_size=2"]
    arms = {a: STEP_ARMS[a] for a in names}
    results = {a: [] for a in arms}
    for r in range(rounds):
        for a in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            res = run_bench(
                None,
                [*base, *arms[a]],
                variants=["dense"],
                steps=steps,
                warmup=warmup,
                text_dim=384,
                text_tokens=32,
                out=None,
            )["results"]["dense"]
            results[a].append(
                {
                    k: res[k]
                    for k in (
                        "step_seconds",
                        "forward_backward_seconds_median",
                        "optimizer_seconds_median",
                        "step_seconds_median",
                    )
                }
            )
            print(
                f"step {a}: {res['step_seconds_median']:.2f} s (optimizer {res['optimizer_seconds_median']:.2f} s)",
                flush=True,
            )
    out = {}
    for a, runs in results.items():
        out[a] = {
            "runs": runs,
            "step_seconds_median": median([s for r in runs for s in r["step_seconds"]]),
            "optimizer_seconds_median": median([r["optimizer_seconds_median"] for r in runs]),
            "forward_backward_seconds_median": median([r["forward_backward_seconds_median"] for r in runs]),
        }
    for a in (a for a in out if a != "adamw" and "adamw" in out):
        out[a]["step_vs_adamw"] = out[a]["step_seconds_median"] / out["adamw"]["step_seconds_median"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--blocks", type=int, default=None, help="first N blocks' matrices (default: all)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=3, help="alternated repeats of the Newton-Schulz arms")
    ap.add_argument("--step-rounds", type=int, default=2, help="alternated repeats of the step arms")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per bench run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--step-arms", default="adamw,muon_fp32,muon_bf16", help=f"of {', '.join(STEP_ARMS)}")
    ap.add_argument("--no-steps", action="store_true", help="only the Newton-Schulz part")
    ap.add_argument("--out")
    args = ap.parse_args()
    mats = block_matrices(args.preset, args.blocks or 10**6)
    report = {
        "command": " ".join(sys.argv),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "preset": args.preset,
        "matrices": len(mats),
        "shapes": sorted({tuple(m.shape) for m in mats}),
        "newton_schulz_tflop": sum(newton_schulz_flops(m.shape) for m in mats) / 1e12,
        "note": "shared 2-core VM: other jobs ran beside these timings",
        "newton_schulz": time_newton_schulz(mats, args.dtypes.split(","), args.rounds),
    }
    if not args.no_steps:
        report["step_base_512_batch2"] = time_steps(
            args.step_arms.split(","), args.step_rounds, args.steps, args.warmup
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
