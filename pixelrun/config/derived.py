"""Values computed from a Config that more than one place needs: the resolved architecture, the
routed span, the batch sizes and their split over ranks, the stage plan, the REPA projector's
width and block, and what a resume may change. Each raises ConfigError naming the key
when the config cannot give it, so validation calls the same functions the run uses.
"""

from __future__ import annotations

import copy
import dataclasses

from pixelrun.config.errors import ConfigError
from pixelrun.config.rules import PRESETS, _choice, aspect_buckets, span_for_depth
from pixelrun.config.schema import _STAGE_KEYS, Config, ModelSection, _build, to_dict


def model_fields(cfg: Config) -> dict:
    """The model's architecture: the preset with the config's explicit overrides applied."""
    _choice("model.preset", cfg.model.preset, tuple(PRESETS))
    fields = dict(PRESETS[cfg.model.preset])
    for f in dataclasses.fields(ModelSection):
        v = getattr(cfg.model, f.name)
        if f.name not in ("preset", "init") and v is not None:  # init: where weights come from, not a shape
            fields[f.name] = v
    fields.setdefault("resolution_embeds", "none")  # the presets without a resolution embedder
    fields.setdefault("pos_embed", "none")
    fields.setdefault("pixel_head", 0)
    return fields


def routing_span(cfg: Config) -> tuple[int, int]:
    """The routed blocks (start, end), inclusive, for this config's depth."""
    try:
        return span_for_depth(model_fields(cfg)["depth"], cfg.routing.start, cfg.routing.end)
    except ValueError as e:
        key = "routing.end" if "span end" in str(e) else "routing.start"
        raise ConfigError(key, str(e)) from None


def image_sizes(cfg: Config) -> list[tuple[int, int]]:
    """The (height, width) sizes batches come in: the square, or the aspect-ratio buckets."""
    if cfg.data.buckets:
        return aspect_buckets(cfg.data.resolution, model_fields(cfg)["patch_size"])
    return [(cfg.data.resolution, cfg.data.resolution)]


def batch_split(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(global batch, micro-batch per rank, accumulation steps) for `world_size` ranks. Needs the
    world size, so it is checked when training starts (still before any work)."""
    t = cfg.train
    per_step = world_size * t.batch_size
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{global_batch} images cannot be split into {world_size} "
            f"rank(s) x micro-batch {t.batch_size} x whole accumulation steps",
        )
    if world_size % cfg.parallel.replicate:
        raise ConfigError(
            "parallel.replicate", f"{cfg.parallel.replicate} replica groups do not divide {world_size} ranks"
        )
    return global_batch, t.batch_size, global_batch // per_step


def stage_plan(cfg: Config) -> list[tuple[int, int, Config]]:
    """[(first step, end step, config of that stage)]: the top-level config with each stage's
    values applied; one stage of train.steps when no stages are listed."""
    if not cfg.stages:
        return [(0, cfg.train.steps, cfg)]
    plan, start = [], 0
    base = to_dict(cfg)  # a fresh tree of plain values: each stage edits its own copy
    for st in cfg.stages:
        data = copy.deepcopy(base)
        data["stages"] = []
        for name, (section, key) in _STAGE_KEYS.items():
            if getattr(st, name) is not None:
                data[section][key] = getattr(st, name)
        data["train"]["steps"] = start + st.steps
        plan.append((start, start + st.steps, _build(Config, data)))
        start += st.steps
    return plan


def has_repa_projector(cfg: Config) -> bool:
    """Whether a run trains a REPA projector: REPA on in any of its stages (one projector throughout)."""
    return any(c.repa.weight > 0 for _, _, c in stage_plan(cfg))


def _flat(tree, prefix: str = "") -> dict:
    """A config dict as {dotted key: value}; lists of sections as stages[i].key."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix.rstrip('.')}[{i}].").items()}
    return {prefix.rstrip("."): tree}


