"""`model.init`: start a run from a released diffusers model, the exact inverse of the export
(pixelrun/tools/export_diffusers.py, `to_diffusers_transformer`).

It reads a `PRXTransformer2DModel` folder (config.json and diffusion_pytorch_model.safetensors, or
its sharded index), or the `transformer/` folder of a `PRXPixelPipeline`, local or by Hugging Face
id. The architecture is its config.json's; the tensors load under the same names (the denoiser
keeps diffusers' names parameter for parameter), each checked by name and shape first. What
pixelrun's denoiser cannot be is refused in one line naming `model.init`: a latent-space PRX
model (a VAE's channels, patch 2 without a bottleneck), other RoPE or time-embedding constants.

    cfg, folder = resolve(cfg)            # before any work: the architecture into the config
    check_text_width(folder, encoder.dim) # once the text encoder is known
    state = read_weights(folder, expected_shapes)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pixelrun.config import Config, ConfigError, config_from_dict, to_dict
from pixelrun.infra import hub

KEY = "model.init"
CLASS = "PRXTransformer2DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
# A hub snapshot takes the transformer only: a pipeline's text encoder (several GB) is not read.
HUB_FILES = ["model_index.json", "config.json", "diffusion_pytorch_model*", "transformer/*"]
# PRXTransformer2DModel.__init__'s defaults (diffusers/models/transformers/transformer_prx.py), for
# a key its config.json leaves out; pixelrun's denoiser has the constants on the right fixed.
OPTIONAL = {"axes_dim": None, "bottleneck_size": None, "resolution_embeds": False}
FIXED = {"theta": 10000, "time_factor": 1000.0, "time_max_period": 10000}
# config.json key -> pixelrun's model.* key
ARCH = {
    "patch_size": "patch_size",
    "hidden_size": "hidden_size",
    "depth": "depth",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "bottleneck_size": "bottleneck_size",
    "resolution_embeds": "resolution_embeds",
}


def _fail(message: str) -> ConfigError:
    return ConfigError(KEY, message)


def locate(spec: str) -> Path:
    """The folder holding the transformer's config.json: `spec/transformer` (a pipeline) or `spec`."""
    root = Path(os.path.expanduser(spec)) if hub.is_local(spec) else _snapshot(spec)
    if not root.is_dir():
        raise _fail(f"{spec}: no such folder")
    for folder in (root / "transformer", root):
        if (folder / "config.json").is_file():
            return folder
    raise _fail(
        f"{spec} is neither a diffusers pipeline folder (transformer/config.json) nor a {CLASS} folder (config.json)"
    )


