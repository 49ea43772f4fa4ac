"""Resume, in one room: which checkpoint a run continues, whether its config may continue it, the
restore of every part (pixelrun/training/state.py), the batch source put back at its position, and
`run.init_from` (weights of another run or an export, nothing else), and going back: `--from-checkpoint`
(`go_back_to`) and the fall-back after a resume that diverged again (`fall_back`), both setting the
checkpoints they pass over aside (`checkpoints/aside-step_N`), never deleting them.

    start = choose_start(cfg, ctx, say, from_checkpoint)  # before any work: a refused resume costs nothing
    check_init_from(cfg, start.init_from, dim) # once the text width is known
    base = lora_base(cfg, start, say)           # LoRA: the frozen weights, on a resume too
    checkpointer, counters, position = run_parts(cfg, ctx, st, dim)
    restore(start, checkpointer, st, steps, say, ctx)
    position.place(source, stage, steps_into_stage, accum)  # at each stage's start
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pixelrun.config import Config, ConfigError, config_from_dict, model_fields, resume_changes
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint import READ_ERRORS, failure
from pixelrun.infra.checkpoint_save import remove_stale
from pixelrun.infra.checkpoint_verify import ReadChoice, verified_latest
from pixelrun.infra.distributed import DistContext
from pixelrun.infra.records import CheckpointMeta
from pixelrun.model.denoiser import PRXDenoiser
from pixelrun.model.lora import has_adapters, lora_on
from pixelrun.training.build import TrainState
from pixelrun.training.state import Checkpointer, Counters, DataPosition, RNGState, RunIdentity

Say = Callable[..., None]


@dataclass
class Start:
    """What a run starts from: a checkpoint of its own folder to resume (`path`, `meta`), weights to
    initialise from (`init_from`, a new run), or neither."""

    path: Path | None = None
    meta: CheckpointMeta | None = None
    init_from: Path | None = None
    model_init: Path | None = None  # model.init's transformer folder (pixelrun/model/import_diffusers.py)


def choose_start(
    cfg: Config, ctx: DistContext, say: Say, from_checkpoint: str | None = None, model_init: Path | None = None
) -> Start:
    """The newest checkpoint of run.dir whose every file matches its manifest (with run.resume), its
    config checked as a continuation of this one; else run.init_from's checkpoint. The run's lock is
    held: a temporary folder left in it is a save that died, removed here. `from_checkpoint`
    (`pixelrun train --from-checkpoint step_N`) first sets the checkpoints after step N aside."""
    run_dir = Path(cfg.run.dir)
    if ctx.is_main:
        remove_stale(run_dir)
    if from_checkpoint is not None:
        go_back_to(cfg, from_checkpoint, ctx, say)
    path, meta = verified_latest(run_dir, ctx, say) if cfg.run.resume else (None, None)
    if path is not None and meta is not None:
        for line in check_resume(cfg, meta.config, path):
            say(line)
        return Start(path, meta)
    return Start(init_from=init_source(cfg.run.init_from, say) if cfg.run.init_from else None, model_init=model_init)


def init_source(spec: str, say: Say) -> Path:
    """`run.init_from`'s checkpoint, verified as `pixelrun sample` verifies one (`ReadChoice`): a run
    folder gives its newest checkpoint whose files match their manifest, each newer one skipped with
    a line; a checkpoint named that fails is refused in one line naming the key."""
    try:
        return ReadChoice.open(spec, say).path
    except ConfigError as e:  # ReadChoice names --checkpoint, the readers' flag
        raise ConfigError("run.init_from", str(e).removeprefix(f"{e.key}: ")) from None
    except FileNotFoundError as e:
        raise ConfigError("run.init_from", str(e)) from None


@dataclass(frozen=True)
class LoRABase:
    """Where a LoRA run's frozen weights come from, read again by every session (its checkpoints hold
    only the adapters): a diffusers transformer folder (model.init, `imported`) or a pixelrun
    checkpoint or export (run.init_from)."""

    path: Path
    imported: bool


def lora_base(cfg: Config, start: Start, say: Say, model_init: Path | None = None) -> LoRABase | None:
    """A LoRA run's frozen base weights; None when every weight trains."""
    if not lora_on(cfg):
        return None
    import peft  # noqa: F401  (before any work: the lora extra missing is one line, pixelrun/cli/__init__.py)

    if model_init is not None:
        return LoRABase(model_init, imported=True)
    if not cfg.run.init_from:
        return None
    return LoRABase(start.init_from or init_source(cfg.run.init_from, say), imported=False)


def base_loader(base: LoRABase) -> Callable[[PRXDenoiser], None]:
    """Loads the base's weights (a checkpoint's EMA, or an export's: what `pixelrun sample` would use;
    or model.init's transformer) into a plain model, for `build_state` to add the adapters to;
    unreadable or non-finite weights refused in one line naming run.init_from or model.init."""
    from pixelrun.model.import_diffusers import load_into

    def load(model: PRXDenoiser) -> None:
        if base.imported:
            load_into(base.path, model)
            return
        _read_init(base.path, lambda: ckpt.load_weights(base.path, model, "ema"))
        _refuse_nonfinite(base.path, ckpt.first_nonfinite(model.state_dict()))

    return load


