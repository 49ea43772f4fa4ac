"""Checkpoints: one directory per saved step, written under a temporary name and renamed.

    <run>/checkpoints/step_00001000/state.pt    model, EMA, optimizer, scheduler, RNG and data state
    <run>/checkpoints/step_00001000/config.yaml the resolved config that made it

A directory only gets its final name once every file in it is complete and flushed, so a crash or a
kill mid-save leaves at most a `.tmp-*` directory, which is ignored and cleaned up later.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
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


def save_checkpoint(run_dir: str | Path, step: int, state: dict, config_yaml: str, keep: int = 2) -> Path:
    """Write atomically, then keep only the newest `keep` checkpoints."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if (final / "state.pt").is_file():
        return final  # this exact step is already saved and complete
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    (tmp / "config.yaml").write_text(config_yaml)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (newest checkpoint), a checkpoint directory, or its state.pt."""
    p = Path(path)
    if p.is_file() and p.name == "state.pt":
        return p.parent
    if (p / "state.pt").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"no checkpoint found at {p} (expected a run directory or a checkpoints/step_* directory)")


def load_state(ckpt_dir: str | Path, map_location="cpu") -> dict:
    return torch.load(Path(ckpt_dir) / "state.pt", map_location=map_location, weights_only=True)
