"""The denoiser: PRX's pixel-space transformer. It knows nothing about diffusion.

Given noisy pixels, a time t in [0, 1] and text embeddings, it returns a tensor of the image's shape
(the training objective decides what that tensor means; here it is trained as the clean image).

Layout (docs/recipe.md, "Model"), kept parameter-for-parameter compatible with diffusers'
`PRXTransformer2DModel` so that a trained model can be exported to `PRXPixelPipeline`:
- patches of p x p RGB pixels, flattened in (channel, row, column) order, embedded through an
  optional low-rank bottleneck (Linear -> Linear, no activation between);
- text projected to the width once (`txt_in`) and never updated: each block's image queries attend
  to [text keys/values ; image keys/values], the text padding mask is a broadcast key mask;
- 2-D axial RoPE on image queries and keys, RMSNorm on q and k (and on text keys);
- per-block adaLN (shift, scale, gate for attention and for the GeGLU MLP) from a time embedding,
  zero-initialised so every block starts as the identity; a zero-initialised output layer.

Token routing (TREAD) is an explicit argument of `forward`: a `Routing` names which image tokens
go through a span of blocks; the others skip it and are put back unchanged after it. A SPRINT model
(`ModelConfig.sprint_span`, pixelrun/model/sprint.py) instead fuses the stream from before the span
with the span's output after it, whether routed or not.

Two additions outside PRX's layout, each off by default and refused by the diffusers export: a
fixed sin-cos position table on the image tokens (`pos_embed`, as JiT) and a pixel head of two
convolutions after the patch head (`pixel_head`, `PixelHead`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pixelrun.config import PRESETS, Config, model_fields
from pixelrun.config.rules import POS_EMBEDS
from pixelrun.model.resolution import ResolutionEmbedder
from pixelrun.model.sprint import SprintFusion, sprint_span


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    bottleneck_size: int | None
    text_dim: int
    in_channels: int = 3
    rope_theta: float = 10000.0
    time_factor: float = 1000.0
    time_max_period: float = 10000.0
    resolution_embeds: str = "none"  # none | vec | token (pixelrun/model/resolution.py)
    pos_embed: str = "none"  # none | sincos: a fixed 2-D sin-cos table added to the image tokens
    pixel_head: int = 0  # hidden channels of the pixel-level conv head (PixelHead); 0 = none
    # SPRINT (pixelrun/model/sprint.py): the span (start, end) after which its fusion runs; None = none
    sprint_span: tuple[int, int] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def head_out_dim(self) -> int:
        """Values the patch head emits per token: the patch, and PixelHead's features with one."""
        return self.patch_dim + (self.patch_size**2 * PIXEL_FEATURES if self.pixel_head else 0)


@dataclass(frozen=True)
class Routing:
    """TREAD routing for one forward pass.

    `keep` [B, K] holds, per sample, the indices of the image tokens that go through blocks
    `start`..`end` (0-indexed, both inclusive); the other tokens skip those blocks and re-enter,
    unchanged, after block `end` (SPRINT: through its fusion). K = 0 skips the blocks altogether
    (SPRINT's path drop). `dropped` [B] bool (SPRINT's path-drop learning, None = none): those
    samples' deep stream is the mask token everywhere, as a path drop makes it.
    """

    keep: torch.Tensor
    start: int
    end: int
    dropped: torch.Tensor | None = None


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], tokens in row-major order, values in (c, y, x) order."""
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(seq: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    b, _, d = seq.shape
    c = d // (p * p)
    x = seq.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding of scale*t as [cos | sin] (the order diffusers' PRX uses)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * (t.float()[:, None] * freqs[None])  # diffusers' order of the products: the same bits
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def grid_positions(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column [h * w] (float64) of each token of an h x w grid in patchify's row-major order:
    the one token order RoPE and the position table both index."""
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    return rows, cols


