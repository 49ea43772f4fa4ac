"""A checkpoint opened for inference: its config (with the stage it was saved in, and overrides) and
the model and text encoder loaded from it, for `pixelrun sample`, `pixelrun eval` and `pixelrun
export`. Images are made from them with `pixelrun.diffusion.generate.generate`.

Every reader verifies what it opens as training does (`ReadChoice`, pixelrun/infra/checkpoint_verify.py):
from a run directory, the newest checkpoint whose files match their manifest and whose weights are
finite, each newer one skipped with one line saying why (nothing in the run folder is moved); a
checkpoint asked for by name that fails is refused in one line naming the file. A damaged file is
one line, never a traceback."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from pixelrun.config import Config, ConfigError, with_overrides
from pixelrun.config.schema import LoRAConfig
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint import READ_ERRORS, failure
from pixelrun.infra.checkpoint_verify import ReadChoice
from pixelrun.infra.distributed import resolve_device
from pixelrun.model.denoiser import PRXDenoiser, model_from_config
from pixelrun.model.lora import add_adapters, is_adapter_key, lora_on, merge_adapters
from pixelrun.model.text import TextEncoder, text_encoder

Checkpoint = str | Path | ReadChoice  # a path as the user gave it, or one already opened (and verified)


def note(line: str) -> None:
    """A reader's word on what it skipped: stderr, so stdout stays the command's output."""
    print(f"pixelrun: {line}", file=sys.stderr, flush=True)


def open_checkpoint(checkpoint: Checkpoint, say=note) -> ReadChoice:
    """The checkpoint a reader opens (verified once: pass the result on to the functions below)."""
    return checkpoint if isinstance(checkpoint, ReadChoice) else ReadChoice.open(checkpoint, say)


def checkpoint_config(checkpoint: Checkpoint, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Path, int]:
    """(config, checkpoint dir, text width): the checkpoint's own config with ``overrides`` applied,
    read without loading any weights, so settings can be checked before the work starts."""
    path = open_checkpoint(checkpoint).path
    try:
        saved, text_dim = ckpt.saved_config(path)
    except ckpt.CheckpointError as e:  # an exported model's file
        raise ConfigError("--checkpoint", str(e)) from None
    return with_overrides(saved, overrides), path, text_dim


def check_ema_decay(path: Path, weights: str, decay: float | None) -> None:
    """--ema-decay names one EMA of the checkpoint's ema.decays: refused in one line, before any
    weights are read, when it keeps no EMA of that decay, when the raw weights are asked for, or
    when the checkpoint is an exported model (one set of weights)."""
    if decay is None:
        return
    if weights != "ema":
        raise ConfigError("--ema-decay", f"chooses among the EMA weights; the {weights} weights have no decay")
    if not ckpt.is_complete(path):
        raise ConfigError("--ema-decay", f"{path} is an exported model: it holds one set of weights")
    try:
        ckpt.ema_prefix(path, decay)
    except ValueError as e:
        raise ConfigError("--ema-decay", str(e)) from None


def load_model(
    checkpoint: Checkpoint,
    weights: str = "ema",
    overrides: list[str] | tuple[str, ...] = (),
    decay: float | None = None,
    merge: bool = True,
) -> tuple[PRXDenoiser, Config, Path]:
    """(model on the CPU, config, checkpoint dir): the weights of the checkpoint (the EMA of `decay`;
    None = the run's first), or of the next older one where they cannot be read or hold a NaN or an
    infinity (a run directory; one line says so), or a refusal in one line (a checkpoint asked for
    by name; no usable one left).

    A LoRA run's checkpoint holds its adapters alone: they are put on the base weights of its
    run.init_from and, with `merge`, merged into them (W + alpha / rank B @ A), giving a plain model
    whose config says no LoRA; without `merge` (`export --format lora`) the adapters stay apart."""
    choice = open_checkpoint(checkpoint)
    while True:
        cfg, path, text_dim = checkpoint_config(choice, overrides)
        check_ema_decay(path, weights, decay)
        model = model_from_config(cfg, text_dim)
        lora = lora_on(cfg) and ckpt.is_complete(path)
        if lora:
            _load_lora_base(cfg, path, model)
        try:
            ckpt.load_weights(path, model, weights, decay, select=is_adapter_key if lora else None)
        except READ_ERRORS as e:  # DCP, torch.load and safetensors raise many kinds on a damaged file
            choice = choice.skip(f"its {weights} weights cannot be read from {_weights_file(path)} ({failure(e)})")
            continue
        if lora and merge:
            merge_adapters(model)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=LoRAConfig()))
        bad = ckpt.first_nonfinite(model.state_dict())
        if bad is None:
            return model, cfg, path
        # images from such weights are black or noise: never made, nor exported
        choice = choice.skip(f"the {weights} weights hold non-finite values ({bad}); they cannot make images")


def _load_lora_base(cfg: Config, path: Path, model: PRXDenoiser) -> None:
    """The frozen weights a LoRA checkpoint's adapters were trained on (its model.init's or
    run.init_from's, as the run read them: pixelrun/run/resume.py, `base_loader`), then the adapters,
    fresh, to load into."""
    if cfg.model.init:  # a released diffusers model (pixelrun/model/import_diffusers.py)
        from pixelrun.model.import_diffusers import load_into, locate

        load_into(locate(cfg.model.init), model)
        add_adapters(model, cfg.train.lora)
        return
    base = cfg.run.init_from
    if not base:
        raise ConfigError("run.init_from", f"{path} is a LoRA checkpoint and its config names no base weights")
    try:
        source = ReadChoice.open(base, note).path
        ckpt.load_weights(source, model, "ema")
    except ConfigError as e:
        raise ConfigError("run.init_from", f"the base weights of the LoRA checkpoint {path}: {e}") from None
    except READ_ERRORS as e:
        raise ConfigError(
            "run.init_from", f"the base weights of the LoRA checkpoint {path} cannot be read from {base} ({failure(e)})"
        ) from None
    add_adapters(model, cfg.train.lora)


def _weights_file(path: Path) -> str:
    if (path / ckpt.EXPORT_FILE).is_file():
        return ckpt.EXPORT_FILE
    return ", ".join(sorted(p.name for p in path.glob("*.distcp"))) or "its .distcp files"


def load_for_inference(
    checkpoint: Checkpoint,
    weights: str = "ema",
    device: str = "auto",
    overrides: list[str] | tuple[str, ...] = (),
    decay: float | None = None,
) -> tuple[PRXDenoiser, TextEncoder, Config, Path]:
    """(model, text encoder, config, checkpoint dir) from a run directory, a checkpoint directory
    (saved on any number of ranks) or an exported model. Sampling defaults come from the
    checkpoint's own config; `overrides` may change them. `decay`: which EMA (--ema-decay)."""
    dev = resolve_device(device, "--device")
    model, cfg, path = load_model(checkpoint, weights, overrides, decay)
    encoder = text_encoder(cfg, dev)
    return model.to(dev).eval().requires_grad_(False), encoder, cfg, path
