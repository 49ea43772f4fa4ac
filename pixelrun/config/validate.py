"""`validate(cfg)`: reject inconsistent values before any work is done, with a ConfigError naming the key.

One function per section, called in a fixed order; within a section the checks run top to bottom, so a
config with several errors always reports the same, first one. A check that compares two sections
(the resolution against the model's patch, LPIPS's input side against the buckets, self-guidance
against routing, evaluation steps against train.steps) sits in the section it reports, at its place
in that order, rather than in a pass of its own that would change which error fires first.
"""

from __future__ import annotations

import math

from pixelrun.config.derived import image_sizes, model_fields, repa_block, routing_span, stage_plan
from pixelrun.config.errors import ConfigError
from pixelrun.config.rules import (
    DATA_SOURCES,
    GUIDANCE_MODES,
    LORA_TARGETS,
    METRICS,
    POS_EMBEDS,
    REPA_PROJECTORS,
    RESOLUTION_EMBEDS,
    ROUTING_KINDS,
    SAMPLERS,
    SPACINGS,
    _choice,
    _positive,
    parse_captions,
)
from pixelrun.config.schema import Config


def validate(cfg: Config) -> None:
    """Reject inconsistent values before any work is done."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_text(cfg)
    _validate_objective(cfg)
    _validate_routing(cfg)
    _validate_repa(cfg)
    _validate_perceptual(cfg)
    _validate_run(cfg)
    _validate_train(cfg)
    _validate_optimizer(cfg)
    _validate_schedule(cfg)
    _validate_cadence(cfg)
    _validate_hardware(cfg)
    _validate_parallel(cfg)
    _validate_stages(cfg)
    _validate_ema(cfg)
    _validate_sample(cfg)
    _validate_eval(cfg)
    _validate_log(cfg)


def _validate_model(cfg: Config) -> None:
    m = model_fields(cfg)
    for k in ("patch_size", "hidden_size", "depth", "num_heads"):
        _positive(f"model.{k}", m[k])
    if m["hidden_size"] % m["num_heads"]:
        raise ConfigError("model.num_heads", f"must divide hidden_size {m['hidden_size']}")
    if (m["hidden_size"] // m["num_heads"]) % 4:
        raise ConfigError("model.num_heads", "head dim (hidden_size / num_heads) must be a multiple of 4 for 2-D RoPE")
    _positive("model.mlp_ratio", m["mlp_ratio"])
    if m["bottleneck_size"] is not None:
        _positive("model.bottleneck_size", m["bottleneck_size"])
    _choice("model.resolution_embeds", m["resolution_embeds"], RESOLUTION_EMBEDS)
    _choice("model.pos_embed", m["pos_embed"], POS_EMBEDS)
    _positive("model.pixel_head", m["pixel_head"], allow_zero=True)
    if cfg.model.init and cfg.run.init_from:
        raise ConfigError("model.init", "and run.init_from both name the starting weights; set only one of them")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _choice("data.source", d.source, DATA_SOURCES)
    _positive("data.resolution", d.resolution)
    patch = model_fields(cfg)["patch_size"]
    if d.resolution % patch:
        raise ConfigError("data.resolution", f"{d.resolution} is not a multiple of the patch size {patch}")
    if d.source in ("folder", "shards") and not d.path:
        raise ConfigError("data.path", f"is required when data.source is {d.source}")
    try:
        parse_captions(d.captions)
    except ValueError as e:
        raise ConfigError("data.captions", str(e)) from None
    _positive("data.workers", d.workers, allow_zero=True)
    _choice("data.uncaptioned", d.uncaptioned, ("skip", "empty"))
    if not 1 <= d.max_shapes <= 6:
        raise ConfigError("data.max_shapes", f"must be between 1 and 6 (six colours); got {d.max_shapes}")
    _validate_held_out(cfg)


def _validate_held_out(cfg: Config) -> None:
    """data.val_path and data.val_count: a held-out set of the user's own, for the sources that read one."""
    d = cfg.data
    if d.val_path is not None and d.source not in ("folder", "shards"):
        raise ConfigError(
            "data.val_path", f"only data.source=folder or shards reads a held-out set; {d.source} holds out its own"
        )
    if d.val_path is not None and not d.val_path:
        raise ConfigError("data.val_path", "is empty; give a folder or shards, or null")
    if d.val_count is None:
        return
    if d.source != "folder":
        raise ConfigError("data.val_count", f"chooses held-out images of a folder; data.source is {d.source}")
    if d.val_path is not None:
        raise ConfigError("data.val_count", "the held-out images come from data.val_path: set one of the two")
    _positive("data.val_count", d.val_count, allow_zero=True)


