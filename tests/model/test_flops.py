"""The analytic cost model (pixelrun/model/flops.py) against docs/recipe.md's figures and against torch's own
FLOP counter on real forward and backward passes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pixelrun.config import PRESETS, span_for_depth
from pixelrun.model.denoiser import ModelConfig, Routing, build_model
from pixelrun.model.flops import training_flops_per_image
from pixelrun.model.routing import kept_count


@pytest.mark.parametrize(
    "size, ratio, expected", [(512, 0.0, 1.36e12), (512, 0.5, 0.95e12), (1024, 0.0, 5.2e12), (1024, 0.5, 3.4e12)]
)
def test_small_preset_matches_recipe(size, ratio, expected):
    # docs/recipe.md "Cost model": the 1.2B model, 2304-d text (T5Gemma-2B), 256 text tokens, TREAD 0.5
    # over blocks 2..12 (derived independently of this code).
    cfg = ModelConfig(text_dim=2304, **PRESETS["small"])
    r = training_flops_per_image(cfg, size, size, 256, routing_ratio=ratio, span=(2, 12) if ratio else None)
    assert r["training_total"] == pytest.approx(expected, rel=0.03)
    assert r["routed_blocks"] == ([2, 12] if ratio else None)
    if ratio:  # the default span at depth 16 is the recipe's
        assert r == training_flops_per_image(cfg, size, size, 256, routing_ratio=ratio)


def test_parts_and_counting_rules():
    cfg = ModelConfig(text_dim=64, **{**PRESETS["tiny"], "bottleneck_size": 16})
    r = training_flops_per_image(cfg, 32, 64, 5)
    d, n = cfg.hidden_size, 4 * 8
    assert r["image_tokens"] == r["kept_tokens"] == n and r["text_tokens"] == 5
    assert r["forward"]["modulation"] == cfg.depth * 2 * d * 6 * d  # once per image, not per token
    assert r["forward"]["text_kv"] == cfg.depth * 2 * 5 * d * 2 * d  # text tokens only
    assert r["training"]["text_embed"] == 2 * r["forward"]["text_embed"]  # frozen input: weight grads only
    assert r["training"]["mlp"] == 3 * r["forward"]["mlp"]
    assert r["training_total"] == sum(r["training"].values())
    routed = training_flops_per_image(cfg, 32, 64, 5, routing_ratio=0.75)
    assert routed["kept_tokens"] == kept_count(n, 0.75) == 8
    assert routed["forward"]["text_kv"] == r["forward"]["text_kv"]  # routing never touches the text
    assert routed["forward"]["patch_embed"] == r["forward"]["patch_embed"]
    assert routed["training_total"] < r["training_total"]
    with pytest.raises(ValueError):
        training_flops_per_image(cfg, 30, 64, 5)


def _counted(model, x, t, text, mask, routing, backward: bool) -> int:
    """FLOPs torch counts for one pass. SDPA is pinned to the math backend: in torch 2.13 on the CPU
    the default SDPA kernel is `_scaled_dot_product_flash_attention_for_cpu`, for which
    FlopCounterMode has no formula (it counts 0 FLOPs); the math backend is plain bmm's, which it
    counts, forward and backward, exactly."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if backward:
            model(x, t, text, mask, routing=routing).prediction.sum().backward()
        else:
            with torch.no_grad():
                model(x, t, text, mask, routing=routing)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "bottleneck, ratio, resolution, pixel_head",
    [
        (None, 0.0, "none", 0),
        (16, 0.0, "none", 0),
        (16, 0.5, "none", 0),
        (None, 0.75, "none", 0),
        (16, 0.0, "vec", 0),
        (None, 0.5, "token", 0),
        (None, 0.5, "none", 8),
    ],
)
def test_counts_equal_torch_flop_counter(bottleneck, ratio, resolution, pixel_head):
    torch.manual_seed(0)
    text_dim, tokens, b, h, w = 24, 7, 2, 32, 48
    model = build_model(
        "tiny",
        text_dim,
        hidden_size=64,
        num_heads=4,
        depth=4,
        bottleneck_size=bottleneck,
        resolution_embeds=resolution,
        pixel_head=pixel_head,
    )
    x, t = torch.randn(b, 3, h, w), torch.rand(b)
    text = torch.randn(b, tokens, text_dim)
    mask = torch.ones(b, tokens, dtype=torch.bool)
    mask[1, 4:] = False  # padding is masked, still computed
    n = (h // 8) * (w // 8)
    span = span_for_depth(4)
    routing = None
    if ratio:
        k = kept_count(n, ratio)
        keep = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(b)])
        routing = Routing(keep=keep, start=span[0], end=span[1])
    expected = training_flops_per_image(model.cfg, h, w, tokens, routing_ratio=ratio, span=span)
    # FlopCounterMode counts the whole batch; every part of the model scales with the batch size.
    assert _counted(model, x, t, text, mask, routing, backward=False) == b * expected["forward_total"]
    assert _counted(model, x, t, text, mask, routing, backward=True) == b * expected["training_total"]
