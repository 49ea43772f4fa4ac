"""The registry of data sources: what each value of `data.source` builds, checks, holds out for
evaluation and shows on the sample grids. Training, evaluation and the loop ask the registry
(`source_kind(cfg)`) instead of comparing the name, so a new source is one entry here plus its
name in the config's `DATA_SOURCES` (a test keeps the two equal).

Each source module is imported only when its source is used: the shards and folder readers pull
in image decoders and tar readers that the shapes default never needs."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pixelrun.config import Config, ConfigError, image_sizes, model_fields
from pixelrun.data import Batch, NoUsableData
from pixelrun.data.loader import with_workers
from pixelrun.infra.tracking import check_wandb

Say = Callable[[str], None] | None


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop reads: batches, and a position it can save with a checkpoint and
    restore on resume (so a resumed run reads what the uninterrupted run would have read)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class SourceKind:
    """One value of `data.source`.

    `held_out` returns n real images (uint8 [n, R, R, 3] at data.resolution) and their captions,
    or all it has when `at_most`; None means "the first n items of the training stream" (the
    caller builds that stream, which lives above this layer). `held_out_captions` is the same
    captions without rendering or decoding an image; None means "read them from `held_out`"."""

    name: str
    build: Callable[[Config, int, int, Say], BatchSource]  # (cfg, rank, world_size, say)
    grid_prompts: Callable[[Config, BatchSource], list[str]]
    held_out_key: Callable[[Config], str]  # what fixes the held-out images: the real-statistics cache key
    held_out: Callable[[Config, int, bool], tuple[np.ndarray, list[str]]] | None = None
    held_out_captions: Callable[[Config, int], list[str]] | None = None
    check: Callable[[Config], None] = lambda cfg: None  # what only the machine that runs the job can check
    shapes_captions: bool = False  # captions the shapes score can parse, drawn from eval.seed


# ----------------------------------------------------------------------------- shapes


def _shapes_build(cfg: Config, rank: int, world_size: int, say: Say) -> BatchSource:
    from pixelrun.data.shapes import ShapesBatchSource

    return ShapesBatchSource(
        cfg.seed, "train", cfg.train.batch_size, image_sizes(cfg), cfg.data.max_shapes, rank, world_size
    )


def _shapes_held_out(cfg: Config, n: int, at_most: bool) -> tuple[np.ndarray, list[str]]:
    """The shapes "eval" split: scenes from eval.seed, never drawn by training."""
    from pixelrun.data.shapes import ShapesDataset, caption, render

    res = cfg.data.resolution
    data = ShapesDataset(cfg.eval.seed, "eval", cfg.data.max_shapes)
    scenes = [data.scene(i) for i in range(n)]
    return np.stack([render(s, res, res) for s in scenes]), [caption(s) for s in scenes]


def _shapes_captions(cfg: Config, n: int) -> list[str]:
    from pixelrun.data.shapes import fixed_prompts

    return fixed_prompts(n, seed=cfg.eval.seed, max_shapes=cfg.data.max_shapes)


def _shapes_grid(cfg: Config, source: BatchSource) -> list[str]:
    from pixelrun.data.shapes import fixed_prompts

    return fixed_prompts(cfg.sample.grid_prompts, max_shapes=cfg.data.max_shapes)


# ----------------------------------------------------------------------------- emoji


def _emoji_build(cfg: Config, rank: int, world_size: int, say: Say) -> BatchSource:
    from pixelrun.data.emoji import EmojiBatchSource

    return EmojiBatchSource(cfg.seed, cfg.train.batch_size, image_sizes(cfg), rank, world_size)


def _too_few_emoji(have: int, n: int) -> ConfigError:
    return ConfigError("eval.prompts", f"the emoji data holds out {have} images, {n} asked for")


def _emoji_held_out(cfg: Config, n: int, at_most: bool) -> tuple[np.ndarray, list[str]]:
    from pixelrun.data.emoji import EmojiDataset

    res = cfg.data.resolution
    data = EmojiDataset("eval")
    n = min(n, len(data)) if at_most else n
    if n > len(data):
        raise _too_few_emoji(len(data), n)
    items = [data.item(i, res, res) for i in range(n)]
    return torch.stack([im for im, _ in items]).permute(0, 2, 3, 1).numpy(), [c for _, c in items]


def _emoji_captions(cfg: Config, n: int) -> list[str]:
    from pixelrun.data.emoji import EmojiDataset

    captions = EmojiDataset("eval").captions
    if n > len(captions):
        raise _too_few_emoji(len(captions), n)
    return list(captions[:n])


def _emoji_grid(cfg: Config, source: BatchSource) -> list[str]:
    from pixelrun.data.emoji import fixed_prompts

    return fixed_prompts(cfg.sample.grid_prompts)


# ----------------------------------------------------------------------------- an image folder


def _path(cfg: Config) -> str:
    """data.path of a source that reads one (`config.validate` has required it)."""
    if cfg.data.path is None:
        raise ConfigError("data.path", f"is required when data.source is {cfg.data.source}")
    return cfg.data.path


def _folder_check(cfg: Config) -> None:
    if not os.path.isdir(_path(cfg)):
        raise ConfigError("data.path", f"no such folder: {cfg.data.path}")
    if cfg.data.val_path is not None and not os.path.isdir(cfg.data.val_path):
        raise ConfigError("data.val_path", f"no such folder: {cfg.data.val_path}")
    _held_out_indices(cfg)  # a split that leaves nothing to train on fails here, before any work


def split_count(cfg: Config) -> int:
    """How many captioned images of a folder the seeded split holds out (0 for other sources, with
    data.val_path, or data.val_count=0): data.val_count, or when null as many as the evaluations
    use (eval.prompts for the metrics, eval.val_images for the validation loss) up to half the folder
    (an evaluation asking for more than that is refused by its own key, eval.prompts)."""
    d = cfg.data
    if d.source != "folder" or d.val_path is not None:
        return 0
    if d.val_count is not None:
        return d.val_count
    return min(max(cfg.eval.prompts, cfg.eval.val_images), _captioned(_path(cfg)).count // 2)


@dataclass(frozen=True)
class _Captioned:
    count: int
    held: tuple[int, ...]


@functools.lru_cache(maxsize=8)
def _walk(path: str, stamp: int, count: int | None, seed: int) -> _Captioned:
    from pixelrun.data.folder import ImageFolder, seeded_split

    try:
        folder = ImageFolder(path)
    except ValueError:  # no folder, or nothing captioned in it: building the source says so, by its key
        return _Captioned(0, ())
    return _Captioned(len(folder), tuple(seeded_split(folder, min(count or 0, len(folder)), seed)))


def _captioned(path: str, count: int | None = None, seed: int = 0) -> _Captioned:
    """The captioned images of a folder, counted (and the `count` held out by `seed`), walked once
    per process while the folder's modification time stays (split_count and the key ask often)."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = 0
    return _walk(os.path.realpath(path), stamp, count, seed)


