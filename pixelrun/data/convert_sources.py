"""What `pixelrun data convert` reads: an image folder, a JSONL manifest, or Parquet / Arrow tables and
Hugging Face datasets (pixelrun/data/parquet.py), as `SourceImage` items in order, with what was left
out and why (`Skips`) and what index.json records about the source."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pixelrun.config import ConfigError
from pixelrun.data import SourceImage
from pixelrun.data.folder import ImageFolder

MANIFEST_IMAGE_KEYS = ("file", "image", "file_name")  # as ImageFolder's captions.jsonl
PRIMARY_CAPTION_KEYS = ("caption", "text")
NAMES_KEPT = 100  # names of skipped rows kept per reason in index.json
NO_CAPTION = "without a caption"


@dataclass
class Skips:
    """Rows or files left out, by reason, with the first names of each (for the final line and
    index.json)."""

    counts: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str | None, n: int = 1) -> None:
        self.counts[reason] += n
        kept = self.names.setdefault(reason, [])
        if name is not None and len(kept) < NAMES_KEPT:
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
            image_key = next(k for k in MANIFEST_IMAGE_KEYS if isinstance(rec.get(k), str))
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
class Source:
    """What convert reads: the items in order, how many there are (for the progress bar), what was
    counted as unusable before reading, and what index.json records about the source."""

    items: Iterable[SourceImage]
    total: int
    skips: Skips
    info: dict
    primary: tuple[str, ...] = PRIMARY_CAPTION_KEYS  # caption fields `txt` is taken from, first present


def open_source(
    src: str, captions: str | None, image_column: str | None, split: str, limit: int | None, log: Callable[[str], None]
) -> Source:
    from pixelrun.data.parquet import (
        choose_caption_columns,
        choose_image_column,
        is_table_source,
        memory_notes,
        resolve_tables,
        table_rows,
    )

    skips = Skips()
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
        return Source(items, total, skips, info, tuple(c for c, _ in columns))
    if captions is not None or image_column is not None:
        key = "--captions" if captions is not None else "--image-column"
        raise ConfigError(
            key,
            "only for Parquet / Arrow tables and Hugging Face datasets (an image folder's captions "
            "are its .txt files or captions.jsonl; a manifest's are its string fields)",
        )
    path = Path(src)
    if path.is_dir():
        images, without_caption = folder_images(path)
        kind = "folder"
    elif path.is_file():
        images, without_caption = manifest_images(path)
        kind = "manifest"
    else:
        raise FileNotFoundError(f"no such image folder, manifest, Parquet / Arrow file or Hub dataset: {src}")
    if without_caption:
        skips.add(NO_CAPTION, None, without_caption)
    images = images[:limit] if limit is not None else images
    return Source(images, len(images), skips, {"source_kind": kind, "captions": None})
