"""`pixelrun train --config C --rehearse`: the user's own run, at a size a laptop runs in minutes.

Every switch stays as written: stages, the TREAD span, the REPA block and teacher, the perceptual
losses, Muon, EMA, sample grids with their guidance mode, evaluations with their networks, the data
source and its caption fields, the text encoder, the precision and the parallelism. Only sizes
shrink: the model keeps its depth, heads, patch and bottleneck with a small width; each stage
runs a handful of steps at a few tokens per side (stage resolutions keep their ratios); the batch
is small but still accumulates; grids, evaluations and checkpoints all happen, at steps that do
not coincide, so a grid or an evaluation runs between two checkpoints (where a forward-only pass
of a sharded EMA once broke a run).

Then it resumes once, in the same command: from its first checkpoint, in a run directory of its
own, to the end, and compares the two runs: losses step by step, and the final model, EMA,
optimizer, learning-rate schedule and data position. Restored state that differed in any of them
would show there. Under torchrun every rank runs it; rank 0 reports.

Run the same command again after a crash and it resumes where it stopped (its run directory is
`<run.dir>-rehearsal`, kept while the config is the same, started afresh when it changes).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrun.config import (
    Config,
    ConfigError,
    batch_split,
    config_from_dict,
    image_sizes,
    load_config,
    model_fields,
    stage_plan,
    to_dict,
    to_yaml,
)
from pixelrun.data.sources import check_paths
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra import units
from pixelrun.infra.distributed import process_group
from pixelrun.infra.precision import native_cpu_bf16
from pixelrun.infra.records import read_metrics
from pixelrun.run.train import run_training

STEPS_PER_STAGE = 5  # a single-stage run gets two stages' worth
TOKENS_PER_SIDE = 3  # first stage; later stages keep their resolution ratio to it
MICRO_BATCH, ACCUMULATION = 1, 2  # one image per micro-batch, two micro-batches: accumulation runs
CHECKPOINT_EVERY, SAMPLE_EVERY, EVAL_EVERY = 4, 3, 7  # pairwise coprime: no two coincide before step 12
HEAD_DIM = 4  # the smallest RoPE allows (2-D axial: a multiple of 4)
MARKER = ".pixelrun-rehearsal"  # the rehearsal's run directory is its own: safe to start afresh


@dataclasses.dataclass
class Shrunk:
    config: Config
    changes: list[tuple[str, object, object]]  # (key, as written, rehearsal value)


def rehearsal_config(cfg: Config, world_size: int, device_type: str = "cpu") -> Shrunk:
    """The rehearsal version of `cfg` for `world_size` ranks on `device_type`, and what changed."""
    d = to_dict(cfg)
    changes: list[tuple[str, object, object]] = []

    def put(key: str, value) -> None:
        node = d
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        if node[last] != value:
            changes.append((key, node[last], value))
            node[last] = value

    m = model_fields(cfg)
    width = m["num_heads"] * HEAD_DIM
    if m["hidden_size"] > width:
        put("model.hidden_size", width)
    patch = m["patch_size"]
    stage_res = [st.resolution or cfg.data.resolution for st in cfg.stages] or [cfg.data.resolution]
    first = _rehearsal_resolution(cfg, patch)
    scale = first / stage_res[0]
    put("data.resolution", first)
    micro = 2 if cfg.objective.contrastive_weight > 0 else MICRO_BATCH  # its negative: another sample
    if cfg.stages:
        for i, res in enumerate(stage_res):
            put(f"stages.{i}.steps", STEPS_PER_STAGE)
            new_res = max(patch, round(res * scale / patch) * patch)
            put(f"stages.{i}.resolution", new_res)
            put(f"stages.{i}.batch_size", micro)
            put(f"stages.{i}.global_batch_size", world_size * micro * ACCUMULATION)
        total = STEPS_PER_STAGE * len(cfg.stages)
    else:
        total = 2 * STEPS_PER_STAGE
    put("train.steps", total)
    put("train.batch_size", micro)
    put("train.global_batch_size", world_size * micro * ACCUMULATION)
    # the schedule's warm-up spans the resume point, so a schedule that did not resume shows
    put("schedule.warmup_steps", min(cfg.schedule.warmup_steps, total - 2))
    put("cadence.log_every", 1)
    put("cadence.checkpoint_every", CHECKPOINT_EVERY)
    put("cadence.sample_every", SAMPLE_EVERY)
    put("cadence.keep_checkpoints", total)  # the resume check starts from the first one
    put("train.max_minutes", 0.0)
    put("eval.every", EVAL_EVERY)
    put("eval.prompts", min(cfg.eval.prompts, 4) if cfg.eval.prompts else 0)
    put("eval.val_images", min(cfg.eval.val_images, 4))
    put("sample.steps", min(cfg.sample.steps, 3))
    put("sample.grid_prompts", min(cfg.sample.grid_prompts, 2))
    put("ema.every", 1)  # every step: the sharded EMA update runs between grids, evaluations and saves
    if world_size % cfg.parallel.replicate:
        put("parallel.replicate", 1)
    if device_type == "cpu" and not native_cpu_bf16():
        # emulated bf16 runs many times slower than fp32 here: the rehearsal would take hours
        if cfg.hardware.precision == "bf16":
            put("hardware.precision", "fp32")
        if cfg.optimizer.name == "muon":
            put("optimizer.muon_precision", "fp32")
    put("run.dir", f"{cfg.run.dir.rstrip('/')}-rehearsal")
    put("run.init_from", None)
    put("model.init", None)  # the shrunk model starts from random weights, as from run.init_from's
    try:
        return Shrunk(config_from_dict(d), changes)
    except ConfigError as e:
        raise ConfigError(e.key, f"(in the rehearsal's shrunk config) {str(e).split(': ', 1)[-1]}") from None


def _rehearsal_resolution(cfg: Config, patch: int) -> int:
    """A few tokens per side, raised where the perceptual losses need more pixels (VGG's pooling)."""
    res = TOKENS_PER_SIDE * patch
    if cfg.perceptual.lpips_weight > 0 or any((st.lpips_weight or 0) > 0 for st in cfg.stages):
        while res * cfg.perceptual.lpips_scale * _smallest_bucket_side(cfg, res) < 18:
            res += patch
    return res


def _smallest_bucket_side(cfg: Config, res: int) -> float:
    """The smallest bucket side at `res` as a fraction of `res` (1 without buckets)."""
    probe = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=res), stages=[])
    return min(min(hw) for hw in image_sizes(probe)) / res