def _snapshot(spec: str) -> Path:
    """A hub id's files (the transformer's only), from the cache when offline, as the metric
    networks are found (pixelrun/evaluation/evaluate.py, `_hub_kwargs`): no half-minute of retries."""
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE or not hub.reachable(constants.ENDPOINT)
    try:
        return Path(snapshot_download(spec, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as e:  # not cached, no such repository, not a valid id: each one line
        if offline:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} does not answer"
            raise _fail(
                f"{spec!r} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                f"and {why}: download it where there is a network (hf download {spec}) or give a local path"
            ) from None
        raise _fail(f"{spec!r} cannot be downloaded: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise _fail(f"{folder}/config.json cannot be read: {e}") from None
    name = config.get("_class_name", CLASS)
    if name != CLASS:
        raise _fail(f"{folder} holds a {name}, not a {CLASS}")
    return config


def architecture(folder: Path) -> tuple[dict, int]:
    """(pixelrun's model.* fields, the text width) of the transformer in `folder`, or one line why
    pixelrun's denoiser cannot be it."""
    c = {**OPTIONAL, **FIXED, **read_config(folder)}
    need = [k for k in ("in_channels", "context_in_dim", *ARCH) if k not in c]
    if need:
        raise _fail(f"{folder}/config.json has no {need[0]}")
    if c["in_channels"] != 3 or (c["bottleneck_size"] is None and c["patch_size"] <= 2):
        raise _fail(
            f"{folder} is a latent-space PRX model (in_channels {c['in_channels']}, patch {c['patch_size']}, "
            f"bottleneck {c['bottleneck_size']}): it denoises a VAE's latents, and pixelrun trains in "
            f"pixel space (3 channels), so it cannot train it"
        )
    head_dim = c["hidden_size"] // c["num_heads"]
    if c["axes_dim"] is not None and list(c["axes_dim"]) != [head_dim // 2, head_dim // 2]:
        raise _fail(f"{folder}: axes_dim {c['axes_dim']}; pixelrun's 2-D RoPE splits a head in two equal halves")
    for k, v in FIXED.items():
        if float(c[k]) != float(v):
            raise _fail(f"{folder}: {k} is {c[k]}; pixelrun's denoiser has {v}")
    fields = {ours: c[theirs] for theirs, ours in ARCH.items()}
    fields["resolution_embeds"] = "vec" if c["resolution_embeds"] else "none"
    fields["pos_embed"] = "none"  # PRXTransformer2DModel has RoPE only
    fields["pixel_head"] = 0  # and a linear patch head
    return fields, int(c["context_in_dim"])


def resolve(cfg: Config) -> tuple[Config, Path | None]:
    """`cfg` with model.init's architecture as explicit model.* values (what the run's config.yaml
    records, so a resume and `pixelrun sample` need no download), and the transformer's folder.
    An explicit model.* value, or a preset other than the default, that differs is refused."""
    if not cfg.model.init:
        return cfg, None
    from pixelrun.config import PRESETS

    folder = locate(cfg.model.init)
    fields, _ = architecture(folder)
    # the default preset stands for "not chosen"; another one was chosen, and must be the import's
    preset = {"resolution_embeds": "none", **PRESETS[cfg.model.preset]} if cfg.model.preset != "tiny" else {}
    for k, v in fields.items():
        given = getattr(cfg.model, k)
        if given is not None and given != v:
            raise ConfigError(f"model.{k}", f"is {given} but model.init {cfg.model.init} has {k} {v} (its config.json)")
        if given is None and k in preset and preset[k] != v:
            raise ConfigError(
                "model.preset",
                f"{cfg.model.preset} has {k} {preset[k]} but model.init {cfg.model.init} has {k} {v} (its config.json)",
            )
    data = to_dict(cfg)
    data["model"].update(fields)
    return config_from_dict(data), folder


def check_text_width(folder: Path, text_dim: int, encoder: str) -> None:
    _, width = architecture(folder)
    if width != text_dim:
        raise _fail(
            f"{folder}'s text projection takes {width}-wide embeddings (context_in_dim) but text.encoder "
            f"{encoder} gives {text_dim}-wide ones: use the text encoder it was trained with"
        )


def read_weights(folder: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The transformer's tensors, every one checked against `expected` (name -> shape, the
    denoiser's state dict, in its order) before any is used; the first mismatch is one line."""
    from safetensors.torch import load_file

    if (folder / INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise _fail(f"{folder / INDEX} cannot be read: {e}") from None
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise _fail(f"{folder} has no {WEIGHTS} (nor its sharded {INDEX})")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except Exception as e:  # safetensors raises several kinds on a damaged or missing file
            raise _fail(f"{folder / name} cannot be read: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    check_names_and_shapes(folder, state, expected)
    return state


def load_into(folder: Path, model: torch.nn.Module) -> None:
    """model.init's weights into a plain (unsharded) denoiser, each checked by name and shape; weights
    holding a NaN or an infinity are refused in one line. A LoRA run's frozen base, read again by every
    session and by `sample`, `eval` and `export` of its checkpoints (which hold the adapters alone)."""
    state = read_weights(folder, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise _fail(f"{folder}: its weights hold non-finite values ({bad})")
    model.load_state_dict(state)


def check_names_and_shapes(folder: Path, state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in state:
            raise _fail(f"{folder}: tensor {name} {list(shape)} of the denoiser is missing from its weights")
        if tuple(state[name].shape) != tuple(shape):
            raise _fail(
                f"{folder}: tensor {name} has shape {list(state[name].shape)} in its weights but "
                f"{list(shape)} in the denoiser its config.json describes"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise _fail(f"{folder}: tensor {extra[0]} of its weights has no place in pixelrun's denoiser{more}")
