"""Analytic cost of training the PRX denoiser (pixelrun/model/denoiser.py), in FLOPs per image.

How it counts (docs/recipe.md, "Cost model"):

- Only matrix products: an [m, k] x [k, n] product is 2*m*n*k FLOPs (one multiply, one add).
  Elementwise work (norms, RoPE, activations, softmax, adaLN's scale/shift/gate, residuals, biases,
  gather/scatter of routed tokens) is ignored: it is memory-bound and small next to the products.
- Each block: image q/k/v (`img_qkv_proj`) and the output projection on the N image tokens; text
  k/v (`txt_kv_proj`) on the T text tokens only; attention q.k^T and attn.v of the N image queries
  over all T + N keys (T is the padded, maximum text length: padding is masked, not skipped); the
  GeGLU MLP (gate, up, down) on the N image tokens; the adaLN modulation on one time vector per
  image (never per token). The final layer's adaLN likewise once per image, its linear per token.
- `txt_in` projects the T text tokens once; the time MLP acts on one vector per image.
- TREAD: blocks start..end (inclusive) see only K = kept_count(N, ratio) image tokens, as queries
  and as image keys; the text (T tokens) is unchanged there.
- SPRINT (`model_cfg.sprint_span`, pixelrun/model/sprint.py): the span's blocks as TREAD's, plus its
  fusion Linear(2D -> D) on all N tokens after the span (ratio 0 included: the fusion is part of the
  model). The mask token and the scatter that builds the deep stream are not products.
- Training = forward + backward. A linear layer's backward is two products the size of its
  forward (gradient w.r.t. the input, gradient w.r.t. the weight): 3x the forward. Where the
  layer's input needs no gradient autograd computes only the weight gradient: 2x. That is `txt_in`
  (frozen text embeddings), the first patch-embedding layer (noisy pixels) and the time MLP's first
  layer (sinusoidal features); everything else is 3x. Attention's backward is four products the
  size of the forward's two: 3x. Recomputation (flash kernels' score recompute, activation
  checkpointing) is not counted: these are model FLOPs, the numerator of MFU.
- The pixel head (`model_cfg.pixel_head`): its patch head emits PIXEL_FEATURES more values per
  pixel, and its two 3x3 convolutions are products over 9 taps at every pixel; their backward is
  3x, as a linear layer's.

tests/model/test_flops.py checks the forward and the training counts against torch's FlopCounterMode.
"""

from __future__ import annotations

from pixelrun.config import span_for_depth
from pixelrun.model.denoiser import PIXEL_FEATURES, ModelConfig
from pixelrun.model.resolution import SIDE_FEATURES
from pixelrun.model.routing import kept_count

# Width of the sinusoidal time features `time_in` reads (model.py's timestep_embedding(t, 256, ...)).
TIME_FEATURES = 256


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _pixel_head_products(c: ModelConfig, pixels: int) -> list[int]:
    """PixelHead's two 3x3 convolutions: per pixel, a product over 9 taps of the input channels
    (prediction, pixel features, noisy image, t-plane), then over 9 taps of the hidden ones."""
    if not c.pixel_head:
        return []
    ch = c.in_channels
    return [_mm(pixels, 9 * (2 * ch + PIXEL_FEATURES + 1), c.pixel_head), _mm(pixels, 9 * c.pixel_head, ch)]


def training_flops_per_image(
    model_cfg: ModelConfig,
    height: int,
    width: int,
    text_tokens: int,
    routing_ratio: float = 0.0,
    span: tuple[int, int] | None = None,
) -> dict:
    """FLOPs of one image through the denoiser, by part, forward and training (forward + backward).

    `routing_ratio` is TREAD's fraction of image tokens routed away (0 = dense); `span` the routed
    blocks (start, end), inclusive, default the recipe's span for the depth (config.span_for_depth).
    Returns {"forward": {part: flops}, "training": {part: flops}, "forward_total", "training_total",
    "image_tokens" (N), "kept_tokens" (K, = N when dense), "text_tokens" (T, and the two resolution tokens of "token" mode), "routed_blocks"
    ([start, end] or None)}. Parts: patch_embed, time_embed, text_embed, image_qkv, text_kv,
    attention (scores and values), attn_out, mlp, modulation (the blocks' adaLN), final_layer;
    and sprint_fusion for a SPRINT model (`model_cfg.sprint_span` set), pixel_head for a model with
    one (`model_cfg.pixel_head` > 0).
    """
    c = model_cfg
    p, d = c.patch_size, c.hidden_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    n, t = (height // p) * (width // p), text_tokens
    mlp_hidden = int(d * c.mlp_ratio)  # as model.Block sizes it
    routed = None
    k = n
    if routing_ratio > 0:
        routed = span_for_depth(c.depth, *(span if span is not None else (None, None)))
        k = kept_count(n, routing_ratio)

    forward: dict[str, int] = {}
    training: dict[str, int] = {}

    def add(part: str, flops: int, input_needs_grad: bool = True):
        forward[part] = forward.get(part, 0) + flops
        training[part] = training.get(part, 0) + flops * (3 if input_needs_grad else 2)

    if c.bottleneck_size:
        add("patch_embed", _mm(n, c.patch_dim, c.bottleneck_size), input_needs_grad=False)
        add("patch_embed", _mm(n, c.bottleneck_size, d))
    else:
        add("patch_embed", _mm(n, c.patch_dim, d), input_needs_grad=False)
    add("time_embed", _mm(1, TIME_FEATURES, d), input_needs_grad=False)
    add("time_embed", _mm(1, d, d))
    if c.resolution_embeds == "vec":  # its MLP's output joins the time vector (pixelrun/model/resolution.py)
        add("time_embed", _mm(1, 2 * SIDE_FEATURES, d), input_needs_grad=False)
        add("time_embed", _mm(1, d, d))
    add("text_embed", _mm(t, c.text_dim, d), input_needs_grad=False)
    if c.resolution_embeds == "token":  # two MLPs of one side each, whose tokens join the text's
        for _side in range(2):
            add("text_embed", _mm(1, SIDE_FEATURES, d), input_needs_grad=False)
            add("text_embed", _mm(1, d, d))
        t += 2
    for i in range(c.depth):
        nb = k if routed is not None and routed[0] <= i <= routed[1] else n
        add("image_qkv", _mm(nb, d, 3 * d))
        add("text_kv", _mm(t, d, 2 * d))
        add("attention", 2 * _mm(nb, c.head_dim, t + nb) * c.num_heads)  # q.k^T and attn.v, every head
        add("attn_out", _mm(nb, d, d))
        add("mlp", 3 * _mm(nb, d, mlp_hidden))
        add("modulation", _mm(1, d, 6 * d))
    if c.sprint_span is not None:
        add("sprint_fusion", _mm(n, 2 * d, d))
    add("final_layer", _mm(1, d, 2 * d))
    add("final_layer", _mm(n, d, c.head_out_dim))
    for flops in _pixel_head_products(c, height * width):
        add("pixel_head", flops)
    return {
        "forward": forward,
        "training": training,
        "forward_total": sum(forward.values()),
        "training_total": sum(training.values()),
        "image_tokens": n,
        "kept_tokens": k,
        "text_tokens": t,
        "routed_blocks": list(routed) if routed is not None else None,
    }