# ----------------------------------------------------------------------------- running


def rehearse(cfg: Config) -> dict:
    """Run the rehearsal of `cfg` (one process or under torchrun) and print its report. Returns the
    report on rank 0 ({} elsewhere), or the summary of a run stopped by a signal."""
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    with process_group(cfg.hardware.device) as ctx:  # the shrunk config decides replication below
        say = tqdm.write if ctx.is_main else (lambda *a, **k: None)
        shrunk = rehearsal_config(cfg, ctx.world_size, ctx.device.type)
        rcfg = shrunk.config
        check_paths(rcfg)
        if rcfg.parallel.replicate > 1:  # HSDP needs its mesh: rebuild the context with it
            ctx = _with_replicas(ctx, rcfg)
        say(f"rehearsal of {cfg.run.dir} on {ctx.world_size} rank(s); every switch as written, sizes shrunk:")
        for key, old, new in shrunk.changes:
            say(f"  {key}: {old} -> {new}")
        run = Path(rcfg.run.dir)
        _claim(run, rcfg, ctx)
        first = run_training(rcfg, ctx)
        if "stopped" in first:  # Ctrl-C / SIGTERM: the same command continues the rehearsal
            return first
        say(
            f"rehearsal: resuming once from step {CHECKPOINT_EVERY}'s checkpoint in {run / 'resume-check'}, to "
            f"the end, to compare with the run above"
        )
        resumed_dir = _prepare_resume(run, CHECKPOINT_EVERY, ctx)
        second = run_training(dataclasses.replace(rcfg, run=dataclasses.replace(rcfg.run, dir=str(resumed_dir))), ctx)
        if "stopped" in second:
            return second
        report = {}
        if ctx.is_main:
            report = build_report(rcfg, run, resumed_dir, CHECKPOINT_EVERY, first)
            (run / "rehearsal.json").write_text(json.dumps(report, indent=2) + "\n")
            print(format_report(report), flush=True)
        ctx.barrier()
        return report


