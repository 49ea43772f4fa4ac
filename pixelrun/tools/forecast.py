"""`pixelrun bench --config CONFIG --gpus N`: the wall time of a whole (staged) run on N GPUs,
projected from the step times measured on this machine.

For every stage of the config, with everything it turns on: a training step of the denoiser with
its loss terms and teachers (`bench.time_steps`), the text encoder on the stage's micro-batch of
captions, and, with Muon, the Newton-Schulz work alone. Teachers and text encoders given as Hugging
Face ids that are neither local folders nor in the Hugging Face cache are built with random
weights from the architecture of the hub's config.json (`ARCHITECTURES`): a network runs the same
kernels on the same shapes whatever its weights hold, so it times the same as the trained one.

The projection assumes weak scaling: each of the N GPUs runs the measured micro-step at the
measured speed, one after another for the accumulation steps; communication (FSDP's all-gathers
and reduce-scatters, Muon's two all_to_alls) is not measured and is assumed hidden under compute.
The optimizer's elementwise work splits over the ranks of a shard group (FSDP2 shards its state);
Newton-Schulz splits by `muon_sharded.balanced_owners`, so the busiest owner sets its time.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

import torch

from pixelrun.config import Config, ConfigError, batch_split, load_config, stage_plan, to_dict
from pixelrun.infra.devices import device_name
from pixelrun.infra.distributed import resolve_device
from pixelrun.infra.files import write_atomic
from pixelrun.model.denoiser import model_from_config
from pixelrun.model.text import TextEncoder, _hidden_size, load_text_encoder, resolve_encoder
from pixelrun.teachers.networks import training_networks
from pixelrun.tools.bench import time_steps
from pixelrun.training.muon_sharded import balanced_owners
from pixelrun.training.newton_schulz import NS_DTYPES, newton_schulz_flops, orthogonalize_many
from pixelrun.training.optim import split_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# docs/recipe.md, "Schedule (32 H200, about $1500)": the seed's 24-hour speedrun.
SEED_HOURS, SEED_GPUS, SEED_DOLLARS = 24.0, 32, 1500.0
SEED = {"hours": SEED_HOURS, "gpus": SEED_GPUS, "gpu": "H200", "dollars": SEED_DOLLARS}

# Architectures of the networks the speedrun config names, as their hub config.json give them
# (model_type, fields); transformers' defaults fill the rest. Looked up for this table: DINOv3
# ViT-L/16 (1024 wide, 24 layers, 16 heads, MLP 4096, 4 registers, RoPE theta 100: Meta's model
# card table and copies of the repo's config.json), DINOv2-B with registers (config.json of
# facebook/dinov2-with-registers-base), and T5Gemma 2B-2B's encoder, which keeps Gemma 2 2B's
# dimensions (google/gemma-2-2b's config.json; also transformers' T5GemmaModuleConfig defaults).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "facebook/dinov3-vitl16-pretrain-lvd1689m": (
        "dinov3_vit",
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=16,
            image_size=224,
            num_register_tokens=4,
            layerscale_value=1.0,
            rope_theta=100.0,
            layer_norm_eps=1e-5,
            query_bias=True,
            key_bias=False,
            value_bias=True,
            proj_bias=True,
            mlp_bias=True,
            use_gated_mlp=False,
            hidden_act="gelu",
            pos_embed_rescale=2.0,
        ),
    ),
    "facebook/dinov2-with-registers-base": (
        "dinov2_with_registers",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            mlp_ratio=4,
            patch_size=14,
            image_size=518,
            num_register_tokens=4,
            layerscale_value=1.0,
            layer_norm_eps=1e-6,
            qkv_bias=True,
            use_swiglu_ffn=False,
            hidden_act="gelu",
            interpolate_antialias=True,
            interpolate_offset=0.0,
        ),
    ),
    "google/t5gemma-2b-2b-ul2": (
        "t5gemma_encoder",
        dict(
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=256000,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            rms_norm_eps=1e-6,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
}

# The text encoder runs on fixed-size chunks of captions (pixelrun/model/text.py, TextEncoder.encode).
TEXT_CHUNK = inspect.signature(TextEncoder).parameters["chunk_size"].default


def build_random(model_type: str, fields: dict, device="cpu", dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A network of the given architecture with transformers' random initialisation (in `dtype`,
    default fp32)."""
    import transformers

    config: transformers.PretrainedConfig
    cls: type[PreTrainedModel]
    if model_type == "t5gemma_encoder":  # as pixelrun/model/text.py's load_text_encoder builds T5Gemma
        config = transformers.T5GemmaConfig(encoder=fields, decoder=fields, is_encoder_decoder=False)
        cls = transformers.T5GemmaEncoderModel
    else:
        config = transformers.AutoConfig.for_model(model_type, **fields)
        cls = {
            "dinov3_vit": transformers.DINOv3ViTModel,
            "dinov2_with_registers": transformers.Dinov2WithRegistersModel,
        }[model_type]
    with torch.device(device):
        # transformers wraps PreTrainedModel.to in a decorator whose stub hides Module.to's signature
        return cls(config).to(dtype or torch.float32).eval().requires_grad_(False)  # type: ignore[arg-type]


