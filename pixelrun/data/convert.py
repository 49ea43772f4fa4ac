"""`pixelrun data convert` and `pixelrun data inspect`: write and look at WebDataset shards.

Converting resizes every image once, to its nearest aspect bucket at the target resolution, so
training reads small images and never decodes a 4000-pixel photo per step. What a shard holds, per
sample KEY (eight digits, the sample's number in the dataset):

  KEY.jpg (default) or KEY.png   the image at its bucket size
  KEY.txt                        the caption (a manifest's "caption" or "text" field, else its first
                                 string field); absent when the sample has no such field
  KEY.json                       every caption field (top-level strings), and under "pixelrun" the
                                 original size, the bucket and the source file
  KEY.emb.FIELD.npy              with --text-encoder: the caption's embedding for each caption field
                                 (FIELD = txt or json.NAME), fp16 [real tokens, dim]

and beside the shards (00000.tar, 00001.tar, ...) `index.json`: counts, counts per bucket, the
settings, and the encoder fingerprint and max_tokens of the stored embeddings.

JPEG (quality 95, no chroma subsampling) is the default: at 1024 px it is several times smaller
than PNG and faster to decode, and PIL can decode it at a reduced scale when training at a lower
resolution; its error is far below what a diffusion model reproduces. `--format png` keeps the
pixels exact.
"""
from __future__ import annotations

import io
import json
import shutil
import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial as partial_fn
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..config import TextConfig
from .buckets import aspect_buckets, nearest_bucket, resize_to_bucket
from .folder import ImageFolder, load_rgb, read_size
from .shards import (INDEX_FILE, caption_fields, embedding_member, expand_shards, image_member, read_index,
                     read_samples)

IMAGE_FORMATS = ("jpg", "png")
_MANIFEST_IMAGE_KEYS = ("file", "image", "file_name")  # as ImageFolder's captions.jsonl
_PRIMARY_CAPTION_KEYS = ("caption", "text")
_CHUNK = 64  # samples whose captions are encoded together
_PARTIAL = ".partial"  # where shards are written until the conversion completes


@dataclass
class SourceImage:
    path: Path
    name: str  # relative to the source, for messages and the sample's json
    captions: dict[str, str]  # field name in the sample's json -> caption


def folder_images(root: Path) -> tuple[list[SourceImage], int]:
    """An image folder, with the captions ImageFolder finds; and how many images lacked one."""
    folder = ImageFolder(root)
    items = [SourceImage(p, p.relative_to(folder.root).as_posix(), {"caption": c})
             for p, c in zip(folder.paths, folder.captions)]
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


def _primary_caption(captions: dict[str, str]) -> str:
    return next((captions[k] for k in _PRIMARY_CAPTION_KEYS if k in captions), next(iter(captions.values())))


def _encode_image(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=95, subsampling=0)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def _caption_embeddings(encoder, samples: list[dict]) -> None:
    """Add each caption field's embedding to its sample: fp16, only the real tokens (the mask's
    True rows), which is what training pads back to max_tokens."""
    jobs = [(s, field, text) for s in samples for field, text in _fields_of(s).items()]
    if not jobs:
        return
    emb, mask = encoder.encode([text for _, _, text in jobs])
    for (s, field, _), e, m in zip(jobs, emb, mask):
        s[embedding_member(field)] = e[m].numpy().astype(np.float16)


def _fields_of(sample: dict) -> dict[str, str]:
    """The caption fields of a sample being written, named as training names them."""
    out = {"txt": sample["txt"]} if "txt" in sample else {}
    out.update({f"json.{k}": v for k, v in sample["json"].items() if isinstance(v, str)})
    return out