def _with_replicas(ctx, cfg: Config):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        ctx.device.type,
        (cfg.parallel.replicate, ctx.world_size // cfg.parallel.replicate),
        mesh_dim_names=("replicate", "shard"),
    )
    return dataclasses.replace(ctx, mesh=mesh)


def _claim(run: Path, cfg: Config, ctx) -> None:
    """Make `run` the rehearsal's: kept (and resumed) while its saved config equals this one, emptied
    when it changed; a folder the rehearsal did not make is refused."""
    if ctx.is_main:
        if run.exists() and any(run.iterdir()) and not (run / MARKER).is_file():
            raise ConfigError(
                "run.dir",
                f"the rehearsal writes to {run}, which holds files it did not write; move them or set another run.dir",
            )
        saved = run / "config.yaml"
        if saved.is_file() and to_yaml(load_config(saved)) != to_yaml(cfg):
            shutil.rmtree(run)  # a rehearsal of another config: start afresh
        run.mkdir(parents=True, exist_ok=True)
        (run / MARKER).write_text("a `pixelrun train --rehearse` run directory: it may be emptied by the next one\n")
    ctx.barrier()


def _prepare_resume(run: Path, step: int, ctx) -> Path:
    """A fresh run directory holding only the checkpoint of `step`, so the next run resumes from it."""
    target = run / "resume-check"
    if ctx.is_main:
        src = ckpt.checkpoint_root(run) / f"step_{step:08d}"
        if not ckpt.is_complete(src):
            raise RuntimeError(f"the rehearsal's checkpoint {src} is missing")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(src, ckpt.checkpoint_root(target) / src.name)
    ctx.barrier()
    return target


# ----------------------------------------------------------------------------- the report


def _rows(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


_NOT_LOSSES = {"step", "grad_norm", "lr", "images_per_s", "skipped_steps", "train_seconds"}


def build_report(cfg: Config, run: Path, resumed: Path, from_step: int, first: dict) -> dict:
    """Each stage's steps, resolution, batch, loss terms (first and last) and time per step, and
    the resume check; `first` is the summary of the run that went straight through."""
    rows = [r for r in _rows(run) if "loss" in r]
    stages = []
    for i, (s0, s1, scfg) in enumerate(stage_plan(cfg)):
        part = [r for r in rows if s0 < r["step"] <= s1]
        terms = [k for k in part[0] if k not in _NOT_LOSSES] if part else []
        global_batch = batch_split(scfg, 1)[0] if scfg.train.global_batch_size else None
        step_s = [(global_batch or scfg.train.batch_size) / r["images_per_s"] for r in part if r.get("images_per_s")]
        stages.append(
            {
                "name": cfg.stages[i].name if cfg.stages else "train",
                "steps": [s0, s1],
                "resolution": scfg.data.resolution,
                "global_batch": global_batch,
                "losses": {k: [part[0][k], part[-1][k]] for k in terms},
                "seconds_per_step_median": statistics.median(step_s) if step_s else None,
            }
        )
    report = {
        "run_dir": str(run),
        "stages": stages,
        "resume": compare_runs(run, resumed, from_step),
        "samples": first.get("samples"),
        "checkpoint": first.get("checkpoint"),
        "eval": first.get("eval"),
        "skipped_images": first.get("skipped_images", 0),
    }
    report["resume"]["checkpoint"] = str(ckpt.checkpoint_root(run) / f"step_{from_step:08d}")
    return report


def _max_diff(a: dict, b: dict, prefix: str) -> float | None:
    keys = [k for k in a if k.startswith(prefix)]
    if not keys or sorted(keys) != sorted(k for k in b if k.startswith(prefix)):
        return None  # not comparable: a part is missing on one side
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in keys)


