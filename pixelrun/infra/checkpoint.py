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
deleted); rotation never deletes the checkpoint just written, nor any newer one.

An exported model (`pixelrun export`) is a directory with `model.safetensors` and `config.yaml`;
`resolve_checkpoint` and `load_weights` accept it wherever a checkpoint is accepted.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from pixelrun.config import RunFailed

_STEP_DIR = re.compile(r"^step_(\d{8})$")
EXPORT_FILE = "model.safetensors"
MANIFEST = "manifest.json"  # {file name: {"size", "crc32"}} of every other file of a checkpoint
_READ_CHUNK = 16 << 20


class CheckpointError(RunFailed):
    """A checkpoint that cannot be written (no space) or no checkpoint that can be trusted: one line."""


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


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def file_crc32(path: Path) -> str:
    """CRC-32 of a file, read in 16 MiB chunks (zlib's runs at several GB/s: a checkpoint's read-back
    costs about what reading it from the page cache does)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _share(files: list[Path], ctx) -> list[Path]:
    """This rank's part of a list of files: the ranks checksum a checkpoint together."""
    return files if ctx is None else files[ctx.rank :: ctx.world_size]


def _gather(value, ctx) -> list:
    return [value] if ctx is None else ctx.gather_objects(value)


def write_manifest(folder: Path, ctx=None) -> None:
    """`manifest.json`: the size and CRC-32 of every file in `folder`, written last (rank 0)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    mine = {p.name: {"size": p.stat().st_size, "crc32": file_crc32(p)} for p in _share(files, ctx)}
    entries = {k: v for part in _gather(mine, ctx) for k, v in part.items()}
    if ctx is None or ctx.is_main:
        with open(folder / MANIFEST, "w") as f:
            f.write(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())


def checkpoint_problem(folder: Path, ctx=None) -> str | None:
    """What is wrong with a checkpoint, naming the file (a size or checksum that differs from its
    manifest, a missing or unreadable file), or None. Every rank checks its share of the files. A
    checkpoint without a manifest (written by an earlier pixelrun) is checked for readable metadata."""
    try:
        entries = json.loads((folder / MANIFEST).read_text())
        if not isinstance(entries, dict):
            raise ValueError
    except FileNotFoundError:
        entries = None
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    problems = []
    if entries is None:
        if ctx is None or ctx.is_main:
            try:
                load_meta(folder)
                dcp.FileSystemReader(str(folder)).read_metadata()
            except Exception as e:  # torch.load and DCP raise many kinds on a damaged file
                problems.append(f"unreadable without a {MANIFEST} to check it against ({type(e).__name__})")
    else:
        for name in _share(sorted(entries), ctx):
            problems += _file_problem(folder / name, entries[name])
    found = [p for part in _gather(problems, ctx) for p in part]
    return found[0] if found else None


def _file_problem(path: Path, entry: dict) -> list[str]:
    try:
        size = path.stat().st_size
    except OSError:
        return [f"{path.name} is missing"]
    if size != entry.get("size"):
        return [f"{path.name} is {size} bytes, {entry.get('size')} were written"]
    if file_crc32(path) != entry.get("crc32"):
        return [f"{path.name} does not match its checksum (its bytes changed since it was written)"]
    return []


def verified_latest(run_dir: str | Path, ctx=None, say=print) -> tuple[Path | None, dict | None]:
    """(path, meta) of the newest checkpoint whose every file matches its manifest; (None, None)
    when the run has none. Each newer, damaged one is named with what is wrong, and moved aside to
    `damaged-step_*` (kept for inspection; no longer listed, rotated or resumed). When every
    checkpoint is damaged nothing is moved and it is a CheckpointError: starting afresh would
    overwrite the run."""
    found, damaged = list_checkpoints(run_dir), []
    for path in reversed(found):
        problem = checkpoint_problem(path, ctx)
        meta = None
        if problem is None:
            try:
                meta = load_meta(path)
            except Exception as e:  # a manifest-less checkpoint's meta.pt (a checked one loaded above)
                problem = f"meta.pt is unreadable ({type(e).__name__})"
        if problem is None:
            for bad, why in damaged:
                aside = bad.with_name(f"damaged-{bad.name}")
                say(f"checkpoint {bad} is damaged: {why}; moved aside to {aside.name}, resuming from an earlier one")
                if ctx is None or ctx.is_main:
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(bad, aside)
            if ctx is not None:
                ctx.barrier()
            return path, meta
        damaged.append((path, problem))
    if found:
        bad, why = damaged[0]
        raise CheckpointError(
            f"no usable checkpoint in {checkpoint_root(run_dir)}: every one is damaged (the newest, "
            f"{bad.name}: {why}); move the run directory aside, or set run.resume=false to start "
            f"afresh"
        )
    return None, None


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by an interrupted save (the caller holds the run's lock, so
    no save is in progress). Returns what was removed."""
    root = checkpoint_root(run_dir)
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
    names = [n for n in _gather(found, ctx) if n is not None]
    return names[0] if names else None


