"""Checkpoints: one directory per saved step, written under a temporary name and renamed.

    <run>/checkpoints/step_00001000/.metadata, *.distcp  model, EMA, optimizer: torch.distributed
                                                          .checkpoint, each rank writes its shards
    <run>/checkpoints/step_00001000/meta.pt               step, scheduler, data position per rank,
                                                          RNG, config, text width, world size
    <run>/checkpoints/step_00001000/config.yaml           the resolved config that made it
    <run>/checkpoints/step_00001000/manifest.json         every other file's size and CRC-32, written last

The tensors are saved by parameter name, not by rank, so a checkpoint written by 2 ranks loads on
1 and the other way round (DCP reshards on load). One process needs no process group for this.
A directory only gets its final name once every rank's files and `meta.pt` are complete and
flushed, so a crash or a kill mid-save leaves at most a `.tmp-*` directory, which is ignored and
cleaned up later. A resume checks every file against `manifest.json` (`verified_latest`) and falls
back to the previous checkpoint when one does not match (the damaged one is moved aside, never
deleted); rotation never deletes the checkpoint just written, nor any newer one. The readers
(`pixelrun sample`, `eval`, `export`) check the same and skip a damaged newest checkpoint, moving
nothing (`ReadChoice`).

This module: the layout, loading and exporting. Writing one is pixelrun/infra/checkpoint_save.py,
checking one against its manifest pixelrun/infra/checkpoint_verify.py; what is saved, part by part,
is pixelrun/training/state.py, and the meta's fields are `CheckpointMeta` (pixelrun/infra/records.py).

An exported model (`pixelrun export`) is a directory with `model.safetensors` and `config.yaml`;
`resolve_checkpoint` and `load_weights` accept it wherever a checkpoint is accepted.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException

from pixelrun.config import RunFailed
from pixelrun.infra.files import write_atomic
from pixelrun.infra.records import CheckpointMeta, RecordError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
EXPORT_FILE = "model.safetensors"


class CheckpointError(RunFailed):
    """A checkpoint that cannot be written (no space) or no checkpoint that can be trusted: one line."""


READ_ERRORS = (Exception, CheckpointException)  # DCP's is a BaseException, wrapping each rank's


def failure(e: BaseException) -> str:
    """A read that failed, in a few words on one line: the kind of the underlying exception (DCP's
    wraps each rank's; a RecordError the one torch.load raised) and, where it is pixelrun's own
    or short, its message."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    elif e.__context__ is not None and isinstance(e, RecordError):
        e = e.__context__  # the message of torch.load's unpickler runs over many lines
    lines = str(e).strip().splitlines()
    if not lines or (len(lines) > 1 and not isinstance(e, RunFailed)):
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0][:200]}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_of(path: Path) -> int:
    """The step of a checkpoint directory `step_XXXXXXXX` (a ValueError for any other name)."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_XXXXXXXX)")
    return int(match.group(1))


def first_nonfinite(tree, ctx=None, prefix: str = "") -> str | None:
    """The dotted name of the first floating-point tensor of a state dict tree holding a NaN or an
    infinity (this rank's shards; the ranks agree), or None. One pass over the state: checkpoint
    time only."""

    def walk(node, name):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from walk(v, f"{name}.{i}")
        elif isinstance(node, torch.Tensor):
            yield name, node

    found = None
    for name, t in walk(tree, prefix):
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            found = name
            break
    names = [n for n in ([found] if ctx is None else ctx.gather_objects(found)) if n is not None]
    return names[0] if names else None


def load_tensors(path: str | Path, tensors: dict, partial: bool = False) -> None:
    """Fill the (possibly sharded) state dict tree `tensors` in place from a checkpoint. With
    `partial`, keys the checkpoint lacks keep their current values."""
    with single_process_quiet():
        dcp.load(tensors, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=partial))


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every save and load without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        yield


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, by flattened name, in this process alone (no collective):
    for comparing checkpoints, not for training."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata)
    }
    with single_process_quiet():
        dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    return flat


def saved_keys(path: str | Path) -> set[str]:
    """Every tensor name in a checkpoint (flattened, e.g. "model.denoiser.blocks.0.up_proj.weight")."""
    reader = dcp.FileSystemReader(str(path))
    return set(reader.read_metadata().state_dict_metadata)


def load_meta(path: str | Path) -> CheckpointMeta:
    """The meta of a checkpoint directory (any pixelrun's: older formats read too)."""
    return CheckpointMeta.read(path)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (a checkpoint is renamed into place only once all of it is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (newest checkpoint), a checkpoint directory, or an exported model."""
    p = Path(path)
    if p.is_file() and p.name in ("meta.pt", EXPORT_FILE):
        p = p.parent
    if is_complete(p) or (p / EXPORT_FILE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    if (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{p} is a diffusers pipeline (`pixelrun export --format diffusers`): load it with "
            f"diffusers' PRXPixelPipeline.from_pretrained. pixelrun itself reads a run directory, "
            f"a checkpoints/step_* directory or a `pixelrun export` (--format safetensors) directory"
        )
    raise FileNotFoundError(
        f"no checkpoint found at {p} (expected a run directory, a checkpoints/step_* "
        f"directory or a `pixelrun export` directory)"
    )


def ema_key(decay: float) -> str:
    """Where a checkpoint keeps the EMA of `decay` when it is not the run's first (whose keys are
    ``ema.*`` as before there were several): ``ema.decay_0p9999.*`` for 0.9999."""
    return "decay_" + repr(float(decay)).replace(".", "p").replace("-", "m")


def saved_ema_decays(config: dict) -> list[float]:
    """The EMA decays a checkpoint keeps, from its saved config (config.ema_decays' rule on a plain
    mapping: older checkpoints have no ema.decays and keep one EMA, ema.decay's)."""
    ema = config.get("ema") or {}
    return [float(d) for d in ema.get("decays") or [ema.get("decay", 0.0)]]


def ema_prefix(path: str | Path, decay: float | None) -> str:
    """The tree key under ``ema`` that holds the EMA of `decay` in a checkpoint ("" for its first,
    None = the first); ValueError naming the decays kept when it has none of that decay."""
    decays = saved_ema_decays(saved_config(path)[0])
    if decay is None or float(decay) == decays[0]:
        return ""
    if float(decay) not in decays:
        kept = ", ".join(f"{d:g}" for d in decays)
        raise ValueError(f"{Path(path).name} keeps the EMA of decay {kept}, not {decay:g}")
    return ema_key(float(decay))


def load_weights(
    path: str | Path,
    model: torch.nn.Module,
    weights: str = "ema",
    decay: float | None = None,
    select: Callable[[str], bool] | None = None,
) -> None:
    """Load EMA (of `decay`; None = the run's first) or raw weights of a checkpoint (or an exported
    model) into a plain, unsharded model. `select`: only the tensors whose names it takes (a LoRA
    checkpoint holds its adapters alone), the others left as they are."""
    if weights not in ("ema", "raw"):
        raise ValueError("weights must be ema or raw")
    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path / EXPORT_FILE)))
        return
    sd = {k: v for k, v in model.state_dict().items() if select is None or select(k)}
    prefix = ema_prefix(path, decay) if weights == "ema" else ""
    if weights == "ema":
        tree: dict = {"ema": {prefix: sd} if prefix else sd}
    else:
        tree = {"model": {f"denoiser.{k}": v for k, v in sd.items()}}
    load_tensors(path, tree)
    if weights == "ema":
        flat = tree["ema"][prefix] if prefix else tree["ema"]
    else:
        flat = {k[len("denoiser.") :]: v for k, v in tree["model"].items()}
    model.load_state_dict(flat, strict=select is None)