def local_copy(spec: str) -> str | None:
    """A local folder for `spec`: the folder itself, or the Hugging Face cache's snapshot of a hub
    id (never the network); None when neither exists."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return path
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def _unknown(key: str, spec: str, architectures: dict[str, tuple[str, dict]]) -> ConfigError:
    return ConfigError(
        key,
        f"{spec!r} is neither a local folder nor in the Hugging Face cache, and bench has no "
        f"architecture for it to time with random weights (known: {', '.join(architectures)})",
    )


def check_networks(cfg, architectures: dict[str, tuple[str, dict]] = ARCHITECTURES) -> None:
    """Before any work: every network is on this machine or can be built from its architecture."""
    for key, spec in training_networks(cfg):
        if local_copy(spec) is None and spec not in architectures:
            raise _unknown(key, spec, architectures)


def resolve_teachers(cfg, tmp: str, architectures: dict[str, tuple[str, dict]] = ARCHITECTURES) -> tuple[dict, dict]:
    """A local folder for each DINO teacher the config turns on ({key: folder}), and a note per
    teacher. A teacher with no local copy is built with random weights of its hub architecture and
    saved under `tmp`, so that it loads through the real loading code (teachers/features.py)."""
    folders, notes = {}, {}
    every = [c for _, _, c in stage_plan(cfg)]
    for key, spec in training_networks(cfg):
        if key == "text.encoder":
            continue
        path = local_copy(spec)
        if path is not None:
            notes[key] = f"{spec} (trained weights, {path})"
        elif spec in architectures:
            path = os.path.join(tmp, key)
            model_type, fields = architectures[spec]
            build_random(model_type, fields).save_pretrained(path)
            notes[key] = f"{spec}: random weights of its architecture (not on this machine; they time the same)"
        else:
            raise _unknown(key, spec, architectures)
        folders[key] = path
    if (
        any(c.perceptual.lpips_weight > 0 for c in every)
        and cfg.perceptual.lpips in ("stlpips-vgg", "stlpips")
        and importlib.util.find_spec("stlpips_pytorch") is None
    ):
        folders["perceptual.lpips"] = "path:" + random_lpips_files(os.path.join(tmp, "lpips"))
        notes["perceptual.lpips"] = (
            "stlpips-vgg is not installed here: standard LPIPS VGG16 with random weights "
            "stands in (the same convolutions; ST-LPIPS adds a blur at each pool)"
        )
    return folders, notes


def random_lpips_files(folder: str) -> str:
    """The two files `load_lpips("path:FOLDER")` reads (torchvision-layout VGG16 and the heads),
    with random weights."""
    from pixelrun.teachers.lpips import LPIPS

    net = LPIPS("vgg16")
    os.makedirs(folder, exist_ok=True)
    torch.save(
        {f"features.{k}": v for k, v in net.net.features.state_dict().items()}, os.path.join(folder, "vgg16.pth")
    )
    torch.save({f"lin{i}.weight": lin.weight for i, lin in enumerate(net.lins)}, os.path.join(folder, "vgg.pth"))
    return folder


def text_encoder_dtype(device) -> torch.dtype:
    """bf16 on CUDA (as caption embeddings are stored: `pixelrun data convert`'s default; a
    2.6B-parameter T5Gemma in fp32 would dominate the step), fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def text_encoder_for_timing(
    spec: str, device, architectures: dict[str, tuple[str, dict]] = ARCHITECTURES
) -> tuple[PreTrainedModel, str]:
    """The encoder `text.encoder` names, on the device in `text_encoder_dtype`, or with random
    weights of its hub architecture when it is not on this machine; and a note saying which."""
    dtype = text_encoder_dtype(device)
    name = str(dtype).removeprefix("torch.")
    if spec != "minilm":
        path = local_copy(spec)
        if path is None:
            if spec not in architectures:
                raise _unknown("text.encoder", spec, architectures)
            model_type, fields = architectures[spec]
            return (
                build_random(model_type, fields, device=device, dtype=dtype),
                f"{spec}: random weights of its architecture, {name} (not on this machine; they time the same)",
            )
        spec = path
    return (
        load_text_encoder(spec, dtype=dtype, device=device)[0],
        f"{spec} (trained weights, {resolve_encoder(spec)}), {name}",
    )


