"""What a run's model states take per GPU, computed from its config (not measured): the weights,
their gradients, the optimizer's moments and the EMA copies, for full training or LoRA, sharded by
FSDP2 over the GPUs. Activations are not counted (they depend on the resolution, the micro-batch and
activation checkpointing: `pixelrun bench` on the GPU measures the peak).

The bytes per parameter, as pixelrun keeps them: fp32 weights (4; bf16 only inside autocast), fp32
gradients (4) of what trains, AdamW's two moments (8) or Muon's one momentum (4, Muon's 2-D block
weights; pixelrun/training/optim.py), and an fp32 copy per EMA decay (4 each) of what trains. Under
LoRA the frozen base is held once; with FSDP2 each EMA copy also holds its own shards of it
(pixelrun/training/ema.py), on one GPU it shares the model's."""

from __future__ import annotations

import torch

from pixelrun.config import Config
from pixelrun.model.denoiser import model_from_config
from pixelrun.model.lora import add_adapters, lora_on
from pixelrun.training.optim import split_parameters

FP32 = 4


def state_memory(cfg: Config, text_dim: int, gpus: int) -> dict:
    """Parameter counts and bytes per GPU of each state (a dict; `format_memory` prints it)."""
    with torch.device("meta"):
        model = model_from_config(cfg, text_dim)
        if lora_on(cfg):
            add_adapters(model, cfg.train.lora)
    total = sum(p.numel() for p in model.parameters())
    muon, adam, _ = split_parameters(model) if cfg.optimizer.name == "muon" else ([], [], None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained = sum(p.numel() for p in trainable)
    if cfg.optimizer.name == "muon":
        moments = FP32 * sum(p.numel() for p in muon) + 2 * FP32 * sum(p.numel() for p in adam)
    else:
        moments = 2 * FP32 * trained
    decays = len(cfg.ema.decays) or 1
    frozen = total - trained
    ema_frozen = frozen if (frozen and gpus > 1) else 0  # FSDP2's EMA copies hold the base's shards too
    states = {
        "weights": FP32 * total,
        "gradients": FP32 * trained,
        "optimizer moments": moments,
        f"EMA ({decays} decay{'s' if decays > 1 else ''})": decays * FP32 * (trained + ema_frozen),
    }
    return {
        "parameters": total,
        "trained": trained,
        "gpus": gpus,
        "lora": lora_on(cfg),
        "bytes_per_gpu": {k: v / gpus for k, v in states.items()},
        "total_per_gpu": sum(states.values()) / gpus,
    }


def format_memory(m: dict, preset: str) -> str:
    gib = 1024**3
    what = "LoRA" if m["lora"] else "full training"
    lines = [
        f"model states of {preset} ({m['parameters']:,} parameters, {m['trained']:,} trained: {what}) per GPU "
        f"on {m['gpus']} GPU{'s (FSDP2)' if m['gpus'] > 1 else ''}, computed from the config:"
    ]
    lines += [f"  {k:<22} {v / gib:8.2f} GiB" for k, v in m["bytes_per_gpu"].items()]
    lines.append(
        f"  {'total':<22} {m['total_per_gpu'] / gib:8.2f} GiB, plus activations (measured by `pixelrun bench`)"
    )
    return "\n".join(lines)