def _format_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_space(root: Path, step: int, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"not enough disk space for checkpoint step {step} in {root}: needs "
            f"{_format_gb(needed)}, {_format_gb(free)} free; free some space and run the same "
            f"command again (it resumes from the last checkpoint)"
        )


def _no_space(e: BaseException) -> bool:
    """Whether a failed write ran out of space, looking through DCP's wrapping of each rank's error."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left on device" in str(x):
            return True
        todo += [x.__cause__, x.__context__, *getattr(x, "failures", {}).values()]
        todo += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
    return False


def _write_files(tmp: Path, tensors: dict, meta: dict, config_yaml: str, main: bool) -> None:
    with _single_process_quiet():
        dcp.save(tensors, checkpoint_id=str(tmp))  # fsyncs its files
    if main:
        with open(tmp / "meta.pt", "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "config.yaml").write_text(config_yaml)


def save_checkpoint(
    run_dir: str | Path, step: int, tensors: dict, meta: dict, config_yaml: str, keep: int = 2, ctx=None
) -> Path:
    """Write atomically (every rank calls this: the tensor save is collective), then keep only
    the newest `keep` checkpoints up to this step. `tensors` is a (possibly sharded) state dict
    tree; `meta` holds plain Python values and small tensors, written by rank 0.

    The free space is checked first (the tensors' bytes on every rank, plus a margin); a write that
    fails for want of space is a CheckpointError saying so, its temporary folder removed. A folder
    of this step left by an earlier run (complete or not) is replaced by the new one."""
    main = ctx is None or ctx.is_main
    barrier = ctx.barrier if ctx is not None else (lambda: None)
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{_gather(os.getpid(), ctx)[0]}"  # rank 0's pid: every rank agrees
    needed = sum(_gather(tensor_bytes(tensors), ctx)) * 21 // 20 + (64 << 20)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _check_space(root, step, needed)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        _write_files(tmp, tensors, meta, config_yaml, main)
        barrier()
        write_manifest(tmp, ctx)
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {root}: no space left on device "
                f"(needs about {_format_gb(needed)}); its temporary folder was removed and the "
                f"earlier checkpoints are intact"
            ) from None
        raise
    barrier()
    if main:
        _put_in_place(tmp, final)
        _fsync_dir(root)
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
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the old folder
    else:
        old = final.parent / f".tmp-old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def _rotate(run_dir: str | Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (the one just written is the newest of them).
    Newer ones (a run resumed with run.resume=false over an older one) are not touched here: the
    run replaces each when it reaches its step."""
    upto = [p for p in list_checkpoints(run_dir) if step_of(p) <= step]
    for old in upto[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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
    with _single_process_quiet():
        dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    return flat


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
    flat = tree["ema"] if weights == "ema" else {k[len("denoiser.") :]: v for k, v in tree["model"].items()}
    model.load_state_dict(flat)


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


def _exchange(a: Path, b: Path) -> bool:
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
            (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):
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
    _fsync_dir(out.parent)


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
    """A consolidated safetensors file (whatever the number of ranks that trained it) plus the
    config, written atomically; `pixelrun sample --checkpoint OUT` accepts the directory."""
    from safetensors.torch import save_file

    load_weights(checkpoint, model, weights)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out, export_marker("safetensors", checkpoint, weights)) as tmp:
        save_file(state, str(tmp / EXPORT_FILE), metadata={"text_dim": str(text_dim), "weights": weights})
        (tmp / "config.yaml").write_text(config_yaml)
    return Path(out)


def saved_config(path: str | Path) -> tuple[dict, int]:
    """(config dict, text width) of a checkpoint directory or an exported model directory. For a
    checkpoint of a staged run, the config is the one of the stage it was saved in (its resolution,
    batch, loss weights): what the weights were last trained with, so inference defaults follow it."""
    path = Path(path)
    if is_complete(path):
        meta = load_meta(path)
        return _stage_dict(meta["config"], meta.get("stage")), meta["text_dim"]
    import yaml
    from safetensors import safe_open

    with safe_open(str(path / EXPORT_FILE), "pt") as f:
        text_dim = int(f.metadata()["text_dim"])
    return yaml.safe_load((path / "config.yaml").read_text()), text_dim


def _stage_dict(config: dict, stage: int | None) -> dict:
    if not config.get("stages") or stage is None:
        return config
    from pixelrun.config import config_from_dict, stage_plan, to_dict

    return to_dict(stage_plan(config_from_dict(config))[stage][2])