def convert(src: str | Path, out: str | Path, resolution: int, patch: int = 32, shard_size: int = 1000,
            image_format: str = "jpg", text_encoder: str | None = None, max_tokens: int = TextConfig.max_tokens,
            progress: bool = True, workers: int = 0) -> dict:
    """Write the images of `src` (an image folder or a JSONL manifest) as shards under `out`,
    each resized once to its aspect bucket at `resolution`. Returns the index it writes.

    `workers` > 0 decodes, resizes and encodes in that many processes (the shards are the same).
    The shards are written under `out/.partial/` and moved into `out` only when all are complete,
    `index.json` last, so an interrupted conversion never leaves shards that look finished; running
    it again starts over."""
    from webdataset import ShardWriter

    src, out = Path(src), Path(out)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}; got {image_format!r}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1; got {shard_size}")
    buckets = aspect_buckets(resolution, patch)
    if src.is_dir():
        items, without_caption = folder_images(src)
    elif src.is_file():
        items, without_caption = manifest_images(src)
    else:
        raise FileNotFoundError(f"no such image folder or manifest: {src}")
    if out.is_dir() and any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds .tar shards; convert into an empty folder")
    partial = out / _PARTIAL
    if partial.exists():  # left by an interrupted conversion
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    encoder = None
    if text_encoder is not None:
        from ..text import TextEncoder

        encoder = TextEncoder(text_encoder, max_tokens)
    per_bucket: Counter = Counter()
    unreadable: list[str] = []
    written = 0
    resize = partial_fn(_resized_sample, buckets=buckets, image_format=image_format)
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    with ShardWriter(str(partial / "%05d.tar"), maxcount=shard_size, verbose=0) as writer, \
            tqdm(total=len(items), desc="convert", unit="img", disable=not progress) as bar:
        for start in range(0, len(items), _CHUNK):
            samples = []
            chunk = items[start:start + _CHUNK]
            resized = pool.map(resize, chunk, chunksize=4) if pool else map(resize, chunk)
            for item, sample in zip(chunk, resized):
                if sample is None:
                    unreadable.append(item.name)
                    continue
                sample["__key__"] = f"{written + len(samples):08d}"
                samples.append(sample)
            if encoder is not None:
                _caption_embeddings(encoder, samples)
            for sample in samples:
                per_bucket["x".join(map(str, sample["json"]["pixelrun"]["bucket"]))] += 1
                writer.write(sample)
            written += len(samples)
            bar.update(len(chunk))
    if pool:
        pool.shutdown()
    shards = sorted(p.name for p in partial.glob("*.tar"))
    if not written:
        shutil.rmtree(partial)
        raise ValueError(f"no image of {src} could be read ({len(unreadable)} unreadable)")
    for name in shards:
        (partial / name).rename(out / name)
    partial.rmdir()
    index = {
        "format": "pixelrun-shards/1", "source": str(src), "count": written,
        "skipped_unreadable": len(unreadable), "unreadable": unreadable[:100],
        "skipped_without_caption": without_caption, "resolution": resolution, "patch": patch,
        "image_format": image_format, "shard_size": shard_size, "shards": shards,
        "spec": f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar",
        "buckets": dict(sorted(per_bucket.items())),
        "text_embeddings": None if encoder is None else {
            "encoder": text_encoder, "fingerprint": _fingerprint(text_encoder), "max_tokens": max_tokens,
            "dim": encoder.dim, "dtype": "float16", "member": "KEY.emb.FIELD.npy"},
    }
    tmp = out / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(out / INDEX_FILE)
    return index


def _fingerprint(text_encoder: str) -> str:
    from ..text import encoder_fingerprint

    return encoder_fingerprint(text_encoder)


def _resized_sample(item: SourceImage, buckets: list[tuple[int, int]], image_format: str) -> dict | None:
    """One sample to write (without its key), or None if the image cannot be read."""
    size = read_size(item.path)
    if size is None:
        return None
    bucket = nearest_bucket(*size, buckets)
    im = load_rgb(item.path, target=bucket)  # a JPEG may decode at a reduced scale: size is the header's
    if im is None:
        return None
    meta = {"original_size": list(size), "bucket": list(bucket), "source": item.name}
    sample = {image_format: _encode_image(resize_to_bucket(im, *bucket), image_format),
              "json": {**item.captions, "pixelrun": meta}}
    sample["txt"] = _primary_caption(item.captions)
    return sample