def run_parts(
    cfg: Config, ctx: DistContext, st: TrainState, text_dim: int
) -> tuple[Checkpointer, Counters, DataPosition]:
    """Every stateful part of a run, in load order (the RNG after the tensors and the schedule), with
    the counters and the data position the loop updates."""
    counters, position = Counters(), DataPosition(ctx)
    parts = {**st.parts(), "rng": RNGState(), "data": position, "counters": counters, "run": RunIdentity(cfg, text_dim)}
    return Checkpointer(parts), counters, position


def restore(
    start: Start, checkpointer: Checkpointer, st: TrainState, steps: int, say: Say, ctx: DistContext | None = None
) -> None:
    """Every part from the checkpoint resumed (its counters included), or the weights of
    run.init_from; nothing for a fresh run."""
    if start.path is not None and start.meta is not None:
        checkpointer.load(start.path, start.meta)
        step = start.meta.step
        say(f"resuming from {start.path} (step {step}, saved on {start.meta.world_size} rank(s))")
        for line in st.ema.notes:  # an EMA decay the checkpoint does not keep
            say(line)
        if step >= steps:
            say(f"nothing to train: the checkpoint is at step {step} and train.steps is {steps}")
    elif (start.init_from or start.model_init) is not None and has_adapters(st.model):
        say(f"LoRA: the adapters start fresh on the frozen weights of {start.init_from or start.model_init}")
    elif start.init_from is not None:
        for line in [*init_weights(st, start.init_from, ctx), f"initialised weights and EMA from {start.init_from}"]:
            say(line)
    elif start.model_init is not None:
        import_weights(st, start.model_init, ctx)
        say(
            f"initialised weights and EMA from the {start.model_init} PRXTransformer2DModel (model.init); "
            f"the optimizer and the data start afresh"
        )


# ----------------------------------------------------------------------------- going back


def set_aside(path: Path) -> Path:
    """Move a checkpoint out of the ones a run lists, rotates and resumes, keeping it whole:
    ``checkpoints/aside-step_N`` (``-2``, ``-3`` ... when that name is taken). Returns where."""
    aside, n = path.with_name(f"aside-{path.name}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"aside-{path.name}-{n}")
    os.replace(path, aside)
    return aside


def find_checkpoint(run_dir: Path, name: str) -> Path:
    """The checkpoint of run.dir a `--from-checkpoint` names: ``step_N``, ``N``, ``step_0000000N`` or its path."""
    found = ckpt.list_checkpoints(run_dir)
    digits = Path(name.strip()).name.removeprefix("step_")  # a path to it works too
    for path in found:
        if digits.isdigit() and ckpt.step_of(path) == int(digits):
            return path
    have = ", ".join(p.name for p in found) or "none"
    raise ConfigError("--from-checkpoint", f"{name!r} is not a checkpoint of {run_dir} (it has: {have})")


def go_back_to(cfg: Config, name: str, ctx: DistContext, say: Say) -> None:
    """`--from-checkpoint`: check that the named checkpoint may be resumed with this config, then set
    every newer one aside (nothing is deleted), so the resume that follows starts from it."""
    if not cfg.run.resume:
        raise ConfigError("--from-checkpoint", "resumes a checkpoint; it cannot be used with run.resume=false")
    run_dir = Path(cfg.run.dir)
    target = find_checkpoint(run_dir, name)
    check_resume(cfg, ckpt.load_meta(target).config, target)  # refused: nothing moved
    newer = [p for p in ckpt.list_checkpoints(run_dir) if ckpt.step_of(p) > ckpt.step_of(target)]
    if ctx.is_main:
        for path in newer:
            say(f"--from-checkpoint {target.name}: {path.name} set aside to {set_aside(path)}")
    ctx.barrier()


def fall_back(run_dir: Path, started_from: Path | None, wrote: bool) -> str:
    """After a session diverged: where the next run resumes. A resume that diverged before writing a
    checkpoint of its own sets the checkpoint it started from aside (`set_aside`), so the next run
    starts one checkpoint further back; the only checkpoint left is kept. Returns the words."""
    found = ckpt.list_checkpoints(run_dir)
    if started_from is None or wrote or started_from not in found:
        last = found[-1].name if found else None
        return f"the next run resumes from {last}" if last else "there is no checkpoint: the next run starts afresh"
    earlier = [p for p in found if ckpt.step_of(p) < ckpt.step_of(started_from)]
    if not earlier:
        return (
            f"it resumed from {started_from.name}, the run's only checkpoint, and diverged again: "
            f"the next run resumes from it again"
        )
    aside = set_aside(started_from)
    return (
        f"it resumed from {started_from.name} and diverged again, so that checkpoint was set aside to "
        f"{aside} and the next run resumes from {earlier[-1].name} (checkpoints: "
        f"{', '.join(p.name for p in earlier)})"
    )


# ----------------------------------------------------------------------------- what may continue what


def check_resume(cfg: Config, saved: dict, path: Path) -> list[str]:
    """Before any work: a resume must continue the same run. A change of the model, the optimizer or
    the data is a ConfigError naming each key; any other change is returned as a line to print."""
    refused, allowed = resume_changes(config_from_dict(saved), cfg)
    if refused:
        what = ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in refused.items())
        raise ConfigError(
            ", ".join(refused),
            f"differs from the checkpoint {path} that this command would resume: "
            f"{what}. A resume continues the same model, optimizer and data; to "
            f"start a new run from those weights, set run.init_from={path} and a "
            f"new run.dir",
        )
    return [f"changed since the checkpoint: {k}: {a} -> {b}" for k, (a, b) in allowed.items()]


