"""Numeric precision on this device: the autocast dtype of `hardware.precision`, and whether the CPU
computes bf16 natively (Muon's Newton-Schulz runs in bf16 by default)."""

from __future__ import annotations

import torch

from pixelrun.config import Config


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `hardware.precision` on this device (None = plain fp32). auto is bf16 on
    CUDA only: on CPUs with native bf16 the default's whole step ran 1.44x faster on one VM and slower
    on another (docs/benchmarks.md), so the CPU keeps fp32 unless asked."""
    p = cfg.hardware.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def text_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The frozen text encoder's compute dtype for `text.precision` on this device. A frozen tower's
    bf16 rounding cannot destabilise training, so auto takes bf16 wherever it is native."""
    p = cfg.text.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" or native_cpu_bf16() else "fp32"
    return torch.bfloat16 if p == "bf16" else torch.float32


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
