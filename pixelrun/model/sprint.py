"""SPRINT (Park et al. 2025, "Sparse-Dense Residual Fusion for Efficient Diffusion Transformers"):
`routing.kind: sprint`, the alternative to TREAD that the PRX recipe names.

Semantics, over the routed span start..end (the same span, ratio and masks as TREAD,
pixelrun/model/routing.py):

- the blocks before `start` see every token; their output is the *dense* stream [B, N, D];
- blocks start..end run on the kept tokens only (a Routing's `keep`, as TREAD);
- after block `end` a full-length *deep* stream is rebuilt: the span's outputs at the kept positions,
  a learned mask token at every dropped one; and the next block reads
  `fuse([dense ‖ deep])`, a Linear(2D -> D) with a bias;
- at sampling every token is kept (no Routing) and the fusion still runs;
- path-drop guidance (sampling.py, guidance mode "pathdrop") keeps no token at all: the span's blocks
  are skipped and the deep stream is the mask token everywhere (`model.routing.path_drop_routing`);
- path-drop learning (`routing.path_drop`; PRX's SPRINT has none): a fraction of
  the training samples gets that same deep stream, so the weak branch of the guidance is a function the
  model was trained to compute. The span still runs on their kept tokens (a per-sample skip would
  split the batch), so the FLOPs are those of SPRINT without it.

As PRX does it: Photoroom/PRX, prx/algorithm/sprint.py, class `SPRINT`: `add_new_pipeline_modules`
adds the fusion `nn.Linear(2 * hidden, hidden, bias=True)` and the mask token (a zero-initialised
(1, 1, hidden) parameter), and `_post_route_end` builds the deep stream (the mask token expanded to
the full length, the span's outputs scattered at the visible indices) and returns
`fuse(cat([dense, deep], -1))`; `_pre_route_start` keeps every token when the model is not training
but still fuses. Here the fusion is a submodule of the denoiser (`PRXDenoiser.sprint`) called by its
forward, not a hook; its Linear is initialised as every other Linear of the model
(`PRXDenoiser.reset_parameters`).
"""

from __future__ import annotations

import torch
from torch import nn

from pixelrun.config import Config, routing_span


class SprintFusion(nn.Module):
    """The fusion after block `end` of the span start..end: `fuse([dense ‖ deep])`, with the mask
    token at the dropped positions of the deep stream."""

    def __init__(self, dim: int, span: tuple[int, int]):
        super().__init__()
        self.start, self.end = int(span[0]), int(span[1])
        self.fuse = nn.Linear(2 * dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def deep_stream(self, deep: torch.Tensor, keep: torch.Tensor | None, n_tokens: int) -> torch.Tensor:
        """The span's output [B, K, D] at its kept positions `keep` [B, K] of a full-length [B, N, D]
        stream, the mask token elsewhere; `keep` None: every token was kept, `deep` is returned."""
        if keep is None:
            return deep
        b, _, d = deep.shape
        full = self.mask_token.to(deep.dtype).expand(b, n_tokens, d).contiguous()
        return full.scatter(1, keep[..., None].expand(-1, -1, d), deep)

    def forward(
        self, dense: torch.Tensor, deep: torch.Tensor, keep: torch.Tensor | None, dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """dense [B, N, D] (the input of block `start`), deep [B, K, D] (the output of block `end`);
        `dropped` [B] bool: those samples' deep stream is the mask token everywhere (path-drop learning)."""
        deep = self.deep_stream(deep, keep, dense.shape[1]).to(dense.dtype)
        if dropped is not None:
            deep = torch.where(dropped[:, None, None], self.mask_token.to(deep.dtype), deep)
        return self.fuse(torch.cat([dense, deep], dim=-1))


def sprint_span(cfg: Config) -> tuple[int, int] | None:
    """The span SPRINT's fusion closes (`ModelConfig.sprint_span`), or None when the config routes
    with TREAD (or not at all): the fusion is part of the architecture, ratio 0 included."""
    return routing_span(cfg) if cfg.routing.kind == "sprint" else None
