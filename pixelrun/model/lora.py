"""LoRA adapters on the denoiser, through `peft` (docs/lora.md): `train.lora.rank` adapters on the
linears of every transformer block that `train.lora.targets` names, the base weights frozen.

The adapters are injected into the denoiser itself (`peft.inject_adapter_in_model`), not wrapped in a
`PeftModel`: the model stays a `PRXDenoiser` with its own forward (routing, REPA features), and each
targeted `nn.Linear` becomes a peft `lora.Linear` holding it as `base_layer` beside `lora_A` / `lora_B`.
Its output is base(x) + (alpha / rank) * B(A(x)); B starts at zero, so the adapted model starts as
the base model. What trains is exactly the parameters left with `requires_grad` (the optimizer,
the EMA and the checkpoint follow that: pixelrun/training/optim.py, ema.py, state.py).

    model = add_adapters(model, cfg.train.lora)   # base weights loaded first
    merged = merge_adapters(model)                 # W <- W + (alpha / rank) B @ A, a plain PRXDenoiser again
    diffusers_lora_state(model)                    # transformer.<module>.lora_A.weight, ... (the export)
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from pixelrun.config import Config
from pixelrun.config.schema import LoRAConfig

ADAPTER_NAME = "default"  # peft's name of the one adapter
#: what `pixelrun export --format lora` writes: diffusers' file name and metadata key for LoRA weights
#: (diffusers/loaders/lora_base.py, LORA_WEIGHT_NAME_SAFE and LORA_ADAPTER_METADATA_KEY)
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS_PREFIX = "transformer"  # the pipeline component the adapters belong to


def lora_on(cfg: Config) -> bool:
    return cfg.train.lora.rank is not None


def target_pattern(targets: list[str]) -> str:
    """peft's `target_modules` as one regular expression, which peft matches against each module's
    full name: the named linears inside `blocks.<i>.` only (the embedders and the final layer keep
    their weights)."""
    names = "|".join(re.escape(t) for t in dict.fromkeys(targets))
    return rf"blocks\.\d+\.(?:{names})"


def peft_config(lo: LoRAConfig):
    """The peft `LoraConfig` of `train.lora`: no dropout (the step's draws are pixelrun's own, so
    resume stays exact) and no trained biases."""
    from peft import LoraConfig

    assert lo.rank is not None
    alpha = lo.alpha if lo.alpha is not None else lo.rank
    return LoraConfig(
        r=lo.rank,
        # peft annotates an int, and scales by alpha / r: a whole alpha goes as one (the files' metadata)
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,  # type: ignore[arg-type]
        target_modules=target_pattern(lo.targets),
        lora_dropout=0.0,
        bias="none",
    )


def add_adapters(model: nn.Module, lo: LoRAConfig) -> nn.Module:
    """Freeze every weight of `model` and inject the adapters (in place; returned for chaining). The
    adapters' A draws from torch's global generator, seeded by the run."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(peft_config(lo), model, adapter_name=ADAPTER_NAME)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(is_adapter_key(n) for n in trained), trained[:4]
    return model


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict name is an adapter's (peft's `lora_A` / `lora_B`)."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model: nn.Module) -> bool:
    """Whether peft's adapters are in `model`; without peft (the lora extra not installed) none can be."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Each adapted linear replaced by its base linear with W <- W + (alpha / rank) B @ A (peft's own
    `merge`, the arithmetic of `merge_and_unload`), in place: a plain model with the base layout."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])  # safe: refuses a non-finite result
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # set by inject_adapter_in_model; the merged model has no adapter
        del model.peft_config
    return model


def diffusers_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as diffusers' LoRA files hold them (PEFT layout, the component's prefix):
    ``transformer.blocks.0.attention.img_qkv_proj.lora_A.weight``. The denoiser's module names are
    `PRXTransformer2DModel`'s (pixelrun/tools/export_diffusers.py loads one into the other strictly)."""
    out = {}
    for name, p in model.state_dict().items():
        if is_adapter_key(name):
            key = name.replace(f".{ADAPTER_NAME}.", ".")
            out[f"{DIFFUSERS_PREFIX}.{key}"] = p.detach().cpu().contiguous()
    return out


def diffusers_lora_metadata(lo: LoRAConfig) -> dict[str, str]:
    """The safetensors metadata diffusers writes beside LoRA weights: the `LoraConfig` fields, each
    under the component's prefix, as JSON (diffusers/loaders/lora_base.py, `write_lora_layers`)."""
    fields = peft_config(lo).to_dict()
    keep = {k: v for k, v in fields.items() if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "bias")}
    packed = {f"{DIFFUSERS_PREFIX}.{k}": sorted(v) if isinstance(v, set) else v for k, v in keep.items()}
    return {"format": "pt", LORA_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
