"""Export a trained model as a diffusers `PRXPixelPipeline` directory, or a LoRA run's adapters
alone as a diffusers-style LoRA file (`export_lora`).

The directory holds the denoiser as `PRXTransformer2DModel` (same parameter names and shapes, so
the state dict loads strictly), the frozen text encoder and its tokenizer as saved by transformers,
a `FlowMatchEulerDiscreteScheduler` with our sampler's shift, and the pipeline's own settings: the
initial-noise scale, the prompt token budget and the training resolution. Called with the same
prompt, seed (`generator=torch.Generator().manual_seed(seed)`), steps and CFG scale, and with
`use_resolution_binning=False` (diffusers bins only 1024px models), the pipeline reproduces
`pixelrun sample`.

What the pipeline cannot express is refused with one error naming the config key:
- `routing.kind=sprint`: SPRINT's fusion Linear and mask token (pixelrun/model/sprint.py) run at
  sampling, and `PRXTransformer2DModel` has no place for them.
- `model.resolution_embeds=token`: two resolution tokens before the text (pixelrun/model/resolution.py);
  the diffusers model's resolution embedding is the "vec" mode only.
- `model.pos_embed=sincos`: a fixed position table added to the image tokens, which the diffusers
  model does not add (it has RoPE only).
- `model.pixel_head` > 0: convolutions over the predicted pixels after the patch head; the diffusers
  model's head is the linear patch head alone.
- `sample.spacing=linear`: the pipeline calls `scheduler.set_timesteps(steps)`, whose grid is our
  "diffusers" spacing; no scheduler setting gives the linear one for every step count.
- `objective.t_clamp` other than 0.05: the pipeline converts x-predictions to velocities with a
  hard-coded clamp of 0.05.
- a text encoder that is not a standalone transformers model (an encoder taken out of an
  encoder-decoder model by `get_encoder()`).
Not refused, but worth knowing: the pipeline guides only with classic CFG (no self-guidance), and
it cleans prompts with ftfy and HTML unescaping before tokenizing; pixelrun does the same for the
Qwen3-VL tower and T5Gemma (pixelrun/model/text.py, prompt_cleaner), not for other encoders, whose
prompts that this cleaning changes (surrounding spaces, HTML entities, mojibake) encode differently.
The text encoder is written under its own parameter names (checked after writing), so a Qwen3-VL
tower taken out of the full Qwen3-VL checkpoint loads as the `Qwen3VLTextModel` it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pixelrun.config import Config, ConfigError, RunFailed, model_fields, to_yaml
from pixelrun.infra.checkpoint import atomic_dir, refuse_nonfinite

#: The clamp of t in the x -> velocity conversion that PRXPixelPipeline hard-codes.
PIPELINE_T_CLAMP = 0.05
NUM_TRAIN_TIMESTEPS = 1000  # what sampling.time_grid assumes for the "diffusers" spacing


def check_config(cfg: Config) -> None:
    """Raise ConfigError (one line, naming the key) for settings PRXPixelPipeline cannot reproduce;
    needs no weights, so the CLI calls it before loading anything."""
    if cfg.routing.kind == "sprint":  # no override helps: the fusion is part of the trained model
        raise ConfigError(
            "routing.kind",
            "sprint adds a fusion Linear and a mask token after the routed span, which diffusers' "
            "PRXTransformer2DModel cannot hold: a SPRINT model cannot be exported as a PRXPixelPipeline",
        )
    if cfg.model.resolution_embeds == "token":  # trained with them, so the model needs them too
        raise ConfigError(
            "model.resolution_embeds",
            "token puts two resolution tokens before the text tokens, which diffusers' "
            "PRXTransformer2DModel has no place for (its resolution_embeds is the vec mode): "
            "a token-mode model cannot be exported as a PRXPixelPipeline",
        )
    pos_embed = model_fields(cfg)["pos_embed"]
    if pos_embed != "none":
        raise ConfigError(
            "model.pos_embed",
            f"{pos_embed} adds a position table to the image tokens, which diffusers' "
            "PRXTransformer2DModel does not (RoPE only): such a model cannot be exported as a PRXPixelPipeline",
        )
    if model_fields(cfg)["pixel_head"]:
        raise ConfigError(
            "model.pixel_head",
            "adds convolutions over the predicted pixels after the patch head, which diffusers' "
            "PRXTransformer2DModel does not have: such a model cannot be exported as a PRXPixelPipeline",
        )
    if cfg.sample.spacing != "diffusers":
        raise ConfigError(
            "sample.spacing",
            f"{cfg.sample.spacing!r} cannot be expressed by PRXPixelPipeline, whose "
            "FlowMatchEulerDiscreteScheduler visits the 'diffusers' time grid; export "
            "with the override sample.spacing=diffusers",
        )
    if cfg.sample.sampler != "euler" or cfg.sample.guidance_interval:  # its scheduler: Euler, CFG at every step
        key = "sample.sampler" if cfg.sample.sampler != "euler" else "sample.guidance_interval"
        raise ConfigError(
            key,
            "PRXPixelPipeline samples with Euler steps and guidance at every step; export with the "
            "overrides sample.sampler=euler 'sample.guidance_interval=[]'",
        )
    if abs(cfg.objective.t_clamp - PIPELINE_T_CLAMP) > 1e-12:
        raise ConfigError(
            "objective.t_clamp",
            f"is {cfg.objective.t_clamp} but PRXPixelPipeline hard-codes "
            f"{PIPELINE_T_CLAMP} in its x-prediction to velocity conversion",
        )


def check_expressible(cfg: Config, text_model) -> None:
    """check_config, and the text encoder must be a model PRXPixelPipeline can save and load."""
    from transformers import PreTrainedModel

    check_config(cfg)
    if not isinstance(text_model, PreTrainedModel):
        raise ConfigError(
            "text.encoder",
            f"{cfg.text.encoder!r} loads as {type(text_model).__name__}, not a "
            "standalone transformers model that PRXPixelPipeline can save and load",
        )


def to_diffusers_transformer(model):
    """A `PRXTransformer2DModel` with the denoiser's layout and weights (checked by one forward pass)."""
    from diffusers import PRXTransformer2DModel

    m = model.cfg
    if m.in_channels != 3 or m.head_dim % 4 or float(m.rope_theta) != int(m.rope_theta):
        raise ConfigError("model", f"layout {m} cannot be expressed by PRXTransformer2DModel")
    ref = PRXTransformer2DModel(
        in_channels=m.in_channels,
        patch_size=m.patch_size,
        context_in_dim=m.text_dim,
        hidden_size=m.hidden_size,
        mlp_ratio=m.mlp_ratio,
        num_heads=m.num_heads,
        depth=m.depth,
        axes_dim=[m.head_dim // 2, m.head_dim // 2],
        theta=int(m.rope_theta),
        time_factor=m.time_factor,
        time_max_period=int(m.time_max_period),
        bottleneck_size=m.bottleneck_size or None,
        resolution_embeds=m.resolution_embeds == "vec",
    )
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    try:
        ref.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(
            "model", "the weights do not load into PRXTransformer2DModel: " + str(e).splitlines()[0]
        ) from None
    ref.eval().requires_grad_(False)
    # One forward pass of both on a small random input: the layouts must agree, not only the names.
    g = torch.Generator().manual_seed(0)
    p = m.patch_size
    x = torch.randn(2, m.in_channels, 2 * p, p, generator=g)
    t = torch.tensor([0.3, 0.8])
    txt = torch.randn(2, 3, m.text_dim, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ours_model = _cpu_fp32_copy(model)
    with torch.no_grad():
        ours = ours_model(x, t, txt, mask).prediction
        theirs = ref(x, t, txt, attention_mask=mask, return_dict=False)[0]
    err = (ours - theirs).abs().max().item()
    if not err <= 1e-3 * max(1.0, ours.abs().max().item()):
        raise ConfigError(
            "model",
            f"PRXTransformer2DModel computes something else than our denoiser "
            f"(max difference {err:.3g} on a test input)",
        )
    return ref


def _check_text_encoder_names(folder: Path, text_model) -> None:
    """Every tensor written for the text encoder must be one of its parameters by name: the pipeline
    loads it with the class's from_pretrained, which would leave parameters under another name
    randomly initialised without an error (tied copies may be written once, so a subset)."""
    from safetensors import safe_open

    written: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            written.update(sf.keys())
    foreign = sorted(written - set(text_model.state_dict()))
    if foreign or not written:  # the export is not swapped in: the target stays as it was
        raise RunFailed(
            f"export refused: the text encoder was written under names its class does not load, e.g. {foreign[:2]}"
            if foreign
            else f"export refused: no text encoder weights were written in {folder}"
        )


def _cpu_fp32_copy(model):
    """The model itself when it already is fp32 on the CPU (no second copy of a large model)."""
    import copy

    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()) and not model.training:
        return model
    return copy.deepcopy(model).float().cpu().eval()


def export_diffusers(model, encoder, cfg: Config, out: str | Path, marker: dict | None = None) -> Path:
    """Write a `PRXPixelPipeline.from_pretrained`-loadable directory, atomically (temporary name,
    then swapped in). `model` is our denoiser, `encoder` the `TextEncoder` it was trained with;
    `marker` identifies the export (`checkpoint.export_marker`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline

    check_expressible(cfg, encoder.model)
    # never a NaN or an infinity written (the loaded weights were checked: this is the last look)
    refuse_nonfinite({"transformer": model.state_dict(), "text_encoder": encoder.model.state_dict()}, "the weights")
    transformer = to_diffusers_transformer(model)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=cfg.sample.shift)
    pipe = PRXPixelPipeline(
        transformer=transformer,
        scheduler=scheduler,
        text_encoder=encoder.model,
        tokenizer=encoder.tokenizer,
        default_sample_size=cfg.data.resolution,
        prompt_max_tokens=cfg.text.max_tokens,
        noise_scale=cfg.objective.noise_scale,
    )
    with atomic_dir(out, marker) as tmp:
        # diffusers' lazy top-level module shows mypy a class without DiffusionPipeline's methods
        pipe.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[attr-defined]
        _check_text_encoder_names(tmp / "text_encoder", encoder.model)
        (tmp / "pixelrun_config.yaml").write_text(to_yaml(cfg))  # provenance and sampling defaults
    return Path(out)


def export_lora(model, cfg: Config, out: str | Path, marker: dict | None = None) -> Path:
    """The adapters of a LoRA run alone, atomically: `pytorch_lora_weights.safetensors` in the layout
    diffusers' LoRA files use (PEFT's `lora_A` / `lora_B` names under the ``transformer.`` prefix,
    the `LoraConfig` in the ``lora_adapter_metadata`` field) and the run's config. diffusers 0.42's
    `PRXPixelPipeline` has no `load_lora_weights` (nor `PRXTransformer2DModel` a PEFT adapter mixin):
    peft loads the file into a `PRXTransformer2DModel` (docs/lora.md)."""
    from safetensors.torch import save_file

    from pixelrun.model.lora import LORA_FILE, diffusers_lora_metadata, diffusers_lora_state

    state = diffusers_lora_state(model)
    refuse_nonfinite(state, "the adapters")
    with atomic_dir(out, marker) as tmp:
        save_file(state, str(tmp / LORA_FILE), metadata=diffusers_lora_metadata(cfg.train.lora))
        (tmp / "pixelrun_config.yaml").write_text(to_yaml(cfg))
    return Path(out)
