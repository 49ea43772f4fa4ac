"""The device a run computes on, by name, and its peak: the dense bf16 FLOP/s of known GPUs, the
denominator of MFU in the training log (pixelrun/run/train.py), the bench and the forecast."""

from __future__ import annotations

import platform

import torch

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets, matched on
# torch.cuda.get_device_name() upper-cased; first match wins, so the specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (("A100",), 312e12),  # SXM and PCIe alike
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, None for anything else (CPUs included)."""
    name = device_name.upper()
    for keys, peak in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_peak_flops(device: torch.device) -> float | None:
    """The peak of this device when it is a known GPU; None elsewhere (no made-up CPU peak)."""
    return peak_flops(device_name(device)) if device.type == "cuda" else None