def _validate_text(cfg: Config) -> None:
    _positive("text.max_tokens", cfg.text.max_tokens)
    _positive("text.cache_gib", cfg.text.cache_gib, allow_zero=True)
    _choice("text.precision", cfg.text.precision, ("auto", "bf16", "fp32"))


def _validate_objective(cfg: Config) -> None:
    o = cfg.objective
    _positive("objective.noise_scale", o.noise_scale)
    _positive("objective.time_shift", o.time_shift)
    _positive("objective.logit_std", o.logit_std)
    for key, v in (
        ("objective.uniform_fraction", o.uniform_fraction),
        ("objective.caption_dropout", o.caption_dropout),
    ):
        if not 0 <= v <= 1:
            raise ConfigError(key, f"must be in [0, 1]; got {v}")
    if not 0 <= o.t_min < 1:
        raise ConfigError("objective.t_min", f"must be in [0, 1); got {o.t_min}")
    _positive("objective.t_clamp", o.t_clamp)
    _positive("objective.contrastive_weight", o.contrastive_weight, allow_zero=True)
    if o.contrastive_weight > 0 and cfg.train.batch_size < 2:  # the negative is another sample of the micro-batch
        raise ConfigError(
            "objective.contrastive_weight",
            f"needs train.batch_size >= 2 (its negative is another sample of the micro-batch); got {cfg.train.batch_size}",
        )


def _validate_routing(cfg: Config) -> None:
    _choice("routing.kind", cfg.routing.kind, ROUTING_KINDS)
    if not 0 <= cfg.routing.ratio < 1:
        raise ConfigError("routing.ratio", f"must be in [0, 1); got {cfg.routing.ratio}")
    if not 0 <= cfg.routing.path_drop < 1:
        raise ConfigError("routing.path_drop", f"must be in [0, 1); got {cfg.routing.path_drop}")
    if cfg.routing.path_drop > 0 and cfg.routing.kind != "sprint":
        raise ConfigError("routing.path_drop", "drops SPRINT's deep path: needs routing.kind=sprint")
    if cfg.routing.path_drop > 0 and cfg.routing.ratio == 0:
        raise ConfigError("routing.path_drop", "is drawn with each sample's routing mask: needs routing.ratio > 0")
    routing_span(cfg)


