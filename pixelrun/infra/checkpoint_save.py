"""Writing a checkpoint: every rank's tensors (torch.distributed.checkpoint), rank 0's `meta.pt` and
`config.yaml`, then `manifest.json`, in a temporary folder renamed into place once all are complete
and flushed (the layout: pixelrun/infra/checkpoint.py). A write that runs out of space is one line
saying so; rotation keeps the newest `keep` checkpoints up to the one just written."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_verify import gather, write_manifest
from pixelrun.infra.faults import crash_point
from pixelrun.infra.files import write_atomic
from pixelrun.infra.records import CheckpointMeta


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by an interrupted save (the caller holds the run's lock, so
    no save is in progress). Returns what was removed."""
    root = ckpt.checkpoint_root(run_dir)
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def tensor_bytes(tree) -> int:
    """Bytes of the tensors of a (possibly sharded) state dict tree held by this rank."""
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        t = tree.to_local() if hasattr(tree, "to_local") else tree
        return t.numel() * t.element_size()
    return 0


def _format_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_space(root: Path, step: int, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise ckpt.CheckpointError(
            f"not enough disk space for checkpoint step {step} in {root}: needs "
            f"{_format_gb(needed)}, {_format_gb(free)} free; free some space and run the same "
            f"command again (it resumes from the last checkpoint)"
        )


def _errors_in(x: object) -> list[object]:
    """The exceptions held by `x`: DCP's `CheckpointException.failures` maps each rank to an
    (exception, traceback) pair; a list or tuple may hold more; an exception's cause, context and
    arguments are looked through too."""
    if isinstance(x, BaseException):
        out: list[object] = [x.__cause__, x.__context__, *x.args]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            out += list(failures.values())
        return [e for e in out if isinstance(e, (BaseException, tuple, list, dict))]
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return [e for e in x if isinstance(e, (BaseException, tuple, list, dict))]
    return []


def _no_space(e: BaseException) -> bool:
    """Whether a failed write says it ran out of space, anywhere in DCP's wrapping of each rank's error."""
    seen: set[int] = set()
    todo: list[object] = [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, BaseException) and (
            (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left on device" in str(x)
        ):
            return True
        todo += _errors_in(x)
    return False


def _out_of_space(e: BaseException, root: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: its error says so, or (a write that failed mid-file
    surfaces as torch's `unexpected pos N vs M`, which does not) the disk has less free than the
    checkpoint needs once it failed."""
    if _no_space(e):
        return True
    try:
        return shutil.disk_usage(root).free < needed
    except OSError:
        return False


def _write_files(tmp: Path, tensors: dict, meta: CheckpointMeta, config_yaml: str, main: bool) -> None:
    with ckpt.single_process_quiet():
        dcp.save(tensors, checkpoint_id=str(tmp))  # fsyncs its files
    if main:
        ckpt.fsync_file(meta.write(tmp))
        ckpt.fsync_file(write_atomic(tmp / "config.yaml", config_yaml))


def save_checkpoint(
    run_dir: str | Path, step: int, tensors: dict, meta: CheckpointMeta, config_yaml: str, keep: int = 2, ctx=None
) -> Path:
    """Write atomically (every rank calls this: the tensor save is collective), then keep only
    the newest `keep` checkpoints up to this step. `tensors` is a (possibly sharded) state dict
    tree; `meta` (plain Python values and the RNG tensor) is written by rank 0.

    The free space is checked first (the tensors' bytes on every rank, plus a margin); a write that
    fails for want of space is a CheckpointError saying so, its temporary folder removed. A folder
    of this step left by an earlier run (complete or not) is replaced by the new one."""
    main = ctx is None or ctx.is_main
    barrier = ctx.barrier if ctx is not None else (lambda: None)
    root = ckpt.checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{gather(os.getpid(), ctx)[0]}"  # rank 0's pid: every rank agrees
    needed = sum(gather(tensor_bytes(tensors), ctx)) * 21 // 20 + (64 << 20)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _check_space(root, step, needed)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        _write_files(tmp, tensors, meta, config_yaml, main)
        barrier()
        crash_point("save-files", step)
        write_manifest(tmp, ctx)
    except BaseException as e:
        full = not isinstance(e, KeyboardInterrupt) and _out_of_space(e, root, needed)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise ckpt.CheckpointError(
                f"checkpoint step {step} could not be written to {root}: no space left on device "
                f"(needs about {_format_gb(needed)}); its temporary folder was removed and the "
                f"earlier checkpoints are intact"
            ) from None
        raise
    barrier()
    if main:
        _put_in_place(tmp, final)
        ckpt.fsync_dir(root)
        crash_point("save-placed", step)
        _rotate(run_dir, step, keep)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a folder already there (left by a crash, or from before a fall-back to
    an earlier checkpoint) is swapped out in one step and only then deleted."""
    if not final.exists():
        os.replace(tmp, final)
    elif ckpt.exchange_dirs(tmp, final):
        shutil.rmtree(tmp)  # now holds the old folder
    else:
        old = final.parent / f".tmp-old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def _healthy(path: Path) -> bool:
    try:
        return CheckpointMeta.read(path).healthy
    except Exception:  # a meta that cannot be read is not a checkpoint to keep for its health
        return False


def _rotate(run_dir: str | Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (the one just written is the newest of them),
    and the newest healthy one (its meta's ``healthy``) wherever it stands: a run can always go back
    to a state that had not diverged. Newer ones (a run resumed with run.resume=false over an older
    one) are not touched here: the run replaces each when it reaches its step."""
    upto = [p for p in ckpt.list_checkpoints(run_dir) if ckpt.step_of(p) <= step]
    old, kept = upto[: max(len(upto) - keep, 0)], upto[max(len(upto) - keep, 0) :]
    if old and not any(_healthy(p) for p in reversed(kept)):
        spared = next((p for p in reversed(old) if _healthy(p)), None)
        old = [p for p in old if p != spared]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