def _held_out_indices(cfg: Config) -> list[int]:
    """The indices, in the captioned folder data.path, of the images the seeded split holds out."""
    count = split_count(cfg)
    if not count:
        return []
    captioned = _captioned(_path(cfg), count, cfg.eval.seed)
    if count >= captioned.count:
        raise ConfigError(
            "data.val_count",
            f"holding out {count} of the {captioned.count} captioned images of {cfg.data.path} leaves none to train "
            f"on; set data.val_count lower, or a held-out folder with data.val_path",
        )
    return list(captioned.held)


def _held_out_folder(cfg: Config):
    """The ImageFolder evaluations read: data.val_path, the seeded split of data.path, or (no split)
    data.path whole, whose first items are also trained on."""
    from pixelrun.data.folder import ImageFolder

    if cfg.data.val_path is not None:
        return ImageFolder(cfg.data.val_path)
    folder = ImageFolder(_path(cfg))
    held = _held_out_indices(cfg)
    return folder.only(held) if held else folder


def _folder_build(cfg: Config, rank: int, world_size: int, say: Say) -> BatchSource:
    from pixelrun.data.folder import FolderBatchSource, ImageFolder

    folder = ImageFolder(_path(cfg), keep_uncaptioned=cfg.data.uncaptioned == "empty")
    if say is not None and folder.caption_note:
        say(folder.caption_note)
    held = _held_out_indices(cfg)
    if held:  # never trained on: the split's images leave the training folder
        folder = folder.without(ImageFolder(_path(cfg)).only(held).paths)
    return FolderBatchSource(
        folder, cfg.train.batch_size, image_sizes(cfg), cfg.seed, rank, world_size, min_side=_patch(cfg)
    )


