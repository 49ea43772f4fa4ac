"""Numeric precision on this device: the autocast dtype of `hardware.precision`, and whether the CPU
computes bf16 natively (Muon's Newton-Schulz runs in bf16 by default)."""

from __future__ import annotations

import torch

from pixelrun.config import Config


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `hardware.precision` on this device (None = plain fp32)."""
    p = cfg.hardware.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 / AMX); without, torch emulates
    them tens of times slower than fp32 (measured in docs/benchmarks.md, Muon on the CPU)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def muon_precision_warning(cfg: Config, device: torch.device) -> str | None:
    """bf16 Newton-Schulz is the default on every device (as torch.optim.Muon runs it), but a CPU
    without native bf16 runs it tens of times slower than fp32: say so rather than let a run crawl."""
    if (
        cfg.optimizer.name == "muon"
        and cfg.optimizer.muon_precision == "bf16"
        and device.type == "cpu"
        and not native_cpu_bf16()
    ):
        return (
            "warning: Muon's Newton-Schulz runs in bf16, which this CPU emulates (no AVX512-BF16/AMX): "
            "tens of times slower than with optimizer.muon_precision=fp32"
        )
    return None