@torch.no_grad()
def time_text_encoder(model: PreTrainedModel, captions: int, tokens: int, device, *, steps: int, warmup: int) -> float:
    """Median seconds to encode `captions` new captions of `tokens` tokens each, as training does it:
    chunks of TEXT_CHUNK rows (pixelrun/model/text.py), every token real (the longest captions)."""
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, torch.nn.Embedding):
        raise TypeError(f"{type(model).__name__}'s input embeddings are a {type(embeddings).__name__}, not a table")
    vocab = embeddings.num_embeddings
    ids = torch.randint(0, vocab, (TEXT_CHUNK, tokens), device=device)
    mask = torch.ones_like(ids)

    def encode():
        for _ in range(math.ceil(captions / TEXT_CHUNK)):
            model(input_ids=ids, attention_mask=mask)

    return median_seconds(encode, device, steps=steps, warmup=warmup)


def median_seconds(run, device, *, steps: int, warmup: int) -> float:
    """Median wall time of `run()` over `steps` calls after `warmup` untimed ones, the device
    synchronised around each call (CUDA runs asynchronously)."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times = []
    for _ in range(warmup + steps):
        t0 = now()
        run()
        times.append(now() - t0)
    return median(times[warmup:])


def time_newton_schulz(cfg, text_dim: int, device, *, steps: int, warmup: int) -> tuple[float, list]:
    """Median seconds of one Newton-Schulz pass over every Muon matrix of the model (grouped by
    shape, in optimizer.muon_precision), and the matrices' shapes."""
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in split_parameters(model_from_config(cfg, text_dim))[0]]
    mats = [torch.randn(s, device=device) for s in shapes]
    dtype = NS_DTYPES[cfg.optimizer.muon_precision]
    ns_steps = cfg.optimizer.muon_ns_steps
    return median_seconds(
        lambda: orthogonalize_many(mats, ns_steps, dtype=dtype), device, steps=steps, warmup=warmup
    ), shapes