def _patch(cfg: Config) -> int:
    """The smallest side an image needs to be trained on (smaller ones are skipped and named)."""
    return int(model_fields(cfg)["patch_size"])


def _folder_held_out(cfg: Config, n: int, at_most: bool) -> tuple[np.ndarray, list[str]]:
    """The first `n` readable items of the held-out folder (all there are, if fewer, with `at_most`),
    skipped as training skips: unreadable files, and sides under the patch."""
    from pixelrun.data.buckets import resize_to_bucket

    res = cfg.data.resolution
    folder = _held_out_folder(cfg)
    images, captions = [], []
    for i in range(len(folder)):
        im = folder.load(i, target=(res, res))
        if im is not None and min(im.size) >= _patch(cfg):  # unreadable and tiny files are skipped, as in training
            images.append(np.asarray(resize_to_bucket(im, res, res)))
            captions.append(folder.captions[i])
            if len(images) == n:
                return np.stack(images), captions
    if not images:
        raise NoUsableData(f"no image under {folder.root} could be loaded")
    if at_most:
        return np.stack(images), captions
    more = (
        ""
        if cfg.data.val_path is not None
        else "; lower eval.prompts, or hold out more (data.val_count) or a folder (data.val_path)"
    )
    raise ConfigError(
        "eval.prompts",
        f"the held-out set of {folder.root} has {len(images)} readable captioned images, {n} asked for{more}",
    )


def _folder_key(cfg: Config) -> str:
    """What fixes a folder run's held-out images: the folder, and the split when there is one."""
    if cfg.data.val_path is not None:
        return f"folder:{os.path.realpath(cfg.data.val_path)}"
    count = split_count(cfg)
    split = f":heldout{count}-seed{cfg.eval.seed}" if count else ""
    return f"folder:{os.path.realpath(_path(cfg))}{split}"


def _folder_grid(cfg: Config, source) -> list[str]:
    return list(source.folder.captions[: cfg.sample.grid_prompts])


# ----------------------------------------------------------------------------- WebDataset shards


def _shards_check(cfg: Config) -> None:
    from pixelrun.data.shards import expand_shards

    for key, path in (("data.path", _path(cfg)), ("data.val_path", cfg.data.val_path)):
        try:
            if path is not None:
                expand_shards(path)
        except FileNotFoundError as e:
            raise ConfigError(key, str(e)) from None


def _shards_build(cfg: Config, rank: int, world_size: int, say: Say) -> BatchSource:
    from pixelrun.data.shards import ShardBatchSource
    from pixelrun.model.text import encoder_fingerprint

    return ShardBatchSource(
        _path(cfg),
        cfg.train.batch_size,
        image_sizes(cfg),
        cfg.seed,
        rank,
        world_size,
        captions=cfg.data.captions,
        text_encoder=(encoder_fingerprint(cfg.text.encoder), cfg.text.max_tokens),
        min_side=_patch(cfg),
    )


def _shards_key(cfg: Config) -> str:
    if cfg.data.val_path is not None:  # read from its start, in eval.seed's order (pixelrun/evaluation/heldout.py)
        return f"shards:{cfg.data.val_path}:seed{cfg.eval.seed}"
    return f"shards:{cfg.data.path}:seed{cfg.seed}"


def _shards_grid(cfg: Config, source) -> list[str]:
    return source.preview_captions(cfg.sample.grid_prompts)