# ----------------------------------------------------------------------------- inspect

def _length_stats(values: list[int]) -> dict:
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
            "max": max(values)}


def _thumbnail(im: Image.Image, tile: int) -> np.ndarray:
    """The image scaled to fit a white tile x tile square (the contact sheet needs one size);
    enlarged with nearest neighbours, so small training images show their real pixels."""
    scale = tile / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (tile, tile), (255, 255, 255))
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return np.asarray(canvas)


def inspect_shards(spec: str, contact_sheet: str | Path | None = None, n: int = 64, resolution: int | None = None,
                   patch: int = 32, tile: int = 128, progress: bool = True) -> dict:
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
                broken.append(f"{url}#{sample['__key__']}")
                continue
            count += 1
            sizes["x".join(map(str, nearest_bucket(*size, buckets) if buckets else size))] += 1
            for field, text in captions.items():
                chars.setdefault(field, []).append(len(text))
                words.setdefault(field, []).append(len(text.split()))
            embedded.update(k[len("emb."):-len(".npy")] for k in sample if k.startswith("emb.") and k.endswith(".npy"))
            if contact_sheet is not None and len(sheet) < n:
                im = load_rgb(io.BytesIO(sample[ext]))
                if im is not None:
                    sheet.append((_thumbnail(im, tile), next(iter(captions.values()))))
    bar.close()
    report = {
        "spec": spec, "shards": len(urls), "samples": count, "broken": len(broken), "broken_examples": broken[:5],
        "buckets": dict(sorted(sizes.items())), "buckets_of": f"{resolution}px, patch {patch}" if buckets else "stored sizes",
        "captions": {f: {"count": len(chars[f]), "chars": _length_stats(chars[f]), "words": _length_stats(words[f])}
                     for f in sorted(chars)},
        "embeddings": {"fields": dict(sorted(embedded.items())),
                       "encoder": ((index or {}).get("text_embeddings") or {}).get("fingerprint")},
    }
    if contact_sheet is not None and sheet:
        from ..images import save_grid

        report["contact_sheet"] = str(save_grid(np.stack([a for a, _ in sheet]), [c for _, c in sheet],
                                                contact_sheet, tile=tile, columns=8))
    return report


def format_report(r: dict) -> str:
    """The inspect_shards report as lines for a terminal."""
    lines = [f"{r['spec']}: {r['shards']} shard(s), {r['samples']} samples, {r['broken']} broken"
             + (f" (first: {r['broken_examples'][0]})" if r["broken"] else "")]
    lines.append(f"buckets ({r['buckets_of']}), HxW: samples: " + ", ".join(f"{k}: {v}" for k, v in r["buckets"].items()))
    lines.append(f"{'caption field':<24}{'samples':>8}  {'chars min/mean/median/max':>28}  {'words min/mean/median/max':>28}")
    for field, s in r["captions"].items():
        c, w = s["chars"], s["words"]
        lines.append(f"{field:<24}{s['count']:>8}  {'%d / %.1f / %g / %d' % (c['min'], c['mean'], c['median'], c['max']):>28}"
                     f"  {'%d / %.1f / %g / %d' % (w['min'], w['mean'], w['median'], w['max']):>28}")
    emb = r["embeddings"]
    if emb["fields"]:
        lines.append(f"text embeddings: {emb['encoder'] or 'encoder unknown (no index.json)'}; samples per field: "
                     + ", ".join(f"{k}: {v}" for k, v in emb["fields"].items()))
    else:
        lines.append("text embeddings: none")
    if "contact_sheet" in r:
        lines.append(f"contact sheet: {r['contact_sheet']}")
    return "\n".join(lines)