def ema_decays(cfg: Config) -> list[float]:
    """The run's EMA decays, the first the one grids, exports and metrics.jsonl use: ema.decays, or
    [ema.decay] when it is empty (every config and checkpoint from before ema.decays)."""
    return list(cfg.ema.decays) or [cfg.ema.decay]


def resume_changes(saved: Config, new: Config) -> tuple[dict, dict]:
    """What differs between the config a checkpoint was saved with and the one resuming it, as
    ({key: (old, new)} refused, {key: (old, new)} allowed).

    Refused: whatever changes the model's or the optimizer's shape (the architecture, the text
    encoder whose width the text projection takes, the optimizer kind, the REPA projector), or makes
    it another run (its data source; a moved data.path is allowed). Loading such a checkpoint would either fail deep inside DCP or, worse,
    load partially and train on silently with fresh blocks. Everything else (steps, learning rate,
    cadences, sampling, evaluation, parallelism) may change, and is printed."""
    refused = {}
    old_m, new_m = model_fields(saved), model_fields(new)
    for k in old_m:
        if old_m[k] != new_m[k]:
            refused[f"model.{k}"] = (old_m[k], new_m[k])
    pairs: list[tuple[str, object, object]] = [
        ("text.encoder", saved.text.encoder, new.text.encoder),
        ("optimizer.name", saved.optimizer.name, new.optimizer.name),
        ("data.source", saved.data.source, new.data.source),
        ("routing.kind", saved.routing.kind, new.routing.kind),  # SPRINT's fusion is part of the model
    ]
    if saved.train.lora.rank is not None or new.train.lora.rank is not None:
        # the adapters' shapes and scale, and the frozen weights under them (a checkpoint holds only the adapters)
        old_l, new_l = saved.train.lora, new.train.lora
        pairs += [
            ("train.lora.rank", old_l.rank, new_l.rank),
            ("train.lora.alpha", old_l.alpha, new_l.alpha),
            ("train.lora.targets", old_l.targets, new_l.targets),
            ("run.init_from", saved.run.init_from, new.run.init_from),
            ("model.init", saved.model.init, new.model.init),
        ]
    old_p, new_p = has_repa_projector(saved), has_repa_projector(new)
    if old_p != new_p:
        pairs.append(("repa.weight", "on" if old_p else "off", "on" if new_p else "off"))
    elif new_p:
        pairs.append(("repa.projector", saved.repa.projector, new.repa.projector))
        if saved.repa.projector == "mlp":  # the only projector with a hidden width
            pairs.append(("repa.hidden", repa_hidden(saved), repa_hidden(new)))
        pairs.append(("repa.teacher", saved.repa.teacher, new.repa.teacher))
    refused.update({k: (a, b) for k, a, b in pairs if a != b})
    old_flat, new_flat = _flat(to_dict(saved)), _flat(to_dict(new))
    allowed = {}
    for k in sorted(set(old_flat) | set(new_flat)):
        # model.* were compared as the resolved architecture above: a preset named differently
        # that builds the same model is no change
        if old_flat.get(k) != new_flat.get(k) and k not in refused and not k.startswith("model."):
            allowed[k] = (old_flat.get(k), new_flat.get(k))
    return refused, allowed


def repa_hidden(cfg: Config) -> int:
    """The REPA projector's hidden width: explicit, or twice the model's width. A fixed 2048 (REPA's
    SiT-XL/2 value, the speedrun's) on the 256-wide CPU default is 4.9M parameters beside a 6.4M
    model and about doubles the FLOPs of a training image."""
    return cfg.repa.hidden if cfg.repa.hidden is not None else 2 * model_fields(cfg)["hidden_size"]


def repa_block(cfg: Config) -> int:
    """The block whose output REPA aligns: explicit, or the recipe's 7 of 16 scaled to the depth."""
    depth = model_fields(cfg)["depth"]
    block = cfg.repa.block if cfg.repa.block is not None else max(0, round(8 * depth / 16) - 1)
    if not 0 <= block < depth:
        raise ConfigError("repa.block", f"block {block} is outside the model's blocks 0..{depth - 1}")
    return block