SOURCES: dict[str, SourceKind] = {
    "shapes": SourceKind(
        "shapes",
        _shapes_build,
        _shapes_grid,
        lambda cfg: f"shapes-eval-seed{cfg.eval.seed}-max{cfg.data.max_shapes}",
        held_out=_shapes_held_out,
        held_out_captions=_shapes_captions,
        shapes_captions=True,
    ),
    "emoji": SourceKind(
        "emoji",
        _emoji_build,
        _emoji_grid,
        lambda cfg: "emoji-heldout",
        held_out=_emoji_held_out,
        held_out_captions=_emoji_captions,
    ),
    "folder": SourceKind(
        "folder",
        _folder_build,
        _folder_grid,
        _folder_key,
        held_out=_folder_held_out,
        check=_folder_check,
    ),
    # held out: data.val_path's shards, or the start of the training stream (shards carry no split)
    "shards": SourceKind("shards", _shards_build, _shards_grid, _shards_key, check=_shards_check),
}


def source_kind(cfg: Config) -> SourceKind:
    """The registry entry of `cfg.data.source` (validated against the registry's names on load)."""
    return SOURCES[cfg.data.source]


def check_paths(cfg: Config) -> None:
    """What only the machine that runs the job can check (kept out of `config.validate` so a config
    written for a cluster still loads anywhere): the data source's paths, the tracker's package, and
    that one batch of images fits in this machine's memory. Called before any work."""
    check_batch_memory(cfg)
    source_kind(cfg).check(cfg)
    check_prompt_files(cfg)
    check_wandb(cfg)


GRID_MAX_PROMPTS = 64  # a grid of more grows too tall to open (`pixelrun sample` caps its grid.png the same)


def check_prompt_files(cfg: Config) -> None:
    """sample.prompts_file and eval.prompts_file readable, UTF-8, and long enough for their use."""
    from pixelrun.infra.prompts import read_prompts_file

    if cfg.sample.prompts_file is not None:
        lines = read_prompts_file(cfg.sample.prompts_file, "sample.prompts_file")
        if len(lines) > GRID_MAX_PROMPTS:
            raise ConfigError(
                "sample.prompts_file",
                f"{cfg.sample.prompts_file} holds {len(lines)} prompts; a sample grid shows at most {GRID_MAX_PROMPTS}",
            )
    if cfg.eval.prompts_file is not None:
        eval_prompts(cfg)


def eval_prompts(cfg: Config) -> list[str]:
    """The first eval.prompts lines of eval.prompts_file (which must hold that many)."""
    from pixelrun.infra.prompts import read_prompts_file

    path = cfg.eval.prompts_file
    assert path is not None
    lines = read_prompts_file(path, "eval.prompts_file")
    if len(lines) < cfg.eval.prompts:
        raise ConfigError(
            "eval.prompts_file", f"{path} holds {len(lines)} prompts, eval.prompts={cfg.eval.prompts} asked for"
        )
    return lines[: cfg.eval.prompts]


def grid_prompts(cfg: Config, source) -> list[str]:
    """The sample grids' prompts: every line of sample.prompts_file, or the source's held-out ones;
    none when sample.grid_prompts is 0 (no grids)."""
    from pixelrun.infra.prompts import read_prompts_file

    if not cfg.sample.grid_prompts:
        return []
    if cfg.sample.prompts_file is not None:
        return read_prompts_file(cfg.sample.prompts_file, "sample.prompts_file")
    return source_kind(cfg).grid_prompts(cfg, source)


def describe_held_out(cfg: Config) -> str | None:
    """The held-out set of a folder or shards run, in one line for its start (None for shapes and
    emoji, whose held-out splits are built in)."""
    d = cfg.data
    never = "never trained on"
    if d.source == "folder" and d.val_path is not None:
        from pixelrun.data.folder import ImageFolder

        return (
            f"held out: folder {d.val_path}: {len(ImageFolder(d.val_path))} captioned images (data.val_path), {never}"
        )
    if d.source == "folder":
        count = split_count(cfg)
        if not count:
            return (
                "held out: none (data.val_count=0): the evaluations compare with the first images of the folder, "
                "which it trains on"
            )
        why = (
            f"data.val_count={count}"
            if d.val_count is not None
            else "data.val_count null: as many as the evaluations use, at most half"
        )
        return (
            f"held out: {count} of the {_captioned(_path(cfg)).count} captioned images of {d.path}, chosen by "
            f"eval.seed={cfg.eval.seed} ({why}), {never}"
        )
    if d.source == "shards":
        if d.val_path is not None:
            return f"held out: shards {d.val_path} (data.val_path), {never}"
        return (
            "held out: none: the evaluations compare with the first items of the training shards, which it trains "
            "on (data.val_path=SHARDS sets a held-out set)"
        )
    return None


