"""`pixelrun data inspect`: read every sample of a set of shards and report counts per bucket, caption
lengths per field, broken samples and stored embeddings, with an optional contact sheet."""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pixelrun.config import aspect_buckets
from pixelrun.data.buckets import nearest_bucket
from pixelrun.data.convert import format_bytes
from pixelrun.data.folder import load_rgb, read_size
from pixelrun.data.shards import caption_fields, expand_shards, image_member, read_index, read_samples
from pixelrun.infra.progress import progress as progress_bar


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


@dataclass
class _Tally:
    """What `inspect_shards` counts while it reads: sizes (as buckets when `buckets`), caption lengths
    per field, stored embeddings per field, broken samples in the order met, and the first `n`
    thumbnails for the contact sheet (`sheet_tile`: None = no sheet)."""

    buckets: list[tuple[int, int]] | None
    sheet_tile: int | None
    n: int
    count: int = 0
    sizes: Counter = field(default_factory=Counter)
    chars: dict[str, list[int]] = field(default_factory=dict)
    words: dict[str, list[int]] = field(default_factory=dict)
    embedded: Counter = field(default_factory=Counter)
    broken: list[str] = field(default_factory=list)
    sheet: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def on_error(self, exn: Exception) -> bool:
        self.broken.append(f"read error: {exn.args[0] if exn.args else exn!r}")
        return True

    def add(self, url: str, sample: dict) -> None:
        ext = image_member(sample)
        size = read_size(io.BytesIO(sample[ext])) if ext else None
        captions = caption_fields(sample)
        if size is None or not captions:
            why = "no image member" if ext is None else "unreadable image" if size is None else "no caption"
            self.broken.append(f"{url}#{sample['__key__']} ({why})")
            return
        self.count += 1
        self.sizes["x".join(map(str, nearest_bucket(*size, self.buckets) if self.buckets else size))] += 1
        for name, text in captions.items():
            self.chars.setdefault(name, []).append(len(text))
            self.words.setdefault(name, []).append(len(text.split()))
        self.embedded.update(
            k[len("emb.") : -len(".npy")] for k in sample if k.startswith("emb.") and k.endswith(".npy")
        )
        if self.sheet_tile is not None and len(self.sheet) < self.n:
            im = load_rgb(io.BytesIO(sample[ext]))
            if im is not None:
                self.sheet.append((_thumbnail(im, self.sheet_tile), next(iter(captions.values()))))


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
    tally = _Tally(buckets, tile if contact_sheet is not None else None, n)
    bar = progress_bar(
        total=(index or {}).get("count"), desc="inspect", unit="sample", disable=not progress, leave=False
    )
    for url in urls:
        for sample in read_samples(url, tally.on_error):
            bar.update(1)
            tally.add(url, sample)
    bar.close()
    report = _report(spec, len(urls), index, tally, f"{resolution}px, patch {patch}" if buckets else "stored sizes")
    if contact_sheet is not None and tally.sheet:
        from pixelrun.infra.grids import save_grid

        sheet = tally.sheet
        report["contact_sheet"] = str(
            save_grid(np.stack([a for a, _ in sheet]), [c for _, c in sheet], contact_sheet, tile=tile, columns=8)
        )
    return report


def _report(spec: str, shards: int, index: dict | None, t: _Tally, buckets_of: str) -> dict:
    """inspect_shards' report of what `t` counted (`index`: the shards' index.json, None without)."""
    stored = (index or {}).get("text_embeddings") or {}
    return {
        "spec": spec,
        "shards": shards,
        "samples": t.count,
        "broken": len(t.broken),
        "broken_examples": t.broken[:5],
        "buckets": dict(sorted(t.sizes.items())),
        "buckets_of": buckets_of,
        "captions": {
            f: {"count": len(t.chars[f]), "chars": _length_stats(t.chars[f]), "words": _length_stats(t.words[f])}
            for f in sorted(t.chars)
        },
        "embeddings": {
            "fields": dict(sorted(t.embedded.items())),
            "encoder": stored.get("fingerprint"),
            "dtype": stored.get("dtype"),
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
