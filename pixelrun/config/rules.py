"""The domain rules validation checks against, as data and pure functions: the model presets, the
names of data sources, samplers and metrics, the TREAD span rule, the aspect-ratio buckets and the
caption-field grammar. Validation needs them before any model or dataset exists, and keeping them
here lets the config package import no other pixelrun module (the layers: pixelrun/__init__.py);
the modules that act on these values import them from here.
"""

from __future__ import annotations

import math

from pixelrun.config.errors import ConfigError

# Model size presets: name -> architecture (patch, width, depth, heads, MLP ratio, bottleneck; the
# resolution embedder where it has one, none otherwise).
PRESETS: dict[str, dict] = {
    # The CPU default: 36 tokens at 48px. At patch 8 a patch has 192 values, so no bottleneck.
    "tiny": dict(patch_size=8, hidden_size=256, depth=4, num_heads=4, mlp_ratio=3.5, bottleneck_size=None),
    # Between the two: the recipe's layout at a size a single consumer GPU trains comfortably.
    "base": dict(patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_ratio=3.5, bottleneck_size=256),
    # The speedrun model (about 1.2B parameters with a 2304-d text encoder).
    "small": dict(patch_size=32, hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, bottleneck_size=256),
    # Photoroom's released pixel model, `Photoroom/prxpixel-t2i` (about 7B with its 2048-d Qwen3-VL text
    # tower); named apart from PRX's own "base" (7.3B) so the two cannot be confused. Its
    # transformer/config.json was not readable here: the numbers are those of a port that loads the
    # released weights, AI-Hypercomputer/maxdiffusion src/maxdiffusion/models/prx_pixel/
    # transformer_prx_pixel.py (FlaxPRXPixelConfig: patch 16, width 3584, depth 24, 28 heads, MLP 3.5,
    # context 2048; img_in Linear(768, 768) -> Linear(768, 3584), i.e. bottleneck 768; a resolution
    # embedder) at the revision its checkpointing/prx_pixel_checkpointer.py pins (bcd5e63f). model.init
    # reads the real config.json and refuses a preset that disagrees with it.
    "prxpixel-7b": dict(
        patch_size=16,
        hidden_size=3584,
        depth=24,
        num_heads=28,
        mlp_ratio=3.5,
        bottleneck_size=768,
        resolution_embeds="vec",
    ),
}
RESOLUTION_EMBEDS = ("none", "vec", "token")  # pixelrun/model/resolution.py
POS_EMBEDS = ("none", "sincos")  # pixelrun/model/denoiser.py, sincos_pos_embed

DATA_SOURCES = ("shapes", "folder", "emoji", "shards")
SPACINGS = ("diffusers", "linear")  # sampling time grids (pixelrun/diffusion/sampling.py, `time_grid`)
GUIDANCE_MODES = ("cfg", "none", "self", "pathdrop")  # pixelrun/diffusion/sampling.py, `sample`
ROUTING_KINDS = ("tread", "sprint")  # pixelrun/model/routing.py, pixelrun/model/sprint.py
REPA_PROJECTORS = ("mlp", "conv", "attention")  # pixelrun/tricks/repa.py, `build_projector`
SAMPLERS = ("euler", "heun")  # pixelrun/diffusion/sampling.py, `sample`
#: the linears of a transformer block (pixelrun/model/denoiser.py, `Block`) train.lora.targets may
#: name, by their name inside the block; diffusers' PRXTransformer2DModel names them the same
LORA_DEFAULT_TARGETS = (  # the attention's and the MLP's
    "attention.img_qkv_proj",
    "attention.txt_kv_proj",
    "attention.to_out.0",
    "gate_proj",
    "up_proj",
    "down_proj",
)
LORA_TARGETS = (*LORA_DEFAULT_TARGETS, "modulation.lin")

#: every evaluation metric, with what it is (the names eval.metrics accepts)
METRICS = {
    "shapes": "shapes score (docs/recipe.md) of the generated images against their captions",
    "fd-effnet": "Fréchet distance on EfficientNet-Lite0 features (offline ImageNet CNN; not FID)",
    "fid": "FID: Fréchet distance on pytorch-fid's Inception-v3 pool3 features",
    "cmmd": "CMMD: MMD of CLIP image embeddings",
    "dino-mmd": "DINO-MMD: MMD of DINOv2 CLS embeddings",
}


def _round_half_up_sixteenths(numerator: int) -> int:
    """round_half_up(numerator / 16) in exact integer arithmetic (Python's round() is banker's)."""
    return (numerator + 8) // 16


