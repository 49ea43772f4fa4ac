"""A checkpoint opened for inference: its config (with the stage it was saved in, and overrides) and
the model and text encoder loaded from it, for `pixelrun sample`, `pixelrun eval` and `pixelrun
export`. Images are made from them with `pixelrun.diffusion.generate.generate`."""

from __future__ import annotations

from pathlib import Path

from pixelrun.config import Config, ConfigError, with_overrides
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import resolve_device
from pixelrun.model.denoiser import PRXDenoiser, model_from_config
from pixelrun.model.text import TextEncoder, text_encoder


def checkpoint_config(checkpoint: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Path, int]:
    """(config, checkpoint dir, text width): the checkpoint's own config with ``overrides`` applied,
    read without loading any weights, so settings can be checked before the work starts."""
    path = ckpt.resolve_checkpoint(checkpoint)
    saved, text_dim = ckpt.saved_config(path)
    return with_overrides(saved, overrides), path, text_dim


def load_for_inference(
    checkpoint: str, weights: str = "ema", device: str = "auto", overrides: list[str] | tuple[str, ...] = ()
) -> tuple[PRXDenoiser, TextEncoder, Config, Path]:
    """(model, text encoder, config, checkpoint dir) from a run directory, a checkpoint directory
    (saved on any number of ranks) or an exported model. Sampling defaults come from the
    checkpoint's own config; `overrides` may change them."""
    cfg, path, text_dim = checkpoint_config(checkpoint, overrides)
    dev = resolve_device(device, "--device")
    encoder = text_encoder(cfg, dev)
    model = model_from_config(cfg, text_dim)
    ckpt.load_weights(path, model, weights)
    bad = ckpt.first_nonfinite(model.state_dict())
    if bad is not None:  # images from such weights are black or noise: refuse rather than write them
        raise ConfigError(
            "--checkpoint",
            f"the {weights} weights of {path} hold non-finite values ({bad}); they "
            f"cannot make images: use an earlier checkpoint",
        )
    return model.to(dev).eval().requires_grad_(False), encoder, cfg, path
