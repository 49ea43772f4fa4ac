"""TREAD token routing (Krause et al. 2025): which image tokens skip which blocks.

Semantics (docs/recipe.md, "TREAD token routing"):

- A *span* is an inclusive range of block indices `start..end` (0-indexed). Before block `start`,
  each sample's image tokens are split in two: the *kept* tokens go through blocks
  `start`..`end`; the *routed* tokens (routed away, skipping the span) are carried unchanged and
  put back at their original positions after block `end`. Blocks outside the span see all tokens,
  and the loss covers all tokens.
- `ratio` is the fraction of tokens ROUTED AWAY (skipping the span): 0.5 keeps half. The number
  kept is K = round_half_up(n_tokens * (1 - ratio)), at least 1. ratio = 0 means dense: no
  `Routing` at all (`random_routing` returns None), so a dense model runs the exact same code path.
- The mask is random and different for every sample. Its randomness comes only from the
  `torch.Generator` the caller passes in: the same generator state gives the same masks. Masks must
  also differ between micro-batches, steps and ranks; that comes from the caller's generator state
  advancing between calls, and from the caller seeding a separate generator per rank
  (`routing_generator(seed, rank)` does that, with a seed mixed from (seed, rank), so rank r's
  stream is not rank 0's stream shifted and is not correlated with a noise generator seeded with
  the plain `seed`).
- Kept indices are sorted per sample: the gathered sequence keeps raster order, which keeps
  attention memory access local and makes masks easy to compare. Positions are not renumbered:
  a kept token keeps its original 2-D RoPE position (the model gathers the RoPE angles with it).
- Routing is a training-time speed-up. Plain inference is dense; the inference uses are
  self-guidance (sampling.py, guidance mode "self"), which contrasts a dense and a routed pass, and
  SPRINT's path-drop guidance (mode "pathdrop", `path_drop_routing`: no token kept).
- The same masks serve `routing.kind: sprint` (pixelrun/model/sprint.py), which fuses instead of
  putting the routed tokens back.

The default span: Photoroom's PRX config routes blocks 2..12 of 16 (the blog says "2nd to
penultimate"). `span_for_depth` scales that to other depths; see its docstring for the exact rule.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelrun.model.denoiser import Routing

DEFAULT_RATIO = 0.5
# Distinguishes routing seeds from any other stream derived from the same (seed, rank) pair.
_ROUTING_STREAM = 0x7EAD


def kept_count(n_tokens: int, ratio: float) -> int:
    """K, the number of tokens that go through the span: round_half_up(n * (1 - ratio)), >= 1."""
    _check_ratio(ratio)
    return min(n_tokens, max(1, int(np.floor(n_tokens * (1.0 - ratio) + 0.5))))


def _check_ratio(ratio: float):
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"routing ratio (the fraction of tokens that skip the span) must be in [0, 1), got {ratio}")


def random_routing(
    batch: int,
    n_tokens: int,
    ratio: float,
    span: tuple[int, int],
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
) -> Routing | None:
    """A fresh random TREAD routing: per sample, K = kept_count(n_tokens, ratio) kept token indices.

    Returns None when ratio == 0 (dense: the caller passes routing=None to the model). Indices are
    drawn on the generator's device (so a CPU generator gives the same masks whatever the model's
    device), sorted per sample, and moved to `device` if given. The span is not checked against the
    model depth here: build it with `span_for_depth`.
    """
    _check_ratio(ratio)
    start, end = span
    if not 0 <= start <= end:
        raise ValueError(f"routing span must satisfy 0 <= start <= end, got {span}")
    if ratio == 0.0:
        return None
    k = kept_count(n_tokens, ratio)
    scores = torch.rand(batch, n_tokens, generator=generator, device=generator.device)
    keep = scores.argsort(dim=1)[:, :k].sort(dim=1).values
    if device is not None:
        keep = keep.to(device)
    return Routing(keep=keep, start=int(start), end=int(end))


def path_drop_routing(batch: int, span: tuple[int, int], device: torch.device | str | None = None) -> Routing:
    """A routing that keeps no token ([B, 0] `keep`): the model skips blocks span[0]..span[1]. On a
    SPRINT model the deep stream is then the mask token everywhere, the weak branch of path-drop
    guidance (sampling.py, guidance mode "pathdrop")."""
    return Routing(keep=torch.zeros(batch, 0, dtype=torch.long, device=device), start=int(span[0]), end=int(span[1]))


def routed_indices(keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The complement of `keep` [B, K]: the sorted indices [B, n_tokens - K] that skip the span."""
    mask = keep_mask(keep, n_tokens)
    idx = torch.arange(n_tokens, device=keep.device).expand(keep.shape[0], -1)
    return idx[~mask].view(keep.shape[0], n_tokens - keep.shape[1])


def keep_mask(keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Boolean [B, n_tokens], True where the token goes through the span."""
    mask = torch.zeros(keep.shape[0], n_tokens, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, True)


def routing_generator(seed: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for routing masks, seeded from a hash of (seed, rank, routing-stream tag).

    Each rank must draw different masks: pass its rank. The hash (numpy's SeedSequence) keeps this
    stream independent from generators seeded with the plain `seed` (e.g. the sampler's noise),
    whose uniform draws would otherwise be the very numbers the mask is made from.
    """
    state = np.random.SeedSequence([seed & (2**64 - 1), rank, _ROUTING_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))