def stage_projection(
    cfg, gpus: int, step: dict, text_seconds: float, ns_seconds: float | None, shapes: list, loader_cores: int
) -> dict:
    """One stage's time on `gpus` GPUs from its measured parts (weak scaling; see the module)."""
    global_batch, micro, accum = batch_split(cfg, gpus)
    shard_group = gpus // cfg.parallel.replicate
    optimizer = step["optimizer_seconds_median"]
    if ns_seconds is not None:  # Muon: the elementwise rest splits evenly, Newton-Schulz by owner
        cost = [newton_schulz_flops(s, cfg.optimizer.muon_ns_steps) for s in shapes]
        owners = balanced_owners(shapes, shard_group, cfg.optimizer.muon_ns_steps)
        busiest = max(sum(c for c, o in zip(cost, owners) if o == r) for r in range(shard_group)) / sum(cost)
        per_rank_optimizer = max(optimizer - ns_seconds, 0.0) / shard_group + ns_seconds * busiest
    else:
        busiest = None
        per_rank_optimizer = optimizer / shard_group
    micro_step = step["forward_backward_seconds_median"] + text_seconds
    seconds = accum * micro_step + per_rank_optimizer
    images_per_s = global_batch / seconds  # all GPUs together
    stored = accum * step["forward_backward_seconds_median"] + per_rank_optimizer  # no text encoder in the step
    steps = cfg.train.steps
    return {
        "steps": steps,
        "global_batch": global_batch,
        "micro_batch": micro,
        "accumulation": accum,
        "resolution": cfg.data.resolution,
        "terms": step["terms"],
        "routing_ratio": cfg.routing.ratio,
        "forward_backward_seconds": step["forward_backward_seconds_median"],
        "text_encoder_seconds": text_seconds,
        "optimizer_seconds_one_device": optimizer,
        "newton_schulz_seconds_one_device": ns_seconds,
        "newton_schulz_busiest_share": busiest,
        "optimizer_seconds_per_rank": per_rank_optimizer,
        "step_seconds": seconds,
        "images_per_s": images_per_s,
        "images_per_s_per_gpu": images_per_s / gpus,
        "loader_images_per_s_per_core": images_per_s / gpus / loader_cores,
        "hours": steps * seconds / 3600,
        "gpu_hours": steps * seconds / 3600 * gpus,
        "mfu": step["model_flops_per_image"] * images_per_s / gpus / step["peak_flops"] if step["peak_flops"] else None,
        "step_seconds_stored_embeddings": stored,
        "images_per_s_stored_embeddings": global_batch / stored,
        "hours_stored_embeddings": steps * stored / 3600,
        "peak_memory_gib": step["peak_memory_gib"],
    }


def project(
    config: str | None,
    overrides: list[str],
    *,
    gpus: int,
    micro_batch: int | None = None,
    loader_cores: int = 8,
    steps: int = 3,
    warmup: int = 1,
    out: str | None = None,
    architectures: dict[str, tuple[str, dict]] = ARCHITECTURES,
) -> dict:
    """Measure every stage of the config on this machine and project the run onto `gpus` GPUs."""
    _check_flags(gpus, loader_cores, micro_batch, steps, warmup)
    cfg = load_config(config, overrides)
    stage_cfgs = _stage_configs(cfg, gpus, micro_batch)  # every split checked before any (slow) work
    device = resolve_device(cfg.hardware.device)
    check_networks(cfg, architectures)

    # The text encoder first, on its own: a 2.6B-parameter encoder need not share memory with the rest.
    encoder, text_note = text_encoder_for_timing(cfg.text.encoder, device, architectures)
    text_dim = _hidden_size(encoder.config)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in model_from_config(cfg, text_dim).parameters())
    text_seconds = [
        time_text_encoder(encoder, c.train.batch_size, cfg.text.max_tokens, device, steps=steps, warmup=warmup)
        for c in stage_cfgs
    ]
    del encoder

    with tempfile.TemporaryDirectory(prefix="pixelrun-bench-") as tmp:
        folders, teacher_notes = resolve_teachers(cfg, tmp, architectures)
        timing = _Timing(text_dim, cfg.text.max_tokens, device, steps, warmup)
        stages = [
            _stage(name, c, folders, text_s, gpus, loader_cores, timing)
            for name, c, text_s in zip(_stage_names(cfg), stage_cfgs, text_seconds)
        ]
    hours = sum(s["hours"] for s in stages)
    hours_stored = sum(s["hours_stored_embeddings"] for s in stages)
    report = {
        "device": device_name(device),
        "model": f"{cfg.model.preset} ({parameters:,} parameters)",
        "gpus": gpus,
        "replicate": cfg.parallel.replicate,
        "loader_cores_per_gpu": loader_cores,
        "steps": steps,
        "warmup": warmup,
        "micro_batch_override": micro_batch,
        "text_encoder": text_note,
        "teachers": teacher_notes,
        "stages": stages,
        "hours": hours,
        "gpu_hours": hours * gpus,
        "hours_stored_embeddings": hours_stored,
        "gpu_hours_stored_embeddings": hours_stored * gpus,
        "seed": {**SEED, "gpu_hours": SEED_HOURS * SEED_GPUS},
        "dollars_at_seed_rate": hours * gpus * SEED_DOLLARS / (SEED_HOURS * SEED_GPUS),
        "assumptions": ASSUMPTIONS,
        "torch": torch.__version__,
        "config": to_dict(cfg),
    }
    if out:
        write_atomic(Path(out), json.dumps(report, indent=2) + "\n")
    return report


