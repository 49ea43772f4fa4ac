"""Resolution-aware conditioning: the image's (height, width) in pixels, each as a 128-wide
sinusoidal embedding, told to the denoiser in one of two ways (`model.resolution_embeds`):

- "vec": both embeddings concatenated and passed through a two-layer MLP; the denoiser adds the
  result to its time vector, so every block's adaLN modulation knows the size it draws at.
- "token": each side's embedding through its own two-layer MLP, giving two tokens of the model's
  width that the denoiser puts before the projected text tokens (keys and values every image query
  attends to, never masked), so attention can use the size where it helps instead of every
  modulation carrying it. This is PRX's "token" mode (prx/algorithm/resolution_aware.py,
  `ResolutionEmbedder` with `h_embedder` / `w_embedder`, prepended in a wrapper of
  `forward_transformers`, whose prompt embeddings are already `txt_in`'s output, the attention
  mask extended by two ones). diffusers' `PRXTransformer2DModel` has no such tokens, so a "token"
  model is not exported as a PRXPixelPipeline (pixelrun/tools/export_diffusers.py refuses it).

What it computes is diffusers' `PRXResolutionEmbedder.forward` (diffusers/models/transformers/
transformer_prx.py: `get_timestep_embedding(size, 128, max_period, scale=1.0, flip_sin_to_cos=True,
downscale_freq_shift=0)` for each side, [height | width], cast to the time vector's dtype, then
`MLPEmbedder(256, hidden)`), added where `PRXTransformer2DModel.forward` adds it (to the output of
`time_in`). PRX's training code has the same "vec" mode (Photoroom/PRX
prx/algorithm/resolution_aware.py, `ResolutionEmbedder`, attached there by a forward hook on
`time_in`; here it is a plain call in the forward). The parameter names (`resolution_embedder.mlp.
in_layer`, `.out_layer`) are diffusers', so the export and `model.init` map them one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: the width of each side's sinusoidal embedding (diffusers and PRX: 128, so 256 for both sides)
SIDE_FEATURES = 128


def side_embedding(size: torch.Tensor, max_period: float) -> torch.Tensor:
    """[B] sizes -> [B, 128]: [cos | sin] of size * max_period^(-k/64), k = 0..63."""
    half = SIDE_FEATURES // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=size.device) / half)
    args = size.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _MLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class ResolutionEmbedder(nn.Module):
    def __init__(self, hidden_size: int, max_period: float = 10000.0, mode: str = "vec"):
        super().__init__()
        if mode not in ("vec", "token"):
            raise ValueError(f"unknown resolution mode {mode!r}: vec | token")
        self.mode = mode
        self.max_period = max_period
        if mode == "vec":
            self.mlp = _MLP(2 * SIDE_FEATURES, hidden_size)
        else:
            self.h_embedder = _MLP(SIDE_FEATURES, hidden_size)
            self.w_embedder = _MLP(SIDE_FEATURES, hidden_size)

    def forward(self, batch: int, height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """For images of height x width pixels: "vec" [batch, hidden_size]; "token" [batch, 2,
        hidden_size], the height's token first."""
        h = side_embedding(torch.full((batch,), height, dtype=torch.float32, device=device), self.max_period)
        w = side_embedding(torch.full((batch,), width, dtype=torch.float32, device=device), self.max_period)
        if self.mode == "vec":
            return self.mlp(torch.cat([h, w], dim=-1).to(dtype))
        return torch.stack([self.h_embedder(h.to(dtype)), self.w_embedder(w.to(dtype))], dim=1)