GiB = 1 << 30


def available_memory(device: str) -> tuple[int, str] | None:
    """(bytes, where) free for a batch: the GPU's free memory on CUDA, else the RAM the system
    reports available (MemAvailable); None when neither can be told."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device) if device.startswith("cuda:") else None)
            return free, "GPU memory"
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    except (OSError, ValueError, AttributeError):
        return None


def batch_bytes(images: int, height: int, width: int) -> int:
    """A lower bound on what one batch takes: its RGB images as uint8 plus the fp32 model input of
    the same shape (the noise, the target, activations and weights come on top)."""
    return images * 3 * height * width * (1 + 4)


def check_batch_memory(cfg: Config) -> None:
    """Refuse, before building anything, a batch (train.batch_size images of data.resolution, per
    stage) that cannot fit in this machine's memory: "one batch needs X GiB, Y available"."""
    where = available_memory(cfg.hardware.device)
    if where is None:
        return
    free, kind = where
    shapes = [(st.resolution or cfg.data.resolution, st.batch_size or cfg.train.batch_size) for st in cfg.stages]
    for side, batch in shapes or [(cfg.data.resolution, cfg.train.batch_size)]:
        need = batch_bytes(batch, side, side)
        if need > free:
            key = "data.resolution" if batch_bytes(1, side, side) > free else "train.batch_size"
            raise ConfigError(
                key,
                f"one batch of {batch} images of {side}x{side} needs {need / GiB:.1f} GiB, "
                f"{free / GiB:.1f} GiB {kind} available; lower train.batch_size or data.resolution",
            )


def describe_source(cfg: Config, source) -> str:
    """What a run trains on, in one line for its start: the data, how many items, their captions,
    and the size they are brought to."""
    inner = getattr(source, "source", source)  # data.workers: the loader wraps the source
    sizes = image_sizes(cfg)
    shape = f"{len(sizes)} aspect buckets" if len(sizes) > 1 else "square"
    fit = f"{cfg.data.resolution}px, {shape}; each image scaled to cover its size and centre-cropped"
    folder = getattr(inner, "folder", None)
    if cfg.data.source == "folder" and folder is not None:
        n, missing = len(folder), folder.missing_captions
        if cfg.data.uncaptioned == "empty":
            without = f"{missing} without a caption trained with the empty one"
            n_captioned = n - missing
        else:
            without = f"{missing} without a caption skipped (data.uncaptioned=empty trains them with an empty caption)"
            n_captioned = n
        return f"data: folder {cfg.data.path}: {n} images, {n_captioned} captioned, {without}; {fit}"
    if cfg.data.source == "shards":
        count = getattr(inner, "count", None)
        many = f"{count} samples in " if count else ""
        return f"data: shards {cfg.data.path}: {many}{len(inner.urls)} shard(s), captions {cfg.data.captions}; {fit}"
    if cfg.data.source == "emoji":
        return f"data: {len(inner.dataset)} Twemoji images, their names as captions; {fit}"
    return (
        f"data: procedural shapes (built in), up to {cfg.data.max_shapes} a picture, a new image every draw, "
        f"drawn at {cfg.data.resolution}px, {shape}"
    )


def make_batch_source(cfg: Config, rank: int = 0, world_size: int = 1, say: Say = None):
    """This rank's batches; with data.workers = N > 0 decoded in N processes (the same batches).
    `say` gets the source's notes (malformed caption lines, stored embeddings used or not)."""
    pin = cfg.data.workers > 0 and cfg.hardware.device != "cpu" and torch.cuda.is_available()
    source = with_workers(source_kind(cfg).build(cfg, rank, world_size, say), cfg.data.workers, pin_memory=pin)
    if say is not None and getattr(source, "text_note", None):  # shards: stored caption embeddings or not
        say(source.text_note)
    return source