def _check_flags(gpus: int, loader_cores: int, micro_batch: int | None, steps: int, warmup: int) -> None:
    if gpus < 1:
        raise ConfigError("--gpus", f"must be at least 1; got {gpus}")
    if loader_cores < 1:
        raise ConfigError("--loader-cores", f"must be at least 1; got {loader_cores}")
    if micro_batch is not None and micro_batch < 1:
        raise ConfigError("--micro-batch", f"must be at least 1; got {micro_batch}")
    if steps < 1 or warmup < 0:
        raise ConfigError("--steps" if steps < 1 else "--warmup", "needs a timed step and no negative warm-up")


def _stage_configs(cfg: Config, gpus: int, micro_batch: int | None) -> list[Config]:
    """Each stage's own config, with its steps and the --micro-batch override; raises ConfigError
    where a stage's batch does not split over `gpus`."""
    plan = stage_plan(cfg)
    out = []
    for i, (_, _, c) in enumerate(plan):
        c = copy.deepcopy(c)
        if micro_batch is not None:
            c.train.batch_size = micro_batch
        c.train.steps = plan[i][1] - plan[i][0]
        batch_split(c, gpus)
        out.append(c)
    return out


def _stage_names(cfg: Config) -> list[str]:
    return [st.name or f"stage{i + 1}" for i, st in enumerate(cfg.stages)] or ["run"]


@dataclass(frozen=True)
class _Timing:
    """How every stage is timed: the text width and tokens, the device, timed and warm-up steps."""

    text_dim: int
    text_tokens: int
    device: torch.device
    steps: int
    warmup: int


def _stage(name: str, c: Config, folders: dict, text_s: float, gpus: int, loader_cores: int, t: _Timing) -> dict:
    """One stage measured (its step, and Newton-Schulz with Muon) and projected onto `gpus` GPUs;
    `folders`: the teachers' local folders by config key."""
    for key, path in folders.items():
        section, field = key.split(".")
        setattr(getattr(c, section), field, path)
    step = time_steps(
        c, text_dim=t.text_dim, steps=t.steps, warmup=t.warmup, text_tokens=t.text_tokens, count_flops=False
    )
    ns, shapes = (
        time_newton_schulz(c, t.text_dim, t.device, steps=t.steps, warmup=t.warmup)
        if c.optimizer.name == "muon"
        else (None, [])
    )
    return {"name": name, **stage_projection(c, gpus, step, text_s, ns, shapes, loader_cores), "measured": step}


ASSUMPTIONS = (
    "weak scaling: every GPU runs the measured micro-step at the measured speed, accumulation steps one "
    "after another; communication (FSDP all-gathers / reduce-scatters, Muon's all_to_alls) not measured, "
    "assumed hidden under compute; the optimizer's elementwise work split over a shard group, "
    "Newton-Schulz over its balanced owners; every caption encoded anew (no cache hits; the "
    "stored-embeddings figures leave the encoder out instead); square images at the stage resolution; "
    "the loader keeps up"
)