def _validate_repa(cfg: Config) -> None:
    r = cfg.repa
    _positive("repa.weight", r.weight, allow_zero=True)
    if r.hidden is not None:
        _positive("repa.hidden", r.hidden)
    if not 0 < r.until <= 1:
        raise ConfigError("repa.until", f"must be in (0, 1], got {r.until}")
    repa_block(cfg)
    _choice("repa.projector", r.projector, REPA_PROJECTORS)
    if r.projector == "conv" and r.weight > 0 and cfg.routing.ratio > 0:  # as PRX's iREPALoss refuses conv + TREAD
        raise ConfigError(
            "repa.projector", "conv needs the whole token grid, routing.ratio > 0 leaves it gaps: use attention"
        )
    patch = model_fields(cfg)["patch_size"]
    if r.spatial_norm and r.weight > 0 and min((h // patch) * (w // patch) for h, w in image_sizes(cfg)) < 2:
        raise ConfigError("repa.spatial_norm", "its std over an image's tokens needs at least 2 tokens; images have 1")


def _validate_perceptual(cfg: Config) -> None:
    pc = cfg.perceptual
    for k in ("lpips_weight", "dino_weight"):
        _positive(f"perceptual.{k}", getattr(pc, k), allow_zero=True)
    if not 0 < pc.lpips_scale <= 1:
        raise ConfigError("perceptual.lpips_scale", f"must be in (0, 1]; got {pc.lpips_scale}")
    if pc.lpips_weight > 0:
        side = min(min(hw) for hw in image_sizes(cfg)) * pc.lpips_scale
        if side < 18:  # VGG16's pooling (ST-LPIPS's blur-pool variant) needs at least 18 px
            raise ConfigError(
                "perceptual.lpips_scale",
                f"LPIPS would see {side:g} px images (smallest bucket side x "
                f"scale); VGG16 needs at least 18: raise the scale or the resolution",
            )
    if pc.max_t is not None and not 0 < pc.max_t <= 1:
        raise ConfigError("perceptual.max_t", f"must be in (0, 1] or null; got {pc.max_t}")


def _validate_run(cfg: Config) -> None:
    if not cfg.run.dir.strip():
        raise ConfigError("run.dir", "must not be empty (it would write into the current folder); give a folder")


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.max_minutes", t.max_minutes, allow_zero=True)
    _positive("train.divergence_window", t.divergence_window)
    for key, value in (
        ("divergence_factor", t.divergence_factor),
        ("divergence_weight_growth", t.divergence_weight_growth),
    ):
        if value and not value > 1:  # a finite number over 1, or 0 (off); NaN fails both
            raise ConfigError(f"train.{key}", f"must be over 1 (a multiple), or 0 to turn the check off; got {value}")
    if t.global_batch_size is not None:
        _positive("train.global_batch_size", t.global_batch_size)
        if t.global_batch_size % t.batch_size:
            raise ConfigError(
                "train.global_batch_size",
                f"{t.global_batch_size} is not a multiple of the micro-batch train.batch_size={t.batch_size}",
            )
    _validate_lora(cfg)


def _validate_lora(cfg: Config) -> None:
    lo = cfg.train.lora
    for i, name in enumerate(lo.targets):
        if name not in LORA_TARGETS:
            raise ConfigError(
                f"train.lora.targets[{i}]",
                f"unknown module {name!r}; the linears of a transformer block are: {', '.join(LORA_TARGETS)}",
            )
    if lo.rank is None:
        if lo.alpha is not None:
            raise ConfigError(
                "train.lora.alpha", "is set but train.lora.rank is null (no LoRA); set a rank or remove it"
            )
        return
    if lo.rank <= 0:
        raise ConfigError(
            "train.lora.rank",
            f"must be a positive integer, the adapters' rank; got {lo.rank} (null = no LoRA: every weight trained)",
        )
    if lo.alpha is not None:
        _positive("train.lora.alpha", lo.alpha)
    if not lo.targets:
        raise ConfigError("train.lora.targets", f"names no module; choose among {', '.join(LORA_TARGETS)}")
    # The sources of base weights wired in (pixelrun/run/resume.py, `lora_base`; inference's
    # `_load_lora_base`): a source these do not name would leave the frozen weights random.
    if not cfg.run.init_from and not cfg.model.init:
        raise ConfigError(
            "train.lora.rank",
            "LoRA adapts given weights, which stay frozen: set model.init to a released diffusers model, or "
            "run.init_from to the run, checkpoint or export to fine-tune (resume, sample and export read the "
            "base weights from it again)",
        )


def _validate_optimizer(cfg: Config) -> None:
    o = cfg.optimizer
    _choice("optimizer.name", o.name, ("adamw", "muon"))
    _positive("optimizer.lr", o.lr)
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optimizer.betas", f"must be two numbers in [0, 1); got {o.betas}")
    if o.muon_lr is not None:
        _positive("optimizer.muon_lr", o.muon_lr)
    if not 0 <= o.muon_momentum < 1:
        raise ConfigError("optimizer.muon_momentum", f"must be in [0, 1); got {o.muon_momentum}")
    _choice("optimizer.muon_precision", o.muon_precision, ("bf16", "fp32"))
    _positive("optimizer.muon_ns_steps", o.muon_ns_steps)


def _validate_schedule(cfg: Config) -> None:
    s = cfg.schedule
    _positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    if not 0 <= s.cooldown <= 1:
        raise ConfigError("schedule.cooldown", f"must be a fraction of train.steps in [0, 1]; got {s.cooldown}")


def _validate_cadence(cfg: Config) -> None:
    c = cfg.cadence
    for k in ("log_every", "sample_every", "checkpoint_every"):
        _positive(f"cadence.{k}", getattr(c, k), allow_zero=True)  # 0 = never (except at the end)
    _positive("cadence.keep_checkpoints", c.keep_checkpoints)


def _validate_hardware(cfg: Config) -> None:
    h = cfg.hardware
    _choice("hardware.precision", h.precision, ("auto", "bf16", "fp32"))
    if not (h.device in ("auto", "cpu", "cuda") or h.device.startswith("cuda:")):
        raise ConfigError("hardware.device", f"must be auto, cpu, cuda or cuda:N; got {h.device!r}")
    _positive("hardware.threads", h.threads, allow_zero=True)


def _validate_parallel(cfg: Config) -> None:
    _positive("parallel.replicate", cfg.parallel.replicate)


def _validate_stages(cfg: Config) -> None:
    """Each stage's steps, then each stage's whole config (the top level with the stage's values applied)."""
    for i, st in enumerate(cfg.stages):
        _positive(f"stages[{i}].steps", st.steps)
    for i, (_, _, stage_cfg) in enumerate(stage_plan(cfg) if cfg.stages else []):
        try:
            validate(stage_cfg)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}]", f"gives an invalid {e}") from None


