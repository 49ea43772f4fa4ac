"""Checkpoints: one directory per saved step, written under a temporary name and renamed.

    <run>/checkpoints/step_00001000/.metadata, *.distcp  model, EMA, optimizer: torch.distributed
                                                          .checkpoint, each rank writes its shards
    <run>/checkpoints/step_00001000/meta.pt               step, scheduler, data position per rank,
                                                          RNG, config, text width, world size
    <run>/checkpoints/step_00001000/config.yaml           the resolved config that made it

The tensors are saved by parameter name, not by rank, so a checkpoint written by 2 ranks loads on
1 and the other way round (DCP reshards on load). One process needs no process group for this.
A directory only gets its final name once every rank's files and `meta.pt` are complete and
flushed, so a crash or a kill mid-save leaves at most a `.tmp-*` directory, which is ignored and
cleaned up later.

An exported model (`pixelrun export`) is a directory with `model.safetensors` and `config.yaml`;
`resolve_checkpoint` and `load_weights` accept it wherever a checkpoint is accepted.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

_STEP_DIR = re.compile(r"^step_(\d{8})$")
EXPORT_FILE = "model.safetensors"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path):
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


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict, meta: dict, config_yaml: str, keep: int = 2,
                    ctx=None) -> Path:
    """Write atomically (every rank calls this: the tensor save is collective), then keep only
    the newest `keep` checkpoints. `tensors` is a (possibly sharded) state dict tree; `meta` holds
    plain Python values and small tensors, written by rank 0."""
    main = ctx is None or ctx.is_main
    barrier = ctx.barrier if ctx is not None else (lambda: None)
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    if is_complete(final):
        return final  # this exact step is already saved and complete
    tmp = root / f".tmp-step_{step:08d}"  # one name every rank agrees on
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    with _single_process_quiet():
        dcp.save(tensors, checkpoint_id=str(tmp))  # fsyncs its files
    if main:
        with open(tmp / "meta.pt", "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "config.yaml").write_text(config_yaml)
    barrier()
    if main:
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def load_tensors(path: str | Path, tensors: dict, partial: bool = False) -> None:
    """Fill the (possibly sharded) state dict tree `tensors` in place from a checkpoint. With
    `partial`, keys the checkpoint lacks keep their current values."""
    with _single_process_quiet():
        dcp.load(tensors, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=partial))


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save and load without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def saved_keys(path: str | Path) -> set[str]:
    """Every tensor name in a checkpoint (flattened, e.g. "model.denoiser.blocks.0.up_proj.weight")."""
    reader = dcp.FileSystemReader(str(path))
    return set(reader.read_metadata().state_dict_metadata)


def load_meta(path: str | Path) -> dict:
    return torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)


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
    raise FileNotFoundError(f"no checkpoint found at {p} (expected a run directory, a checkpoints/step_* "
                            f"directory or a `pixelrun export` directory)")


def load_weights(path: str | Path, model: torch.nn.Module, weights: str = "ema") -> None:
    """Load EMA or raw weights of a checkpoint (or an exported model) into a plain, unsharded model."""
    if weights not in ("ema", "raw"):
        raise ValueError("weights must be ema or raw")
    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path / EXPORT_FILE)))
        return
    sd = model.state_dict()
    if weights == "ema":
        tree = {"ema": sd}
    else:
        tree = {"model": {f"denoiser.{k}": v for k, v in sd.items()}}
    load_tensors(path, tree)
    flat = tree["ema"] if weights == "ema" else {k[len("denoiser."):]: v for k, v in tree["model"].items()}
    model.load_state_dict(flat)


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a temporary directory beside `out`; when the block ends without an error it replaces
    `out` in one rename, so `out` is always either the old complete directory or the new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_weights(checkpoint: str | Path, out: str | Path, model: torch.nn.Module, config_yaml: str,
                   text_dim: int, weights: str = "ema") -> Path:
    """A consolidated safetensors file (whatever the number of ranks that trained it) plus the
    config, written atomically; `pixelrun sample --checkpoint OUT` accepts the directory."""
    from safetensors.torch import save_file

    load_weights(checkpoint, model, weights)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / EXPORT_FILE), metadata={"text_dim": str(text_dim), "weights": weights})
        (tmp / "config.yaml").write_text(config_yaml)
    return Path(out)


def saved_config(path: str | Path) -> tuple[dict, int]:
    """(config dict, text width) of a checkpoint directory or an exported model directory."""
    path = Path(path)
    if is_complete(path):
        meta = load_meta(path)
        return meta["config"], meta["text_dim"]
    import yaml
    from safetensors import safe_open

    with safe_open(str(path / EXPORT_FILE), "pt") as f:
        text_dim = int(f.metadata()["text_dim"])
    return yaml.safe_load((path / "config.yaml").read_text()), text_dim