def _rate(x: float) -> str:
    """A rate with enough digits to read: 1,234 / 12.3 / 0.0123."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:,.1f} min"


def format_projection(r: dict) -> str:
    """The printed report: per stage the measured parts, the step on N GPUs, the loader rate needed
    and the projected hours; then the total beside the seed's figure, and the assumptions."""
    n = r["gpus"]
    lines = [
        f"measured on {r['device']}; projected onto {n} GPU{'s' if n > 1 else ''}"
        + (f" ({r['replicate']} replica groups)" if r["replicate"] > 1 else ""),
        f"model: {r['model']}; text encoder: {r['text_encoder']}",
    ]
    lines += [f"{k}: {v}" for k, v in r["teachers"].items()]
    if r["device"].startswith("cpu"):
        lines.append("(these are this CPU's times: on GPUs run the same command there for real numbers)")
    for s in r["stages"]:
        m = s["measured"]
        ns = (
            f" (Newton-Schulz {s['newton_schulz_seconds_one_device']:.3f} s on one device; busiest owner's share "
            f"{s['newton_schulz_busiest_share']:.1%})"
            if s["newton_schulz_seconds_one_device"] is not None
            else ""
        )
        lines += [
            "",
            f"{s['name']}: {s['steps']:,} steps, {s['resolution']}px, global batch {s['global_batch']} = {n} GPUs x "
            f"micro-batch {s['micro_batch']} x {s['accumulation']} accumulation step(s); losses {', '.join(s['terms'])}"
            + (f"; TREAD {s['routing_ratio']:g}" if s["routing_ratio"] > 0 else ""),
            f"  micro-step per GPU: forward+backward {s['forward_backward_seconds']:.3f} s "
            f"({m['precision']}, {'compiled' if m['compiled'] else 'eager'}), text encoder "
            f"{s['text_encoder_seconds']:.3f} s",
            f"  optimizer {m['optimizer']}: {s['optimizer_seconds_one_device']:.3f} s on one device{ns}, "
            f"{s['optimizer_seconds_per_rank']:.3f} s per rank on {n}",
            f"  step on {n} GPUs: {s['step_seconds']:.3f} s -> {_rate(s['images_per_s'])} images/s "
            f"({_rate(s['images_per_s_per_gpu'])} per GPU)" + (f", MFU {s['mfu']:.1%}" if s["mfu"] is not None else ""),
            f"  loader must deliver {_rate(s['images_per_s_per_gpu'])} images/s per GPU: "
            f"{_rate(s['loader_images_per_s_per_core'])} images/s per core with {r['loader_cores_per_gpu']} loader "
            f"cores per GPU",
            f"  projected: {_duration(s['hours'])}, {s['gpu_hours']:,.1f} GPU-hours; with stored caption "
            f"embeddings {_duration(s['hours_stored_embeddings'])} ({_rate(s['images_per_s_stored_embeddings'])} "
            f"images/s)"
            + (f"; peak memory {s['peak_memory_gib']:.1f} GiB per GPU" if s["peak_memory_gib"] is not None else ""),
        ]
    seed = r["seed"]
    lines += [
        "",
        f"total: {_duration(r['hours'])} on {n} GPUs, {r['gpu_hours']:,.1f} GPU-hours "
        f"(${r['dollars_at_seed_rate']:,.0f} at the seed's ${seed['dollars'] / seed['gpu_hours']:.2f} per "
        f"GPU-hour); with stored caption embeddings {_duration(r['hours_stored_embeddings'])}, "
        f"{r['gpu_hours_stored_embeddings']:,.1f} GPU-hours",
        f"the seed's figure: {seed['hours']:.0f} h on {seed['gpus']} {seed['gpu']}s, {seed['gpu_hours']:.0f} "
        f"GPU-hours, about ${seed['dollars']:,.0f}",
        f"assumptions: {r['assumptions']}",
    ]
    return "\n".join(lines)