def rope_angles(h: int, w: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim/2] for a 2-D axial RoPE: the first half of the rotated pairs encodes
    the row, the second half the column, at integer grid positions."""
    axis = head_dim // 2
    omega = 1.0 / theta ** (torch.arange(0, axis, 2, dtype=torch.float64, device=device) / axis)
    rows, cols = grid_positions(h, w, device)
    ang = torch.cat([rows[:, None] * omega, cols[:, None] * omega], dim=-1)
    return ang.cos().float(), ang.sin().float()


def sincos_pos_embed(h: int, w: int, dim: int, device) -> torch.Tensor:
    """[h * w, dim] fixed 2-D sin-cos position table (row-major tokens): the first half of the
    features encodes the row, the second the column, each as [sin | cos] of the position times
    1 / 10000^(i / (dim/4)) for i < dim/4. JiT adds such a frozen table to its patch tokens as well
    as RoPE in attention (model_jit.py: JiT.initialize_weights fills pos_embed with
    get_2d_sincos_pos_embed, JiT.forward adds it after x_embedder)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows, cols = (pos[:, None] * omega for pos in grid_positions(h, w, device))
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of x [B, heads, L, D] by the angles; cos/sin [B or 1, 1, L, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.img_qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.txt_kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x, txt, key_mask, cos, sin):
        b, n, _ = x.shape
        q, k, v = self.img_qkv_proj(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        tk, tv = self.txt_kv_proj(txt).view(b, txt.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.norm_q(q), cos, sin)
        k = apply_rope(self.norm_k(k), cos, sin)
        k = torch.cat([self.norm_added_k(tk), k], dim=2)
        v = torch.cat([tv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(dim, heads)
        self.post_attention_layernorm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.modulation = nn.Module()
        self.modulation.lin = nn.Linear(dim, 6 * dim)

    def forward(self, x, txt, vec, key_mask, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation.lin(F.silu(vec))[:, None].chunk(6, dim=-1)
        h = (1 + scale1) * self.img_pre_norm(x) + shift1
        x = x + gate1 * self.attention(h, txt, key_mask, cos, sin)
        h = (1 + scale2) * self.post_attention_layernorm(x) + shift2
        mlp = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return x + gate2 * mlp


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


PIXEL_FEATURES = 8  # per-pixel feature channels the patch head hands the pixel head


class PixelHead(nn.Module):
    """Two 3x3 convolutions over the unpatchified prediction: each patch is otherwise drawn by its
    own token through a linear map, so a shape split over four tokens shows seams where they meet.
    Input: the prediction, PIXEL_FEATURES channels the patch head emits per pixel, the noisy image
    and t as a plane; output added to the prediction, zero-initialised (a no-op at step 0)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * channels + PIXEL_FEATURES + 1, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, pred, feats, x, t):
        plane = t.to(pred.dtype)[:, None, None, None].expand(-1, 1, *pred.shape[-2:])
        h = self.conv_in(torch.cat([pred, feats, x.to(pred.dtype), plane], dim=1))
        return pred + self.conv_out(F.gelu(h))


@dataclass
class ModelOutput:
    prediction: torch.Tensor  # [B, C, H, W]
    features: dict[int, torch.Tensor]  # block index -> its output [B, L or K, D], when asked for


class PRXDenoiser(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ValueError("hidden_size / num_heads must be a multiple of 4 (2-D RoPE on pairs)")
        if cfg.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {cfg.pos_embed!r}")
        self.cfg = cfg
        d = cfg.hidden_size
        if cfg.bottleneck_size:
            self.img_in: nn.Module = nn.Sequential(
                nn.Linear(cfg.patch_dim, cfg.bottleneck_size), nn.Linear(cfg.bottleneck_size, d)
            )
        else:
            self.img_in = nn.Linear(cfg.patch_dim, d)
        self.time_in = MLPEmbedder(256, d)
        self.txt_in = nn.Linear(cfg.text_dim, d)
        self.resolution_embedder = (
            ResolutionEmbedder(d, cfg.time_max_period, cfg.resolution_embeds)
            if cfg.resolution_embeds != "none"
            else None
        )
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.head_out_dim)
        self.pixel_head = PixelHead(cfg.in_channels, cfg.pixel_head) if cfg.pixel_head else None
        self.sprint = SprintFusion(d, cfg.sprint_span) if cfg.sprint_span is not None else None
        # Recompute each block's activations in the backward instead of keeping them (memory for
        # compute); a flag rather than a wrapper module so parameter names never change.
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Zero modulation: each block starts as the identity; zero output: x_hat = 0 at step 0.
        for blk in self.blocks:
            nn.init.zeros_(blk.modulation.lin.weight)
            nn.init.zeros_(blk.modulation.lin.bias)
        for lin in (self.final_layer.linear, self.final_layer.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.pixel_head is not None:
            nn.init.zeros_(self.pixel_head.conv_out.weight)
            nn.init.zeros_(self.pixel_head.conv_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        routing: Routing | None = None,
        return_features: tuple[int, ...] = (),
    ) -> ModelOutput:
        """x [B, C, H, W]; t [B] in [0, 1]; text [B, T, text_dim]; text_mask [B, T] bool (True = real)."""
        cfg = self.cfg
        b, _, h, w = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        span = self._span(routing)
        img = self.img_in(patchify(x, p))
        if cfg.pos_embed == "sincos":  # absolute positions, which RoPE alone gives only against the text keys
            img = img + sincos_pos_embed(h // p, w // p, img.shape[-1], x.device).to(img.dtype)
        txt = self.txt_in(text)
        vec = self.time_in(timestep_embedding(t, 256, cfg.time_factor, cfg.time_max_period).to(img.dtype))
        sizes = self.resolution_embedder
        if sizes is not None and sizes.mode == "vec":  # where diffusers' PRXTransformer2DModel adds it
            vec = vec + sizes(b, h, w, vec.dtype, x.device)
        elif sizes is not None:  # two text tokens, before the prompt's, never masked
            txt = torch.cat([sizes(b, h, w, txt.dtype, x.device), txt], dim=1)
            if text_mask is not None:
                text_mask = torch.cat([text_mask.new_ones(b, 2), text_mask], dim=1)
        cos, sin = rope_angles(h // p, w // p, cfg.head_dim, cfg.rope_theta, x.device)
        cos, sin = cos[None, None], sin[None, None]
        n_img = img.shape[1]
        full_mask = None
        if text_mask is not None:
            ones = torch.ones(b, n_img, dtype=torch.bool, device=x.device)
            full_mask = torch.cat([text_mask.bool(), ones], dim=1)[:, None, None, :]

        features: dict[int, torch.Tensor] = {}
        dense: torch.Tensor | None = None  # the stream entering the span
        mask, block_cos, block_sin = full_mask, cos, sin
        for i, block in enumerate(self.blocks):
            if span is not None and i == span[0]:
                dense = img
                if routing is not None:
                    img = gather_tokens(img, routing.keep)
                    block_cos = gather_tokens(cos.expand(b, 1, -1, -1).squeeze(1), routing.keep)[:, None]
                    block_sin = gather_tokens(sin.expand(b, 1, -1, -1).squeeze(1), routing.keep)[:, None]
                    if full_mask is not None:
                        mask = full_mask[..., : txt.shape[1] + routing.keep.shape[1]]
            skipped = routing is not None and routing.keep.shape[1] == 0 and routing.start <= i <= routing.end
            if skipped:  # no token kept (a path drop): the span's blocks have nothing to do
                pass
            elif self.activation_checkpointing and torch.is_grad_enabled():
                img = torch.utils.checkpoint.checkpoint(
                    block, img, txt, vec, mask, block_cos, block_sin, use_reentrant=False
                )
            else:
                img = block(img, txt, vec, mask, block_cos, block_sin)
            if i in return_features:  # before the scatter: a block of the span only saw its kept tokens
                features[i] = img
            if span is not None and i == span[1]:
                keep = routing.keep if routing is not None else None
                if self.sprint is not None:
                    img = self.sprint(dense, img, keep, routing.dropped if routing is not None else None)
                elif keep is not None:
                    img = scatter_tokens(dense, img, keep)  # type: ignore[arg-type]  # set at span[0]
                mask, block_cos, block_sin = full_mask, cos, sin
        out = self.final_layer(img, vec)
        if self.pixel_head is None:
            return ModelOutput(unpatchify(out, p, h, w), features)
        pred = unpatchify(out[..., : cfg.patch_dim], p, h, w)
        feats = unpatchify(out[..., cfg.patch_dim :], p, h, w)
        return ModelOutput(self.pixel_head(pred, feats, x, t), features)

    def _span(self, routing: Routing | None) -> tuple[int, int] | None:
        """The blocks (start, end) whose input is set aside and whose output is put back or fused:
        the routing's, or SPRINT's (which fuses with every token kept too), None for a dense pass."""
        depth = self.cfg.depth
        if routing is not None and not 0 <= routing.start <= routing.end < depth:
            raise ValueError(f"routing span {routing.start}..{routing.end} is outside blocks 0..{depth - 1}")
        if self.sprint is None:
            return (routing.start, routing.end) if routing is not None else None
        span = (self.sprint.start, self.sprint.end)
        if routing is not None and (routing.start, routing.end) != span:
            raise ValueError(
                f"routing span {routing.start}..{routing.end} is not this SPRINT model's {span[0]}..{span[1]}"
            )
        return span


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, kept: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Put the processed kept tokens back at their positions of `base`; the rest stay unchanged."""
    return base.scatter(1, idx[..., None].expand(-1, -1, base.shape[-1]), kept)


def build_model(preset: str, text_dim: int, **overrides) -> PRXDenoiser:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return PRXDenoiser(ModelConfig(text_dim=text_dim, **fields))


def model_from_config(cfg: Config, text_dim: int) -> PRXDenoiser:
    """The denoiser of `cfg`'s model section for a text encoder of width `text_dim`."""
    return build_model(cfg.model.preset, text_dim, **model_fields(cfg), sprint_span=sprint_span(cfg))


def compile_blocks(model: PRXDenoiser, graphs: int = 0) -> PRXDenoiser:
    """torch.compile each transformer block in place (`Module.compile`: parameter names and the
    state dict stay as they are). Per block, not the whole model, so FSDP2's per-block hooks do not
    break the graph. Static shapes: under TREAD a block inside the span always sees K tokens and one
    outside it N, so each block keeps a specialised graph per shape instead of falling back to a
    slower dynamic-shape one after the second size it meets.

    The blocks share one compiled frame (`Block.forward`) with one graph per input variant: each
    token count of each aspect bucket, dense and routed, with and without grad (the validation
    loss), per micro-batch size. torch's default limit is 8 graphs per frame, after which dynamo
    stops compiling new variants and runs them eagerly, without a word beyond a log line: a run with
    aspect buckets meets more. `graphs` (pixelrun.training.build.block_graphs) raises the limit to fit."""
    if graphs:
        import torch._dynamo.config as dynamo

        dynamo.recompile_limit = max(dynamo.recompile_limit, graphs)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, graphs)
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
