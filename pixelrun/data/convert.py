"""`pixelrun data convert` and `pixelrun data inspect`: write and look at WebDataset shards.

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
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial as partial_fn
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pixelrun.config import ConfigError, TextConfig, aspect_buckets
from pixelrun.data import SourceImage
from pixelrun.data.buckets import nearest_bucket, resize_to_bucket
from pixelrun.data.folder import DEFAULT_MAX_PIXELS, ImageFolder, load_rgb, read_size
from pixelrun.data.shards import (
    EMBEDDING_STORAGE,
    INDEX_FILE,
    PARTIAL_DIR,
    caption_fields,
    embedding_member,
    expand_shards,
    image_member,
    read_index,
    read_samples,
)
from pixelrun.infra.locks import folder_lock

IMAGE_FORMATS = ("jpg", "png")
EMBEDDING_DTYPES = tuple(EMBEDDING_STORAGE)  # bfloat16 (default), float16, float32
_MANIFEST_IMAGE_KEYS = ("file", "image", "file_name")  # as ImageFolder's captions.jsonl
_PRIMARY_CAPTION_KEYS = ("caption", "text")
_CHUNK = 64  # samples whose captions are encoded together
_PARTIAL = PARTIAL_DIR  # where shards are written until the conversion completes
_NAMES_KEPT = 100  # names of skipped rows kept per reason in index.json
NO_CAPTION = "without a caption"


@dataclass
class _Skips:
    """Rows or files left out, by reason, with the first names of each (for the final line and
    index.json)."""

    counts: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str | None, n: int = 1) -> None:
        self.counts[reason] += n
        kept = self.names.setdefault(reason, [])
        if name is not None and len(kept) < _NAMES_KEPT:
            kept.append(name)

    def of_images(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason != NO_CAPTION)


def folder_images(root: Path) -> tuple[list[SourceImage], int]:
    """An image folder, with the captions ImageFolder finds; and how many images lacked one."""
    folder = ImageFolder(root)
    items = [
        SourceImage(p, p.relative_to(folder.root).as_posix(), {"caption": c})
        for p, c in zip(folder.paths, folder.captions)
    ]
    return items, folder.missing_captions


def manifest_images(manifest: Path) -> tuple[list[SourceImage], int]:
    """A JSONL manifest: one object a line, the image path (relative to the manifest) under "file",
    "image" or "file_name", every other non-empty string value a caption field. Lines without an
    image path or any caption are counted, not fatal."""
    items, bad = [], 0
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image_key = next(k for k in _MANIFEST_IMAGE_KEYS if isinstance(rec.get(k), str))
        except (ValueError, StopIteration, AttributeError):
            bad += 1
            continue
        captions = {k: v.strip() for k, v in rec.items() if k != image_key and isinstance(v, str) and v.strip()}
        if not captions:
            bad += 1
            continue
        items.append(SourceImage(manifest.parent / rec[image_key], rec[image_key], captions))
    if not items:
        raise ValueError(f"manifest {manifest} has no line with an image path and a caption")
    return items, bad


@dataclass
class _Source:
    """What convert reads: the items in order, how many there are (for the progress bar), what was
    counted as unusable before reading, and what index.json records about the source."""

    items: Iterable[SourceImage]
    total: int
    skips: _Skips
    info: dict
    primary: tuple[str, ...] = _PRIMARY_CAPTION_KEYS  # caption fields `txt` is taken from, first present


def _open_source(
    src: str, captions: str | None, image_column: str | None, split: str, limit: int | None, log: Callable[[str], None]
) -> _Source:
    from pixelrun.data.parquet import (
        choose_caption_columns,
        choose_image_column,
        is_table_source,
        memory_notes,
        resolve_tables,
        table_rows,
    )

    skips = _Skips()
    if is_table_source(src):
        files = resolve_tables(src, split)
        image = choose_image_column(files, image_column)
        columns = choose_caption_columns(files, captions)
        for note in memory_notes(files):
            log(note)
        rows = sum(f.rows for f in files)
        items = table_rows(
            files, image, columns, limit, on_error=lambda what, n: skips.add("unreadable row group", what, n)
        )
        fields = [f"json.{c}" for c, _ in columns]
        spec = ",".join(f if w == 1 else f"{f}:{w:g}" for f, (_, w) in zip(fields, columns))
        info = {
            "source_kind": "table",
            "files": [str(f.path) for f in files][:1000],
            "file_count": len(files),
            "rows": rows,
            "image_column": image,
            "caption_columns": dict(columns),
            # data.captions for these shards: the columns with their weights (`txt` is the first present)
            "captions": spec if len(columns) > 1 or columns[0][1] != 1 else None,
        }
        total = min(rows, limit) if limit is not None else rows
        return _Source(items, total, skips, info, tuple(c for c, _ in columns))
    if captions is not None or image_column is not None:
        key = "--captions" if captions is not None else "--image-column"
        raise ConfigError(
            key,
            "only for Parquet / Arrow tables and Hugging Face datasets (an image folder's captions "
            "are its .txt files or captions.jsonl; a manifest's are its string fields)",
        )
    path = Path(src)
    if path.is_dir():
        items, without_caption = folder_images(path)
        kind = "folder"
    elif path.is_file():
        items, without_caption = manifest_images(path)
        kind = "manifest"
    else:
        raise FileNotFoundError(f"no such image folder, manifest, Parquet / Arrow file or Hub dataset: {src}")
    if without_caption:
        skips.add(NO_CAPTION, None, without_caption)
    items = items[:limit] if limit is not None else items
    return _Source(items, len(items), skips, {"source_kind": kind, "captions": None})


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

    source = _open_source(src, captions, image_column, split, limit, log)

    encoder = None
    if text_encoder is not None:
        from pixelrun.model.text import TextEncoder

        encoder = TextEncoder(text_encoder, max_tokens)
        per_text = max_tokens * encoder.dim * np.dtype(EMBEDDING_STORAGE[embedding_dtype]).itemsize
        log(
            f"text embeddings: {embedding_dtype}, at most {max_tokens} tokens x {encoder.dim} = "
            f"{format_bytes(per_text)} per caption text (stored trimmed to its tokens; the average per sample is "
            f"printed at the end)"
        )
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
        why = skip_text(source.skips.counts, source.skips.names, stats["read"])
        raise ValueError(f"no image of {src} could be used ({why})")
    disk = sum((partial / name).stat().st_size for name in shards)
    skips = source.skips
    image_skips = [n for reason, names in skips.names.items() if reason != NO_CAPTION for n in names]
    index = {
        "format": "pixelrun-shards/1",
        "source": src,
        **source.info,
        "count": written,
        "read": stats["read"],
        "skipped": dict(skips.counts),
        "skipped_names": skips.names,
        "skipped_unreadable": skips.of_images(),
        "unreadable": image_skips[:_NAMES_KEPT],
        "skipped_without_caption": skips.counts[NO_CAPTION],
        "resolution": resolution,
        "patch": patch,
        "image_format": image_format,
        "shard_size": shard_size,
        "shards": shards,
        "spec": f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar",
        "buckets": dict(sorted(stats["buckets"].items())),
        "caption_fields": dict(sorted(stats["fields"].items())),
        "bytes_per_sample": {
            "on_disk": round(disk / written),
            "image": round(stats["image_bytes"] / written),
            "text_embeddings": round(stats["embedding_bytes"] / written),
        },
        "text_embeddings": None
        if encoder is None
        else {
            "encoder": text_encoder,
            "fingerprint": _fingerprint(text_encoder),
            "max_tokens": max_tokens,
            "dim": encoder.dim,
            "dtype": embedding_dtype,
            "member": "KEY.emb.FIELD.npy",
            "stored_as": str(np.dtype(EMBEDDING_STORAGE[embedding_dtype])),
        },
    }
    _move_into_place(partial, out, shards, index)
    return index


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


def _write(
    source: _Source,
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
) -> tuple[int, dict]:
    """The writing loop: chunks of items decoded (in `workers` processes, in order), captions
    encoded, samples written. Returns (samples written, statistics)."""
    stats = {"read": 0, "buckets": Counter(), "fields": Counter(), "image_bytes": 0, "embedding_bytes": 0}
    resize = partial_fn(_resized_sample, buckets=buckets, image_format=image_format, max_pixels=max_pixels)
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    written = 0
    items = iter(source.items)
    try:
        # mtime 0: the same source gives the same bytes (whatever the date or the number of workers)
        with (
            writer_cls(str(partial / "%05d.tar"), maxcount=shard_size, verbose=0, mtime=0) as writer,
            tqdm(total=source.total, desc="convert", unit="img", disable=not progress) as bar,
        ):
            while chunk := list(itertools.islice(items, _CHUNK)):
                stats["read"] += len(chunk)
                usable = []
                for item in chunk:
                    if item.captions:
                        usable.append(item)
                    else:
                        source.skips.add(NO_CAPTION, item.name)
                resized = pool.map(resize, usable, chunksize=4) if pool else map(resize, usable)
                samples = []
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
                    stats["buckets"]["x".join(map(str, sample["json"]["pixelrun"]["bucket"]))] += 1
                    stats["fields"].update(
                        caption_fields(
                            {
                                "txt": sample["txt"].encode(),  # as training sees them
                                "json": json.dumps(sample["json"]).encode(),
                            }
                        ).keys()
                    )
                    stats["image_bytes"] += len(sample[image_format])
                    stats["embedding_bytes"] += sum(len(v) for k, v in sample.items() if k.startswith("emb."))
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


# ----------------------------------------------------------------------------- inspect


def _length_stats(values: list[int]) -> dict:
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "max": max(values),
    }


def _thumbnail(im: Image.Image, tile: int) -> np.ndarray:
    """The image scaled to fit a white tile x tile square (the contact sheet needs one size);
    enlarged with nearest neighbours, so small training images show their real pixels."""
    scale = tile / max(im.size)
    im = im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
        Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS,
    )
    canvas = Image.new("RGB", (tile, tile), (255, 255, 255))
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return np.asarray(canvas)


def inspect_shards(
    spec: str,
    contact_sheet: str | Path | None = None,
    n: int = 64,
    resolution: int | None = None,
    patch: int = 32,
    tile: int = 128,
    progress: bool = True,
) -> dict:
    """Read every sample of the shards: counts per bucket, caption length statistics per caption
    field, broken samples (no image, unreadable image header, no caption, read errors), stored
    embeddings; and optionally a contact sheet PNG of the first n usable samples.

    Buckets are those of `resolution` (and `patch`) when given, else the stored sizes, which are the
    buckets of shards written by `convert` (img2dataset's shards hold any size)."""
    urls = expand_shards(spec)
    index = read_index(urls)
    buckets = aspect_buckets(resolution, patch) if resolution else None
    sizes: Counter = Counter()
    chars: dict[str, list[int]] = {}
    words: dict[str, list[int]] = {}
    embedded: Counter = Counter()
    broken: list[str] = []
    sheet: list[tuple[np.ndarray, str]] = []
    count = 0

    def on_error(exn: Exception) -> bool:
        broken.append(f"read error: {exn.args[0] if exn.args else exn!r}")
        return True

    bar = tqdm(total=(index or {}).get("count"), desc="inspect", unit="sample", disable=not progress, leave=False)
    for url in urls:
        for sample in read_samples(url, on_error):
            bar.update(1)
            ext = image_member(sample)
            size = read_size(io.BytesIO(sample[ext])) if ext else None
            captions = caption_fields(sample)
            if size is None or not captions:
                why = "no image member" if ext is None else "unreadable image" if size is None else "no caption"
                broken.append(f"{url}#{sample['__key__']} ({why})")
                continue
            count += 1
            sizes["x".join(map(str, nearest_bucket(*size, buckets) if buckets else size))] += 1
            for name, text in captions.items():
                chars.setdefault(name, []).append(len(text))
                words.setdefault(name, []).append(len(text.split()))
            embedded.update(
                k[len("emb.") : -len(".npy")] for k in sample if k.startswith("emb.") and k.endswith(".npy")
            )
            if contact_sheet is not None and len(sheet) < n:
                im = load_rgb(io.BytesIO(sample[ext]))
                if im is not None:
                    sheet.append((_thumbnail(im, tile), next(iter(captions.values()))))
    bar.close()
    report = {
        "spec": spec,
        "shards": len(urls),
        "samples": count,
        "broken": len(broken),
        "broken_examples": broken[:5],
        "buckets": dict(sorted(sizes.items())),
        "buckets_of": f"{resolution}px, patch {patch}" if buckets else "stored sizes",
        "captions": {
            f: {"count": len(chars[f]), "chars": _length_stats(chars[f]), "words": _length_stats(words[f])}
            for f in sorted(chars)
        },
        "embeddings": {
            "fields": dict(sorted(embedded.items())),
            "encoder": ((index or {}).get("text_embeddings") or {}).get("fingerprint"),
            "dtype": ((index or {}).get("text_embeddings") or {}).get("dtype"),
        },
        # how the shards were written (index.json of `pixelrun data convert`), when known
        "converted": {
            k: index[k]
            for k in ("source", "caption_columns", "captions", "resolution", "patch", "bytes_per_sample", "skipped")
            if k in index
        }
        if index
        else None,
    }
    if contact_sheet is not None and sheet:
        from pixelrun.infra.grids import save_grid

        report["contact_sheet"] = str(
            save_grid(np.stack([a for a, _ in sheet]), [c for _, c in sheet], contact_sheet, tile=tile, columns=8)
        )
    return report


def format_report(r: dict) -> str:
    """The inspect_shards report as lines for a terminal."""
    lines = [
        f"{r['spec']}: {r['shards']} shard(s), {r['samples']} samples, {r['broken']} broken"
        + (f" (first: {r['broken_examples'][0]})" if r["broken"] else "")
    ]
    lines.append(
        f"buckets ({r['buckets_of']}), HxW: samples: " + ", ".join(f"{k}: {v}" for k, v in r["buckets"].items())
    )
    lines.append(
        f"{'caption field':<24}{'samples':>8}  {'chars min/mean/median/max':>28}  {'words min/mean/median/max':>28}"
    )
    for name, s in r["captions"].items():
        c, w = s["chars"], s["words"]
        lines.append(
            f"{name:<24}{s['count']:>8}  {'%d / %.1f / %g / %d' % (c['min'], c['mean'], c['median'], c['max']):>28}"
            f"  {'%d / %.1f / %g / %d' % (w['min'], w['mean'], w['median'], w['max']):>28}"
        )
    conv = r.get("converted") or {}
    if conv.get("caption_columns"):
        lines.append(
            "caption columns at conversion (weight): "
            + ", ".join(f"{c} ({w:g})" for c, w in conv["caption_columns"].items())
            + (f"; train with data.captions={conv['captions']}" if conv.get("captions") else "")
        )
    emb = r["embeddings"]
    if emb["fields"]:
        lines.append(
            f"text embeddings: {emb['encoder'] or 'encoder unknown (no index.json)'}"
            + (f", {emb['dtype']}" if emb.get("dtype") else "")
            + "; samples per stored field: "
            + ", ".join(f"{k}: {v}" for k, v in emb["fields"].items())
            + " (a json field equal to txt uses txt's)"
        )
    else:
        lines.append("text embeddings: none")
    if conv.get("bytes_per_sample"):
        b = conv["bytes_per_sample"]
        lines.append(
            f"bytes per sample: {format_bytes(b['on_disk'])} on disk (image {format_bytes(b['image'])}, "
            f"text embeddings {format_bytes(b['text_embeddings'])})"
        )
    if "contact_sheet" in r:
        lines.append(f"contact sheet: {r['contact_sheet']}")
    return "\n".join(lines)
