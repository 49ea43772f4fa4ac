"""Every network a run will load, checked once before any work: the text encoder, the REPA and
DINO teachers a stage turns on, and the metric networks its evaluations use. Each unusable one is
listed in a single message with the key that names it, so an offline machine costs one failed run
instead of one per network (each hub id that is neither cached nor reachable used to cost half a
minute of hub retries and a traceback, found one at a time)."""

from __future__ import annotations

import os

from pixelrun.config import Config, ConfigError
from pixelrun.evaluation.evaluate import applicable_metrics
from pixelrun.infra import hub
from pixelrun.teachers.features import EFFICIENTNET_SPECS
from pixelrun.teachers.networks import training_networks


def networks(cfg: Config) -> list[tuple[str, str]]:
    """(key, spec) of every model folder or Hugging Face id this run loads: training's, then the
    metric networks of its evaluations."""
    out = training_networks(cfg)
    if cfg.model.init:  # a diffusers pipeline or transformer (pixelrun/model/import_diffusers.py)
        out.insert(0, ("model.init", cfg.model.init))
    metrics = applicable_metrics(cfg) if cfg.eval.prompts else []
    if "cmmd" in metrics:
        out.append(("eval.clip_model", cfg.eval.clip_model))
    if "dino-mmd" in metrics:
        out.append(("eval.dino_model", cfg.eval.dino_model))
    return [(k, v) for k, v in out if v and v not in EFFICIENTNET_SPECS]


#: the config file that makes a folder or a hub repo the model a key names: model.init's may be a
#: pipeline's (its transformer/config.json) or a bare transformer's; every other key's, config.json
CONFIGS = {"model.init": ("transformer/config.json", "config.json")}
MODEL_CONFIG = ("config.json",)


def problem(spec: str, configs: tuple[str, ...] = MODEL_CONFIG) -> str | None:
    """Why `spec` cannot be loaded here, or None: a path must be a model folder (one of `configs`); a
    hub id must be in the Hugging Face cache or the hub must answer."""
    path = os.path.expanduser(spec)
    if hub.is_local(spec):
        if not os.path.isdir(path):
            return "no such folder"
        found = any(os.path.isfile(os.path.join(path, c)) for c in configs)
        return None if found else f"a folder without {' or '.join(configs)}"
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if any(isinstance(try_to_load_from_cache(spec, c), str) for c in configs):
            return None
    except ValueError:
        return "neither a folder nor a valid Hugging Face id"
    if constants.HF_HUB_OFFLINE:
        return "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    if not hub.reachable(constants.ENDPOINT):
        return f"not in the Hugging Face cache, and {constants.ENDPOINT} does not answer"
    return None


def preflight(cfg: Config) -> None:
    """A ConfigError naming every key whose network cannot be loaded here, all in one line."""
    bad = [
        (key, spec, why)
        for key, spec in networks(cfg)
        if (why := problem(spec, CONFIGS.get(key, MODEL_CONFIG))) is not None
    ]
    if not bad:
        return
    each = "; ".join(f"{key}={spec} ({why})" for key, spec, why in bad)
    raise ConfigError(
        ", ".join(key for key, _, _ in bad),
        f"{len(bad)} network(s) cannot be loaded on this machine: {each}. Download each where there is "
        f"a network (hf download ID) and copy the Hugging Face cache, or set the key to a local folder",
    )
