"""The loss terms a step sums, in the order they are added (the order matters for floating point),
and the networks the tricks build. A new trick is a module beside this one and one line in `TERMS`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pixelrun.config import Config
from pixelrun.tricks import contrastive, flow, perceptual, repa
from pixelrun.tricks.base import Term

TERMS: tuple[Term, ...] = (
    flow.TERM,
    contrastive.TERM,
    repa.TERM,
    perceptual.LPIPS_TERM,
    perceptual.PDINO_TERM,
)

# the tricks that run networks besides the model, each with `uses_networks(cfg)` and `OFF` (the
# overrides that switch it off): pixelrun/training/flops.py counts their FLOPs
WITH_NETWORKS = (repa, perceptual)


class LossNetworks(torch.nn.Module):
    """What the extra loss terms need besides the model, each trick's own: REPA's projector (trained,
    in the Adam group, saved in checkpoints) and teacher, LPIPS and P-DINO's teacher (frozen, never
    trained, never saved). Kept outside the denoiser so parallelism, EMA and export only ever see
    the denoiser itself."""

    def __init__(self, cfg: Config, hidden_size: int, device, stages: Sequence[Config] = ()):
        """Builds what `cfg` (or any of `stages`: a staged run keeps one projector throughout)
        switches on, in this order (each draws its initial weights from torch's generator)."""
        super().__init__()
        every = [cfg, *stages]
        self.repa = repa.build(cfg, every, hidden_size)
        self.lpips = perceptual.build_lpips(cfg, every)
        self.dino = perceptual.build_pdino(cfg, every)
        self.to(device)

    @property
    def projector(self) -> torch.nn.Module | None:
        """REPA's trained projector (None without REPA): what `build_state` trains and saves."""
        return self.repa.projector if self.repa is not None else None

    @property
    def teachers(self) -> bool:
        """Whether any frozen teacher was built."""
        return self.repa is not None or self.lpips is not None or self.dino is not None

    def describe(self, cfg: Config) -> list[str]:
        lines = [*contrastive.describe(cfg), *repa.describe(self.repa, cfg)]
        return lines + perceptual.describe(self.lpips, self.dino, cfg)