def _validate_ema(cfg: Config) -> None:
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError("ema.decay", f"must be in [0, 1); got {cfg.ema.decay}")
    _positive("ema.every", cfg.ema.every)
    for i, d in enumerate(cfg.ema.decays):
        if not 0 <= d < 1:
            raise ConfigError(f"ema.decays[{i}]", f"must be in [0, 1); got {d}")
    if len(set(cfg.ema.decays)) != len(cfg.ema.decays):  # a decay names its EMA (--ema-decay, the checkpoint)
        raise ConfigError("ema.decays", f"holds a decay twice: {cfg.ema.decays}")


# Past this a guided prediction is mostly the guide's difference scaled up: images saturate (at 1e30
# they overflow to black). Published guidance scales are 1 to about 10.
GUIDANCE_MAX = 100.0


def _validate_sample(cfg: Config) -> None:
    s = cfg.sample
    _positive("sample.steps", s.steps)
    if s.guidance < 1 and s.guidance_mode != "none":  # below 1 the guide points away from the prompt
        raise ConfigError(
            "sample.guidance", f"must be >= 1 (1 = no guidance; larger follows the prompt more); got {s.guidance:g}"
        )
    if s.guidance > GUIDANCE_MAX:  # the guided prediction overflows: an all-black or all-white image
        raise ConfigError(
            "sample.guidance", f"must be at most {GUIDANCE_MAX:g} (usual values are 1 to 10); got {s.guidance:g}"
        )
    _choice("sample.guidance_mode", s.guidance_mode, GUIDANCE_MODES)
    if s.guidance_mode == "self" and cfg.routing.ratio == 0:
        raise ConfigError(
            "sample.guidance_mode", "self-guidance contrasts a dense and a routed pass: set routing.ratio > 0"
        )
    if s.guidance_mode == "pathdrop" and cfg.routing.kind != "sprint":
        raise ConfigError(
            "sample.guidance_mode",
            "pathdrop guides with SPRINT's dropped deep path: needs a model trained with routing.kind=sprint",
        )
    _choice("sample.spacing", s.spacing, SPACINGS)
    _choice("sample.sampler", s.sampler, SAMPLERS)
    lo_hi = s.guidance_interval
    if lo_hi and not (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] <= 1):
        raise ConfigError("sample.guidance_interval", f"must be [lo, hi] with 0 <= lo <= hi <= 1, or []; got {lo_hi}")
    _positive("sample.shift", s.shift)
    _positive("sample.grid_prompts", s.grid_prompts, allow_zero=True)


def _validate_eval(cfg: Config) -> None:
    ev = cfg.eval
    _positive("eval.prompts", ev.prompts, allow_zero=True)
    _positive("eval.every", ev.every, allow_zero=True)
    for i, name in enumerate(ev.metrics):
        _choice(f"eval.metrics[{i}]", name, ("auto", *METRICS))
    for key, path in (("eval.prompts_file", ev.prompts_file), ("sample.prompts_file", cfg.sample.prompts_file)):
        if path is not None and not path.strip():
            raise ConfigError(key, "is empty; give a text file of prompts, one a line, or null")
    _positive("eval.dino_mmd_sigma", ev.dino_mmd_sigma)
    _positive("eval.dino_mmd_scale", ev.dino_mmd_scale)
    _positive("eval.dino_resolution", ev.dino_resolution)
    _positive("eval.val_images", ev.val_images, allow_zero=True)
    steps = cfg.train.steps
    for i, at in enumerate(ev.at_steps):
        if not 1 <= at <= steps:
            raise ConfigError(f"eval.at_steps[{i}]", f"must be a step in 1..train.steps={steps}; got {at}")
    for i, g in enumerate(ev.guidance):
        if not (math.isfinite(g) and (g >= 1 or cfg.sample.guidance_mode == "none")):
            raise ConfigError(f"eval.guidance[{i}]", f"must be >= 1 (1 = no guidance); got {g:g}")
        if g > GUIDANCE_MAX:
            raise ConfigError(f"eval.guidance[{i}]", f"must be at most {GUIDANCE_MAX:g}; got {g:g}")
    _choice("eval.weights", ev.weights, ("ema", "raw"))


def _validate_log(cfg: Config) -> None:
    if cfg.log.flops_per_image is not None:
        _positive("log.flops_per_image", cfg.log.flops_per_image)
    if not cfg.log.wandb_project:
        raise ConfigError("log.wandb_project", "must not be empty")