def compare_runs(full: Path, resumed: Path, from_step: int) -> dict:
    """How the run resumed from `from_step` ended, against the run that went straight through:
    losses per step, and the final model, EMA, optimizer, schedule and data position."""
    a_rows = {r["step"]: r for r in _rows(full) if "loss" in r and r["step"] > from_step}
    b_rows = {r["step"]: r for r in _rows(resumed) if "loss" in r and r["step"] > from_step}
    first_diff, loss_diff = None, 0.0
    for step in sorted(a_rows):
        b = b_rows.get(step)
        for k, v in a_rows[step].items():
            if k in ("images_per_s", "train_seconds") or not isinstance(v, (int, float)):  # clocks, not the run
                continue
            d = abs(v - b[k]) if b is not None and k in b else float("inf")
            loss_diff = max(loss_diff, d)
            if d and first_diff is None:
                first_diff = {"step": step, "key": k, "uninterrupted": v, "resumed": None if b is None else b.get(k)}
    a_last, b_last = ckpt.latest_checkpoint(full), ckpt.latest_checkpoint(resumed)
    assert a_last is not None and b_last is not None  # both runs saved at their last step
    ta, tb = ckpt.read_tensors(a_last), ckpt.read_tensors(b_last)
    ma, mb = ckpt.load_meta(a_last), ckpt.load_meta(b_last)
    parts = {
        "model": _max_diff(ta, tb, "model."),
        "ema": _max_diff(ta, tb, "ema."),
        "optimizer": _max_diff(ta, tb, "optimizer."),
        "schedule": 0.0 if ma.scheduler == mb.scheduler else None,
        "data_position": 0.0 if ma.data == mb.data else None,
    }
    return {
        "from_step": from_step,
        "steps_compared": sorted(a_rows),
        "max_log_difference": loss_diff,
        "first_difference": first_diff,
        "final_max_abs_difference": parts,
        "same": first_diff is None and all(v == 0.0 for v in parts.values()),
    }


def format_report(r: dict) -> str:
    lines = ["", "rehearsal report", "-" * 72]
    for st in r["stages"]:
        t = st["seconds_per_step_median"]
        lines.append(
            f"{st['name']}: steps {st['steps'][0]}..{st['steps'][1]}, {st['resolution']}px, "
            f"global batch {st['global_batch']}, {t:.2f} s/step (median)"
            if t
            else f"{st['name']}: steps {st['steps'][0]}..{st['steps'][1]}, {st['resolution']}px"
        )
        for k, (a, b) in st["losses"].items():
            lines.append(f"  {k:<8} {a:>10.4f} -> {b:.4f}")
    res = r["resume"]
    parts = res["final_max_abs_difference"]
    lines.append(
        f"resume from step {res['from_step']} (a second run in the same command), compared with the "
        f"uninterrupted run over steps {res['steps_compared'][0]}..{res['steps_compared'][-1]}:"
        if res["steps_compared"]
        else f"resume from step {res['from_step']}: no steps to compare"
    )
    for name in ("model", "ema", "optimizer", "schedule", "data_position"):
        v = parts[name]
        verdict = "identical" if v == 0.0 else "DIFFERS (not comparable)" if v is None else f"max |diff| {v:.3g}"
        lines.append(f"  {name.replace('_', ' '):<14} {verdict}")
    fd = res["first_difference"]
    lines.append(
        "  losses         identical at every step"
        if fd is None
        else f"  losses         first differ at step {fd['step']} ({fd['key']}: {fd['uninterrupted']} vs "
        f"{fd['resumed']})"
    )
    lines.append(
        "restored model, EMA, optimizer, schedule and data position: "
        + ("yes, the resumed run is the uninterrupted one" if res["same"] else "NO: see above")
    )
    if r.get("eval"):
        lines.append("evaluation: " + ", ".join(_scores(r["eval"])))
    if r.get("skipped_images"):
        lines.append(f"skipped images: {r['skipped_images']}")
    lines.append(f"samples: {r['samples']}   report: {r['run_dir']}/rehearsal.json")
    lines.append("-" * 72)
    return "\n".join(lines)


def _scores(values: dict, prefix: str = "") -> list[str]:
    """'name value' for each number of an evaluation's dict, nested ones (several EMAs) by their path."""
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += _scores(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{prefix}{k} {units.number(v)}")
        else:
            out.append(f"{prefix}{k} {v}")
    return out
