"""Trusting a checkpoint: `manifest.json` holds the size and CRC-32 of every other file, written last;
a resume checks every file against it (`verified_latest`) and falls back to the previous checkpoint
when one does not match (the damaged one is moved aside, never deleted). The readers (`pixelrun
sample`, `eval`, `export`) check the same (`ReadChoice`), fall back the same way, and move nothing."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch.distributed.checkpoint as dcp

from pixelrun.config import ConfigError
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint import READ_ERRORS, failure
from pixelrun.infra.files import write_atomic
from pixelrun.infra.records import CheckpointMeta

MANIFEST = "manifest.json"  # {file name: {"size", "crc32"}} of every other file of a checkpoint
_READ_CHUNK = 16 << 20


def file_crc32(path: Path) -> str:
    """CRC-32 of a file, read in 16 MiB chunks (zlib's runs at several GB/s: a checkpoint's read-back
    costs about what reading it from the page cache does)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def share(files: list[Path], ctx) -> list[Path]:
    """This rank's part of a list of files: the ranks checksum a checkpoint together."""
    return files if ctx is None else files[ctx.rank :: ctx.world_size]


def gather(value, ctx) -> list:
    return [value] if ctx is None else ctx.gather_objects(value)


def write_manifest(folder: Path, ctx=None) -> None:
    """`manifest.json`: the size and CRC-32 of every file in `folder`, written last (rank 0)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    mine = {p.name: {"size": p.stat().st_size, "crc32": file_crc32(p)} for p in share(files, ctx)}
    entries = {k: v for part in gather(mine, ctx) for k, v in part.items()}
    if ctx is None or ctx.is_main:
        ckpt.fsync_file(write_atomic(folder / MANIFEST, json.dumps(dict(sorted(entries.items())), indent=1) + "\n"))


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
                ckpt.load_meta(folder)
                dcp.FileSystemReader(str(folder)).read_metadata()
            except Exception as e:  # torch.load and DCP raise many kinds on a damaged file
                problems.append(f"unreadable without a {MANIFEST} to check it against ({type(e).__name__})")
    else:
        for name in share(sorted(entries), ctx):
            problems += _file_problem(folder / name, entries[name])
    found = [p for part in gather(problems, ctx) for p in part]
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


def verified_latest(run_dir: str | Path, ctx=None, say=print) -> tuple[Path | None, CheckpointMeta | None]:
    """(path, meta) of the newest checkpoint whose every file matches its manifest; (None, None)
    when the run has none. Each newer, damaged one is named with what is wrong, and moved aside to
    `damaged-step_*` (kept for inspection; no longer listed, rotated or resumed). When every
    checkpoint is damaged nothing is moved and it is a CheckpointError: starting afresh would
    overwrite the run."""
    found = ckpt.list_checkpoints(run_dir)
    damaged: list[tuple[Path, str]] = []
    for path in reversed(found):
        problem = checkpoint_problem(path, ctx)
        if problem is None:
            # its bytes are the ones written: a meta this pixelrun cannot read (a newer format) is
            # a RecordError naming the file, not a damaged checkpoint to move aside
            meta = ckpt.load_meta(path)
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
        raise ckpt.CheckpointError(
            f"no usable checkpoint in {ckpt.checkpoint_root(run_dir)}: every one is damaged (the newest, "
            f"{bad.name}: {why}); move the run directory aside, or set run.resume=false to start "
            f"afresh"
        )
    return None, None


# ----------------------------------------------------------------------------- readers: sample, eval, export


def reader_problem(folder: Path) -> str | None:
    """What `pixelrun sample`, `eval` or `export` finds wrong with a checkpoint, naming the file, or
    None; it only reads (training's `verified_latest` is the one that moves a damaged checkpoint
    aside). Every file against the manifest, then the meta and DCP's `.metadata` parsed: a
    checkpoint without a manifest (written before manifests existed) is checked for these alone."""
    if (folder / MANIFEST).exists():
        problem = checkpoint_problem(folder)
        if problem is not None:
            return problem
    for name, read in (("meta.pt", ckpt.load_meta), (".metadata", _read_metadata)):
        try:
            read(folder)
        except READ_ERRORS as e:  # torch.load and DCP raise many kinds on a damaged file
            return f"{name} cannot be read ({failure(e)})"
    return None


def _read_metadata(folder: Path):
    return dcp.FileSystemReader(str(folder)).read_metadata()


class ReadChoice:
    """The checkpoint a reader opens, and where it falls back to. Given a run directory: its newest
    checkpoint that passes `reader_problem`; each newer one is skipped with one line through `say`,
    naming it and what is wrong (nothing is moved; none passing is one line naming the newest).
    Given a checkpoint directory (or an exported
    model): that one, or a ConfigError naming the file and the problem (the user asked for it)."""

    def __init__(self, path: Path, explicit: bool, older: list[Path], say):
        self.path, self.explicit, self.older, self.say = path, explicit, older, say

    @classmethod
    def open(cls, checkpoint: str | Path, say=print) -> ReadChoice:
        p = Path(checkpoint)
        if p.is_file() and p.name in ("meta.pt", ckpt.EXPORT_FILE):
            p = p.parent
        if (p / ckpt.EXPORT_FILE).is_file() and not ckpt.is_complete(p):
            return cls(p, True, [], say)
        if ckpt.is_complete(p):
            problem = reader_problem(p)
            if problem is not None:
                raise refusal(p, problem)
            return cls(p, True, [], say)
        found = ckpt.list_checkpoints(p)
        if not found:
            return cls(ckpt.resolve_checkpoint(p), True, [], say)  # the errors of a folder without any
        return cls._first_readable(list(reversed(found)), [], say)

    def skip(self, why: str) -> ReadChoice:
        """The next older checkpoint that passes, after `self.path` proved unusable for `why` (its
        weights non-finite or unreadable): a refusal when it was asked for by name."""
        if self.explicit:
            raise refusal(self.path, why)
        return self._first_readable(self.older, [(self.path, why)], self.say)

    @classmethod
    def _first_readable(cls, candidates: list[Path], skipped: list[tuple[Path, str]], say) -> ReadChoice:
        for i, path in enumerate(candidates):
            problem = reader_problem(path)
            if problem is None:
                for bad, why in skipped:
                    say(f"skipped checkpoint {bad}: {why}; reading the earlier {path.name}")
                return cls(path, False, candidates[i + 1 :], say)
            skipped.append((path, problem))
        bad, why = skipped[0]
        raise ConfigError(
            "--checkpoint",
            f"no usable checkpoint in {bad.parent}: every one fails its checks (the newest, {bad.name}: {why})",
        )


def refusal(path: Path, problem: str) -> ConfigError:
    return ConfigError(
        "--checkpoint",
        f"{path} cannot be used: {problem}; give an earlier checkpoint, or the run folder (its newest "
        f"usable checkpoint is then read)",
    )
