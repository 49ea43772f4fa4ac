"""Data sources. Every source yields `Batch` objects and can save / restore its position."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W] in [-1, 1]; one size per batch (one bucket)
    captions: list[str]