def check_init_from(cfg: Config, path: Path, text_dim: int) -> None:
    """`run.init_from` loads weights into this config's model: the architecture and the text width
    must be the source's (the optimizer and data may differ: it is a new run)."""
    saved, saved_dim = ckpt.saved_config(path)
    if ((saved.get("train") or {}).get("lora") or {}).get("rank") is not None and ckpt.is_complete(path):
        raise ConfigError(
            "run.init_from",
            f"{path} is a checkpoint of a LoRA run, which holds its adapters alone: export it (pixelrun "
            f"export merges them into its base weights) and set run.init_from to the export",
        )
    old, new = model_fields(config_from_dict(saved)), model_fields(cfg)
    diff = [f"model.{k} {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]
    if saved_dim != text_dim:
        diff.append(
            f"text width {saved_dim} -> {text_dim} (text.encoder {saved['text']['encoder']} -> {cfg.text.encoder})"
        )
    if diff:
        raise ConfigError("run.init_from", f"{path} has another architecture: {', '.join(diff)}")


def import_weights(st: TrainState, folder: Path, ctx: DistContext | None = None) -> None:
    """model.init: a diffusers transformer's tensors, each checked by name and shape, into the model
    and every EMA (the EMA starts as these weights); nothing else of the run."""
    from pixelrun.model.import_diffusers import read_weights

    expected = {k: tuple(v.shape) for k, v in st.model.state_dict().items()}  # global shapes under FSDP2
    state = read_weights(folder, expected)
    bad = ckpt.first_nonfinite(state, ctx)
    if bad is not None:
        raise ConfigError("model.init", f"{folder}: its weights hold non-finite values ({bad})")
    _load_everywhere(st, state)


def _load_everywhere(st: TrainState, state: dict) -> None:
    """A full (unsharded) state dict into the model and each EMA copy, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = StateDictOptions(full_state_dict=True)
    for model in (st.model, *st.ema.models):
        set_model_state_dict(model, state, options=full)


def check_model_init(folder: Path, text_dim: int, encoder: str) -> None:
    """model.init's text projection must take the text encoder's width (once that is known)."""
    from pixelrun.model.import_diffusers import check_text_width

    check_text_width(folder, text_dim, encoder)


def init_weights(st: TrainState, path: Path, ctx: DistContext | None = None) -> list[str]:
    """`run.init_from`: weights and EMA of a checkpoint or an exported model, nothing else. Returns
    the notes to print (a REPA projector the source lacks starts fresh). Weights that cannot be read
    or hold a NaN or an infinity are refused in one line: a new run from them could only diverge."""
    parts = st.parts()
    if (path / ckpt.EXPORT_FILE).is_file():  # an exported model: weights only, loaded on each rank
        plain = PRXDenoiser(st.model.cfg)  # an unsharded twin; load_weights checks every shape
        _read_init(path, lambda: ckpt.load_weights(path, plain))
        _refuse_nonfinite(path, ckpt.first_nonfinite(plain.state_dict()))
        _load_everywhere(st, plain.state_dict())
        return []
    saved = ckpt.saved_keys(path)
    tree = {"model": parts["model"].state_dict(), "ema": st.ema.load_tree(ckpt.load_meta(path).config)}
    missing = [k for k in tree["model"] if f"model.{k}" not in saved]
    _read_init(path, lambda: ckpt.load_tensors(path, tree, partial=bool(missing)))
    _refuse_nonfinite(path, ckpt.first_nonfinite(tree, ctx))
    parts["model"].load_state_dict(tree["model"])
    parts["ema"].load_state_dict(tree["ema"])
    notes = list(st.ema.notes)
    if any(k.startswith("repa_projector.") for k in missing):
        notes.append("REPA projector: not in the checkpoint, starting from a fresh one")
    if any(k.startswith("denoiser.sprint.") for k in missing):  # a TREAD or dense source of a SPRINT run
        notes.append("SPRINT fusion and mask token: not in the checkpoint, starting from fresh ones")
    return notes


def _read_init(path: Path, read: Callable[[], None]) -> None:
    try:
        read()
    except READ_ERRORS as e:  # DCP, torch.load and safetensors raise many kinds on a damaged file
        raise ConfigError("run.init_from", f"{path}: its weights cannot be read ({failure(e)})") from None


def _refuse_nonfinite(path: Path, bad: str | None) -> None:
    if bad is not None:
        raise ConfigError(
            "run.init_from",
            f"{path}: its weights hold non-finite values ({bad}); give an earlier checkpoint of that run",
        )