def span_for_depth(depth: int, start: int | None = None, end: int | None = None) -> tuple[int, int]:
    """The routed span (start, end), 0-indexed and inclusive, for a model of `depth` blocks.

    Explicit `start` / `end` are validated (0 <= start <= end < depth) and returned; a missing one
    takes its default. Default rule, which gives PRX's 2..12 at depth 16:

        start = round_half_up(2 * depth / 16)
        end   = depth - 1 - round_half_up(3 * depth / 16)

    then clamped so the span leaves at least one dense block before and one after it (depth >= 3):
    the first block(s) see every token before the split (so routed tokens carry some processing),
    and the last block(s) mix routed and kept tokens again before the output layer. At depth 2
    only the block after can be kept free (span 0..0); at depth 1 the span is 0..0. Examples:
    depth 4 -> (1, 2), 8 -> (1, 5), 12 -> (2, 9), 16 -> (2, 12), 24 -> (3, 18), 28 -> (4, 22).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    d_start = _round_half_up_sixteenths(2 * depth)
    d_end = depth - 1 - _round_half_up_sixteenths(3 * depth)
    if depth >= 3:
        d_start, d_end = max(d_start, 1), min(d_end, depth - 2)
    else:
        d_end = 0
    d_start = min(d_start, d_end)
    s = d_start if start is None else start
    e = d_end if end is None else end
    if start is not None and not 0 <= start < depth:
        raise ValueError(f"routing span start {start} is outside the model's blocks 0..{depth - 1}")
    if end is not None and not 0 <= end < depth:
        raise ValueError(f"routing span end {end} is outside the model's blocks 0..{depth - 1}")
    if s > e:
        which = "start" if start is not None else "end"
        raise ValueError(
            f"routing span start {s} is after its end {e} (inclusive span; the {which} was given explicitly)"
        )
    return s, e


def aspect_buckets(
    resolution: int, patch: int, min_ratio: float = 0.5, max_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """(height, width) bucket sizes in pixels, multiples of `patch`, sorted from tall to wide.

    Rule (the enumeration of Photoroom's PRX data pipeline, reimplemented): with a budget of
    N = (resolution / patch)^2 tokens and ratio r = width / height,
      * for every grid width  gw in [ceil(sqrt(N * min_ratio)),  floor(sqrt(N * max_ratio))]
        take the tallest height that fits the budget, gh = floor(N / gw);
      * for every grid height gh in [ceil(sqrt(N / max_ratio)), floor(sqrt(N / min_ratio))]
        take the widest width that fits, gw = floor(N / gh);
      * the union of both, without duplicates.
    The enumerated side is bounded by the ratio, the other side is the largest that keeps
    gh * gw <= N. Enumerating both sides matters: one pass alone misses sizes such as 12x20
    next to 12x21 (one pass gives 11 buckets at 512 px, 22 at 1024 px).

    Numbers (patch 32): 512 px -> N = 256, 13 buckets of 240..256 tokens, 11x22 .. 22x11,
    ratios exactly within [0.5, 2]. 1024 px -> N = 1024, 27 buckets of 984..1024 tokens,
    22x45 .. 45x22. Note: flooring the free side can push a ratio slightly past the bound;
    at 1024 px 22x45 and 45x22 have ratio 2.045 / 0.489 (docs/recipe.md's count of 27 includes them).
    """
    if resolution % patch:
        raise ValueError(f"resolution {resolution} is not a multiple of patch {patch}")
    if not 0 < min_ratio <= 1 <= max_ratio:
        raise ValueError(f"need 0 < min_ratio <= 1 <= max_ratio, got {min_ratio}, {max_ratio}")
    n = (resolution // patch) ** 2
    grids = set()
    for gw in range(math.ceil(math.sqrt(n * min_ratio)), math.floor(math.sqrt(n * max_ratio)) + 1):
        grids.add((n // gw, gw))
    for gh in range(math.ceil(math.sqrt(n / max_ratio)), math.floor(math.sqrt(n / min_ratio)) + 1):
        grids.add((gh, n // gh))
    return [(gh * patch, gw * patch) for gh, gw in sorted(grids, key=lambda g: (g[1] / g[0], g[0]))]


def parse_weights(spec: str) -> list[tuple[str, float]]:
    """`name:weight,name,...` -> [(name, weight)], weight 1 when left out (data.captions, and the
    caption columns of `pixelrun data convert`). Raises ValueError with the offending part."""
    fields: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, _, weight_text = part.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"empty name in {spec!r}")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ValueError(f"the weight {weight_text.strip()!r} of {name} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"the weight of {name} must be a positive number, got {weight_text.strip()}")
        if name in (f for f, _ in fields):
            raise ValueError(f"caption field {name} is listed twice")
        fields.append((name, weight))
    return fields


def parse_captions(spec: str) -> list[tuple[str, float]]:
    """`data.captions` -> [(field, weight)]. Raises ValueError with the offending part."""
    fields = parse_weights(spec)
    for name, _ in fields:
        if name != "txt" and not (name.startswith("json.") and len(name) > len("json.")):
            raise ValueError(f"caption field {name!r} is neither txt nor json.NAME (in {spec!r})")
    return fields


# Checks shared by the derived values and validation: each names the key it rejects.


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")


def _positive(key, value, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}; got {value}")
