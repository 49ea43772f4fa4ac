"""`pixelrun data convert`: write WebDataset shards (what it reads: convert_sources.py; `pixelrun data
inspect` looks at them: inspection.py).

Converting resizes every image once, to its nearest aspect bucket at the target resolution, so
training reads small images and never decodes a 4000-pixel photo per step. The source is an image
folder, a JSONL manifest, or Parquet / Arrow tables and Hugging Face datasets
(pixelrun/data/parquet.py). What a shard holds, per sample KEY (eight digits, the sample's number in
the output):

  KEY.jpg (default) or KEY.png   the image at its bucket size
  KEY.txt                        the caption (a manifest's "caption" or "text" field, else its first
                                 string field; a table's first --captions column the row has)
  KEY.json                       every caption field (a manifest's top-level strings, every chosen
                                 column of a table), and under "pixelrun" the original size, the
                                 bucket and the source (file, or table file and row)
  KEY.emb.FIELD.npy              with --text-encoder: the caption's embedding, [real tokens, dim], for
                                 txt and for each json field whose text differs from txt's (training
                                 reads txt's for the others); bfloat16 by default, stored as uint16
                                 bit patterns since numpy has no bfloat16 (index.json names the dtype)

and beside the shards (00000.tar, 00001.tar, ...) `index.json`: counts, counts per bucket and per
caption field, what was skipped and why, the settings, bytes per sample, and the encoder
fingerprint, max_tokens and dtype of the stored embeddings.

JPEG (quality 95, no chroma subsampling) is the default: at 1024 px it is several times smaller
than PNG and faster to decode, and PIL can decode it at a reduced scale when training at a lower
resolution; its error is far below what a diffusion model reproduces. `--format png` keeps the
pixels exact.

Embeddings are bfloat16 by default, as the reference stores its T5Gemma latents (Photoroom/PRX:
the text tower preset `t5gemma2b-256-bf16` of prx/dataset/dataset.py `ProcessedDataset`, written by
prx/dataset/mds_patches.py `BFloat16TensorEncoding` as uint16 bit patterns, as here): T5-family
activations overflow float16's range (65504), and bfloat16 keeps float32's. Whatever the dtype, an
embedding with a non-finite value stops the conversion with one line naming the sample (the
reference's `SampleProcessor._remove_invalid_values` drops NaN latents silently instead).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial as partial_fn
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelrun.config import ConfigError, TextConfig, aspect_buckets
from pixelrun.data import SourceImage
from pixelrun.data.buckets import nearest_bucket, resize_to_bucket
from pixelrun.data.convert_sources import NAMES_KEPT, NO_CAPTION, Source, open_source
from pixelrun.data.folder import DEFAULT_MAX_PIXELS, load_rgb, read_size
from pixelrun.data.shards import (
    EMBEDDING_STORAGE,
    INDEX_FILE,
    PARTIAL_DIR,
    caption_fields,
    embedding_member,
)
from pixelrun.infra.locks import folder_lock
from pixelrun.infra.progress import progress as progress_bar

IMAGE_FORMATS = ("jpg", "png")
EMBEDDING_DTYPES = tuple(EMBEDDING_STORAGE)  # bfloat16 (default), float16, float32
_CHUNK = 64  # samples whose captions are encoded together
_PARTIAL = PARTIAL_DIR  # where shards are written until the conversion completes


def _primary_caption(captions: dict[str, str], primary: tuple[str, ...]) -> str:
    return next((captions[k] for k in primary if k in captions), next(iter(captions.values())))


def _encode_image(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=95, subsampling=0)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _stored_array(e: torch.Tensor) -> np.ndarray:
    """An embedding in its storage dtype -> the array written (bfloat16: its bit patterns as uint16)."""
    return e.view(torch.int16).numpy().view(np.uint16) if e.dtype == torch.bfloat16 else e.numpy()


def _caption_embeddings(encoder, samples: list[dict], dtype: str) -> None:
    """Add the caption embeddings to each sample: only the real tokens (the mask's True rows), which
    is what training pads back to max_tokens; txt always, a json field only when its text differs
    from txt's (training falls back to txt's). Refuses a non-finite value, naming the sample."""
    jobs = [
        (s, name, text)
        for s in samples
        for name, text in _fields_of(s).items()
        if name == "txt" or text != s.get("txt")
    ]
    if not jobs:
        return
    emb, mask = encoder.encode([text for _, _, text in jobs])
    for (s, name, _), e, m in zip(jobs, emb, mask):
        cast = e[m].to(getattr(torch, dtype))  # float16 may overflow to inf here: checked now
        if not torch.isfinite(cast).all():
            where = f"sample {s['__key__']} ({s['json']['pixelrun']['source']}), caption field {name}"
            if dtype == "float16" and torch.isfinite(e[m]).all():
                raise ConfigError(
                    "--embedding-dtype",
                    f"{where}: its embedding exceeds float16's range (T5-family "
                    f"encoders do); use --embedding-dtype bfloat16",
                )
            raise ConfigError("--text-encoder", f"{where}: the encoder's output has non-finite values")
        s[embedding_member(name)] = _npy(_stored_array(cast))


def _fields_of(sample: dict) -> dict[str, str]:
    """The caption fields of a sample being written, named as training names them."""
    out = {"txt": sample["txt"]} if "txt" in sample else {}
    out.update({f"json.{k}": v for k, v in sample["json"].items() if isinstance(v, str)})
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def convert(
    src: str | Path,
    out: str | Path,
    resolution: int,
    patch: int = 32,
    shard_size: int = 1000,
    image_format: str = "jpg",
    text_encoder: str | None = None,
    max_tokens: int = TextConfig.max_tokens,
    progress: bool = True,
    workers: int = 0,
    captions: str | None = None,
    image_column: str | None = None,
    limit: int | None = None,
    split: str = "train",
    embedding_dtype: str = "bfloat16",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write the images of `src` as shards under `out`, each resized once to its aspect bucket at
    `resolution`. Returns the index it writes.

    `src`: an image folder, a JSONL manifest, or Parquet / Arrow tables and Hugging Face datasets
    (see pixelrun/data/parquet.py; `captions` = their caption columns with weights, `image_column`,
    `split`). `limit`: only the first that many images / rows. `workers` > 0 decodes, resizes and
    encodes in that many processes (the shards are byte for byte the same). Every check of the
    arguments and the source's columns happens before any work. The shards are written under
    `out/.partial/` and moved into `out` only when all are complete, `index.json` last, so an
    interrupted or failed conversion never leaves shards that look finished. One conversion at a time
    writes to `out` (a second is refused, naming --out)."""
    log = log or (lambda line: print(line, file=sys.stderr))
    src, out = str(src), Path(out)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}; got {image_format!r}")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ConfigError("--embedding-dtype", f"must be one of {', '.join(EMBEDDING_DTYPES)}; got {embedding_dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1; got {shard_size}")
    if limit is not None and limit < 1:
        raise ConfigError("--limit", f"must be >= 1; got {limit}")
    buckets = aspect_buckets(resolution, patch)
    with folder_lock(out, "--out", "pixelrun data convert"):
        removed = _remove_interrupted(out)
        if removed:
            log(
                f"removed {removed} shard(s) left in {out} by a conversion that was stopped while moving them into place"
            )
        if any(out.glob("*.tar")):
            raise FileExistsError(f"{out} already holds .tar shards; convert into an empty folder")
        return _convert_locked(
            src,
            out,
            resolution,
            patch,
            shard_size,
            image_format,
            text_encoder,
            max_tokens,
            progress,
            workers,
            captions,
            image_column,
            limit,
            split,
            embedding_dtype,
            max_pixels,
            buckets,
            log,
        )


def _remove_interrupted(out: Path) -> int:
    """The shards an interrupted final move left in `out`: named in `.partial/index.json` (written
    before any shard moves) while `out` has no index.json of its own. Removes them and `.partial/`;
    returns how many shards were removed."""
    partial = out / _PARTIAL
    if not partial.is_dir():
        return 0
    moved = 0
    if not (out / INDEX_FILE).is_file():
        try:
            names = json.loads((partial / INDEX_FILE).read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            names = []
        for name in names:
            if (out / name).is_file() and not (partial / name).exists():
                (out / name).unlink()
                moved += 1
    shutil.rmtree(partial)
    return moved


def _convert_locked(
    src: str,
    out: Path,
    resolution: int,
    patch: int,
    shard_size: int,
    image_format: str,
    text_encoder: str | None,
    max_tokens: int,
    progress: bool,
    workers: int,
    captions: str | None,
    image_column: str | None,
    limit: int | None,
    split: str,
    embedding_dtype: str,
    max_pixels: int,
    buckets,
    log,
) -> dict:
    from webdataset import ShardWriter

    source = open_source(src, captions, image_column, split, limit, log)
    encoder = None if text_encoder is None else _open_encoder(text_encoder, max_tokens, embedding_dtype, log)
    partial = out / _PARTIAL
    partial.mkdir(parents=True)
    try:
        written, stats = _write(
            source,
            partial,
            buckets,
            image_format,
            shard_size,
            encoder,
            embedding_dtype,
            max_pixels,
            workers,
            progress,
            ShardWriter,
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        raise
    shards = sorted(p.name for p in partial.glob("*.tar"))
    if not written:
        shutil.rmtree(partial)
        why = skip_text(source.skips.counts, source.skips.names, stats.read)
        raise ValueError(f"no image of {src} could be used ({why})")
    settings = {"resolution": resolution, "patch": patch, "image_format": image_format, "shard_size": shard_size}
    embeddings = None if encoder is None else _embeddings_entry(text_encoder, max_tokens, encoder.dim, embedding_dtype)
    index = _index(src, source, written, stats, partial, shards, settings, embeddings)
    _move_into_place(partial, out, shards, index)
    return index


def _open_encoder(text_encoder: str, max_tokens: int, embedding_dtype: str, log: Callable[[str], None]):
    """The text encoder whose caption embeddings the shards store; says what one caption costs."""
    from pixelrun.model.text import TextEncoder

    encoder = TextEncoder(text_encoder, max_tokens)
    per_text = max_tokens * encoder.dim * np.dtype(EMBEDDING_STORAGE[embedding_dtype]).itemsize
    log(
        f"text embeddings: {embedding_dtype}, at most {max_tokens} tokens x {encoder.dim} = "
        f"{format_bytes(per_text)} per caption text (stored trimmed to its tokens; the average per sample is "
        f"printed at the end)"
    )
    return encoder


def _embeddings_entry(text_encoder, max_tokens: int, dim: int, embedding_dtype: str) -> dict:
    """index.json's "text_embeddings": which encoder wrote them, and how they are stored."""
    return {
        "encoder": text_encoder,
        "fingerprint": _fingerprint(text_encoder),
        "max_tokens": max_tokens,
        "dim": dim,
        "dtype": embedding_dtype,
        "member": "KEY.emb.FIELD.npy",
        "stored_as": str(np.dtype(EMBEDDING_STORAGE[embedding_dtype])),
    }


def _index(
    src: str,
    source: Source,
    written: int,
    stats: _Stats,
    partial: Path,
    shards: list[str],
    settings: dict,
    embeddings: dict | None,
) -> dict:
    """index.json: counts, what was skipped and why, the settings, counts per bucket and per caption
    field, bytes per sample, and the stored embeddings (`embeddings`, None without)."""
    disk = sum((partial / name).stat().st_size for name in shards)
    skips = source.skips
    image_skips = [n for reason, names in skips.names.items() if reason != NO_CAPTION for n in names]
    return {
        "format": "pixelrun-shards/1",
        "source": src,
        **source.info,
        "count": written,
        "read": stats.read,
        "skipped": dict(skips.counts),
        "skipped_names": skips.names,
        "skipped_unreadable": skips.of_images(),
        "unreadable": image_skips[:NAMES_KEPT],
        "skipped_without_caption": skips.counts[NO_CAPTION],
        **settings,
        "shards": shards,
        "spec": f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar",
        "buckets": dict(sorted(stats.buckets.items())),
        "caption_fields": dict(sorted(stats.fields.items())),
        "bytes_per_sample": {
            "on_disk": round(disk / written),
            "image": round(stats.image_bytes / written),
            "text_embeddings": round(stats.embedding_bytes / written),
        },
        "text_embeddings": embeddings,
    }


def _move_into_place(partial: Path, out: Path, shards: list[str], index: dict) -> None:
    """`index.json` first into `.partial/` (it names the shards about to move), then the shards into
    `out`, then index.json: a folder is a finished conversion exactly when it has index.json and no
    `.partial/`. Interrupted midway, training refuses the folder and the next conversion removes
    what was moved."""
    with open(partial / INDEX_FILE, "w") as f:
        f.write(json.dumps(index, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for name in shards:
        (partial / name).rename(out / name)
    (partial / INDEX_FILE).rename(out / INDEX_FILE)
    partial.rmdir()


@dataclass
class _Stats:
    """What the writing loop counts for index.json: rows read, samples per bucket ("HxW") and per
    caption field, and the bytes of the images and of the stored embeddings."""

    read: int = 0
    buckets: Counter = field(default_factory=Counter)
    fields: Counter = field(default_factory=Counter)
    image_bytes: int = 0
    embedding_bytes: int = 0


def _write(
    source: Source,
    partial: Path,
    buckets,
    image_format: str,
    shard_size: int,
    encoder,
    embedding_dtype: str,
    max_pixels: int,
    workers: int,
    progress: bool,
    writer_cls,
) -> tuple[int, _Stats]:
    """The writing loop: chunks of items decoded (in `workers` processes, in order), captions
    encoded, samples written. Returns (samples written, statistics)."""
    stats = _Stats()
    resize = partial_fn(_resized_sample, buckets=buckets, image_format=image_format, max_pixels=max_pixels)
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    written = 0
    items = iter(source.items)
    try:
        # mtime 0: the same source gives the same bytes (whatever the date or the number of workers)
        with (
            writer_cls(str(partial / "%05d.tar"), maxcount=shard_size, verbose=0, mtime=0) as writer,
            progress_bar(total=source.total, desc="convert", unit="img", disable=not progress) as bar,
        ):
            while chunk := list(itertools.islice(items, _CHUNK)):
                stats.read += len(chunk)
                usable = []
                for item in chunk:
                    if item.captions:
                        usable.append(item)
                    else:
                        source.skips.add(NO_CAPTION, item.name)
                resized = pool.map(resize, usable, chunksize=4) if pool else map(resize, usable)
                samples: list[dict] = []
                for item, sample in zip(usable, resized):
                    if isinstance(sample, str):
                        source.skips.add(sample, item.name)
                        continue
                    sample["txt"] = _primary_caption(item.captions, source.primary)
                    sample["__key__"] = f"{written + len(samples):08d}"
                    samples.append(sample)
                if encoder is not None:
                    _caption_embeddings(encoder, samples, embedding_dtype)
                for sample in samples:
                    stats.buckets["x".join(map(str, sample["json"]["pixelrun"]["bucket"]))] += 1
                    stats.fields.update(
                        caption_fields(
                            {
                                "txt": sample["txt"].encode(),  # as training sees them
                                "json": json.dumps(sample["json"]).encode(),
                            }
                        ).keys()
                    )
                    stats.image_bytes += len(sample[image_format])
                    stats.embedding_bytes += sum(len(v) for k, v in sample.items() if k.startswith("emb."))
                    writer.write(sample)
                written += len(samples)
                bar.update(len(chunk))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return written, stats


def skip_text(counts: dict[str, int], names: dict[str, list[str]], read: int) -> str:
    """What was skipped, by reason, each with its first name (file and row for tables): one line."""
    if not counts:
        return "skipped nothing"
    parts = [
        f"{n} {reason}" + (f" (first: {names[reason][0]})" if names.get(reason) else "")
        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])
    ]
    return f"skipped {sum(counts.values())} of {read}: " + ", ".join(parts)


def _fingerprint(text_encoder: str) -> str:
    from pixelrun.model.text import encoder_fingerprint

    return encoder_fingerprint(text_encoder)


def _resized_sample(
    item: SourceImage, buckets: list[tuple[int, int]], image_format: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict | str:
    """One sample to write (without its key and txt), or why the image cannot be used."""
    if item.data is None and item.path is None:
        return "without an image"

    def opened():
        return io.BytesIO(item.data) if item.data is not None else item.path

    size = read_size(opened(), max_pixels=2**62)  # the size limit is checked here, to say so
    if size is None:
        return "unreadable image"
    if size[0] * size[1] > max_pixels:
        return "enormous image"
    bucket = nearest_bucket(*size, buckets)
    im = load_rgb(opened(), max_pixels, target=bucket)  # a JPEG may decode at a reduced scale: size is the header's
    if im is None:
        return "image does not decode"
    meta = {"original_size": list(size), "bucket": list(bucket), "source": item.name}
    return {
        image_format: _encode_image(resize_to_bucket(im, *bucket), image_format),
        "json": {**item.captions, "pixelrun": meta},
    }