EXPORT_MARKER = "pixelrun-export.json"  # what makes a folder one that `pixelrun export` may replace


class UnsafeOutput(ValueError):
    """An output folder that an export must not replace (the CLI names `--out`)."""


def check_export_target(out: str | Path, source: str | Path) -> None:
    """Refuse any `--out` that writing an export could destroy: the checkpoint it reads (or a folder
    holding it, such as its run), the current folder or one above it, and any folder that is neither
    empty nor an earlier export of pixelrun (recognised by its `EXPORT_MARKER`)."""
    out, source, here = Path(out).resolve(), Path(source).resolve(), Path.cwd().resolve()
    if out == source or out in source.parents or source in out.parents:
        raise UnsafeOutput(f"{out} is or holds the checkpoint {source} that is being exported; choose another folder")
    if out == here or out in here.parents:
        raise UnsafeOutput(f"{out} is the current folder or one above it; export into a new folder")
    if out.exists() and not out.is_dir():
        raise UnsafeOutput(f"{out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise UnsafeOutput(
            f"{out} is not empty and is not an earlier pixelrun export (no {EXPORT_MARKER}); "
            f"export into a new or empty folder"
        )


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _readable(root: Path) -> None:
    """Files as the user's umask would create them (tempfile-made ones are private: 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _remove_dead_temps(out: Path) -> None:
    """Temporary folders beside `out` left by a process that was killed while writing it (its pid
    no longer runs on this host)."""
    for p in out.parent.glob(f".tmp-{glob.escape(out.name)}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(out: str | Path, marker: dict | None = None):
    """Yield a temporary directory beside `out`; when the block ends without an error it takes the
    place of `out`. An existing `out` (empty, or an earlier export: `check_export_target` is the
    caller's job) is swapped out in one step and only then deleted, so at every moment `out` is
    either the old complete directory or the new one. `marker`, when given, is written as
    `EXPORT_MARKER` so a later export may replace the folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if marker is not None:
            write_atomic(tmp / EXPORT_MARKER, json.dumps(marker, indent=2) + "\n")
        _readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        os.replace(tmp, out)
    elif exchange_dirs(tmp, out):
        shutil.rmtree(tmp)  # now holds the old directory
    else:  # no atomic exchange here: move the old one aside first, put it back if the new one fails
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
    fsync_dir(out.parent)


def export_marker(fmt: str, checkpoint: str | Path, weights: str) -> dict:
    return {"format": fmt, "checkpoint": str(Path(checkpoint).resolve()), "weights": weights}


def export_weights(
    checkpoint: str | Path,
    out: str | Path,
    model: torch.nn.Module,
    config_yaml: str,
    text_dim: int,
    weights: str = "ema",
) -> Path:
    """`model`, loaded with the `weights` of `checkpoint`, as a consolidated safetensors file (whatever
    the number of ranks that trained it) plus the config, written atomically; `pixelrun sample
    --checkpoint OUT` accepts the directory. A non-finite weight is refused, naming the tensor,
    before anything is written."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    refuse_nonfinite(state, f"the {weights} weights of {checkpoint}")
    with atomic_dir(out, export_marker("safetensors", checkpoint, weights)) as tmp:
        save_file(state, str(tmp / EXPORT_FILE), metadata={"text_dim": str(text_dim), "weights": weights})
        write_atomic(tmp / "config.yaml", config_yaml)
    return Path(out)


def refuse_nonfinite(state: dict, what: str) -> None:
    """An export never writes a NaN or an infinity: a CheckpointError naming the tensor."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{what} hold non-finite values ({bad}); nothing exported: use an earlier checkpoint")


def saved_config(path: str | Path) -> tuple[dict, int]:
    """(config dict, text width) of a checkpoint directory or an exported model directory. For a
    checkpoint of a staged run, the config is the one of the stage it was saved in (its resolution,
    batch, loss weights): what the weights were last trained with, so inference defaults follow it."""
    path = Path(path)
    if is_complete(path):
        meta = load_meta(path)
        return _stage_dict(meta.config, meta.stage), meta.text_dim
    import yaml
    from safetensors import safe_open

    file = path / EXPORT_FILE
    try:  # an exported model's files: safetensors and YAML raise many kinds on a damaged one
        with safe_open(str(file), "pt") as f:
            text_dim = int(f.metadata()["text_dim"])
        file = path / "config.yaml"
        config = yaml.safe_load(file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a mapping of config keys")
    except READ_ERRORS as e:
        raise CheckpointError(f"{file} cannot be read ({failure(e)})") from None
    return config, text_dim


def _stage_dict(config: dict, stage: int | None) -> dict:
    if not config.get("stages") or stage is None:
        return config
    from pixelrun.config import config_from_dict, stage_plan, to_dict

    return to_dict(stage_plan(config_from_dict(config))[stage][2])
