"""Training from a plain folder of images with captions.

Real folders contain surprises (CMYK JPEGs, 16-bit PNGs, transparency, truncated downloads,
non-images with image names, decompression bombs). One bad file must never stop a multi-day
run, so loading returns None instead of raising, and the batch source skips, counts and replaces.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from pixelrun.config import ConfigError
from pixelrun.data import Batch, NoUsableData
from pixelrun.data.batching import BucketedBatchSource
from pixelrun.data.buckets import resize_to_bucket, stack_images, to_array

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def _orientation(im: Image.Image) -> int:
    """EXIF orientation, read only when the EXIF bytes are already in the header (JPEG, WebP):
    `getexif()` on a PNG would decode the whole image, which the lazy size read must avoid."""
    if "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1


def read_size(path: str | os.PathLike | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) as displayed (EXIF rotation applied) from the header alone, or None if the
    file is not a readable image or exceeds `max_pixels`. Cheap: PIL's open parses headers only.
    `path` may also be a binary file object (a shard member's bytes in a BytesIO)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                return None
            return (w, h) if _orientation(im) in _SWAPS_AXES else (h, w)
    except Exception:  # UnidentifiedImageError, OSError, DecompressionBombError/Warning-as-error
        return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white (what a viewer shows, and it keeps
    the colour of fully transparent pixels, often garbage, out of the training data); 16/32-bit
    integer grey is rescaled from its 16-bit range instead of being clipped at 255 (PIL's convert
    would turn most of a 16-bit image white)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if im.mode == "F" and a.max(initial=0) <= 1.0 else a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")  # RGB (copy), L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(
    path: str | os.PathLike | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS, target: tuple[int, int] | None = None
) -> Image.Image | None:
    """Decode `path` (a file, or a binary file object) into an upright 8-bit RGB image, or None if
    it cannot be used.

    None (never an exception) for non-images, truncated or corrupt files, and images above
    `max_pixels`. PIL's own decompression-bomb guard stays on: its DecompressionBombError (and its
    warning, if the caller turned warnings into errors) is caught here, so an enormous file is
    skipped without PIL's protection being disabled globally. `target` = (height, width) lets a
    JPEG decode at a reduced DCT scale (`draft`) that still covers the target, which is several
    times faster for large photos and loses nothing after the final downscale.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                return None
            if target is not None and im.format == "JPEG":
                th, tw = target
                if _orientation(im) in _SWAPS_AXES:
                    th, tw = tw, th
                im.draft(None, (tw, th))  # keeps each side >= the requested side
            im.load()  # raises on truncated data (unless someone set LOAD_TRUNCATED_IMAGES)
            return _to_rgb(ImageOps.exif_transpose(im) or im)
    except Exception:
        return None


class ImageFolder:
    """Images found recursively under `root`, each with a caption.

    Captions come from `stem.txt` beside the image, or from `root/captions.jsonl` (one JSON object
    a line with the path relative to root under "file", "image" or "file_name", and the caption
    under "caption" or "text"); a non-empty .txt file wins when both exist. Images without a non-empty
    caption are counted in `missing_captions` and skipped, or kept with the empty caption
    (`keep_uncaptioned`, data.uncaptioned=empty).
    Hidden files and folders (".name") are ignored. Image sizes are read lazily from headers and
    cached, so building the index of a big folder costs one directory walk, not one open per file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        exts: tuple[str, ...] = IMAGE_EXTS,
        captions_file: str = "captions.jsonl",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        keep_uncaptioned: bool = False,
    ):
        self.root = Path(root)
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        exts = tuple(e.lower() for e in exts)
        jsonl = self._read_jsonl(self.root / captions_file)
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.missing_captions = 0
        self.undecodable_captions: list[Path] = []  # .txt files that are not UTF-8
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(exts):
                    continue
                path = Path(dirpath) / name
                caption = self._read_txt(path.with_suffix(".txt"))
                if not caption:  # no .txt, or an empty or undecodable one
                    caption = jsonl.get(path.relative_to(self.root).as_posix())
                if not caption:
                    self.missing_captions += 1
                    if not keep_uncaptioned:
                        continue
                    caption = ""  # data.uncaptioned=empty: the unconditional branch, as caption dropout
                self.paths.append(path)
                self.captions.append(caption)
        if not self.paths:
            raise NoUsableData(
                f"image folder {str(self.root)!r} has no usable items: no {'/'.join(exts)} file "
                f"with a caption ({self.missing_captions} image(s) lacked a .txt caption or an "
                f"entry in {captions_file})"
            )
        self._sizes: dict[int, tuple[int, int] | None] = {}

    def _read_jsonl(self, path: Path) -> dict[str, str]:
        """Relative path -> caption. Malformed lines are counted (`bad_caption_lines`, the first one's
        number in `first_bad_caption_line`), not fatal; `caption_note` says so."""
        self.captions_file, self.bad_caption_lines, self.first_bad_caption_line = path, 0, 0
        out: dict[str, str] = {}
        if not path.is_file():
            return out
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:  # a line that is not UTF-8 is malformed: decoding it with U+FFFD would train on mojibake
                    rec = json.loads(raw.decode("utf-8"))
                    key = next(rec[k] for k in ("file", "image", "file_name") if k in rec)
                    cap = next(rec[k] for k in ("caption", "text") if k in rec)
                    if not (isinstance(key, str) and isinstance(cap, str)):
                        raise TypeError
                except (ValueError, StopIteration, TypeError):
                    self.bad_caption_lines += 1
                    self.first_bad_caption_line = self.first_bad_caption_line or number
                    continue
                out[Path(os.path.normpath(key)).as_posix()] = cap.strip()
        return out

    @property
    def caption_note(self) -> str | None:
        """What was wrong with the captions, one line per kind (None when nothing was), for the start
        of a run."""
        notes = []
        if self.bad_caption_lines:
            notes.append(
                f"warning: {self.captions_file}: {self.bad_caption_lines} malformed line(s) skipped, the first "
                f'at line {self.first_bad_caption_line} (each line must be a UTF-8 JSON object with a "file", '
                f'"image" or "file_name" string and a "caption" or "text" string)'
            )
        if self.undecodable_captions:
            notes.append(
                f"warning: {len(self.undecodable_captions)} caption file(s) are not UTF-8 text and were not "
                f"used, the first {str(self.undecodable_captions[0])!r} (save them as UTF-8)"
            )
        return "\n".join(notes) or None

    def _read_txt(self, path: Path) -> str | None:
        try:
            return path.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:  # counted and named: U+FFFD in place of the bytes would train on mojibake
            self.undecodable_captions.append(path)
            return None
        except OSError:
            return None

    def __len__(self) -> int:
        return len(self.paths)

    def size(self, i: int) -> tuple[int, int] | None:
        """(height, width) of item i from its header, cached; None if unreadable or too big."""
        if i not in self._sizes:
            self._sizes[i] = read_size(self.paths[i], self.max_pixels)
        return self._sizes[i]

    def load(self, i: int, target: tuple[int, int] | None = None) -> Image.Image | None:
        return load_rgb(self.paths[i], self.max_pixels, target)

    def only(self, keep) -> ImageFolder:
        """The same folder restricted to items `keep` (indices, in the order given): a held-out set, or
        the training set without it. Counts of the walk (missing captions, malformed lines) stay."""
        part = copy.copy(self)
        part.paths = [self.paths[i] for i in keep]
        part.captions = [self.captions[i] for i in keep]
        part._sizes = {}
        return part

    def without(self, paths) -> ImageFolder:
        """The folder less the items at `paths` (what a held-out split takes away from training)."""
        drop = set(paths)
        return self.only([i for i, p in enumerate(self.paths) if p not in drop])


def seeded_split(folder: ImageFolder, count: int, seed: int) -> list[int]:
    """The indices (ascending) of `count` items of `folder` held out by `seed`: those whose hash of
    (seed, path relative to the root) is smallest. It depends on nothing but the seed and the names,
    so every rank and every resumed session holds out the same images; an image added to the folder
    moves at most one other out of the held-out set, instead of reshuffling it whole."""
    if count <= 0:
        return []

    def rank(i: int) -> bytes:
        name = folder.paths[i].relative_to(folder.root).as_posix()
        return hashlib.sha256(f"{seed}:{name}".encode()).digest()

    return sorted(sorted(range(len(folder)), key=rank)[:count])


class FolderBatchSource(BucketedBatchSource):
    """Infinite, deterministic, resumable batches from an ImageFolder, one aspect bucket per batch.

    Epoch e visits a permutation seeded by (seed, e); rank r takes positions r, r + world_size, ...
    of it, so ranks never share an item within an epoch. Each item joins the bucket nearest to its
    aspect ratio; when a bucket holds `batch_size` items they are decoded and emitted (buckets fill
    in stream order, so rare shapes wait, and folders smaller than a batch simply cycle epochs).
    Buckets hold indices, not pixels, so partial buckets cost no memory and fit in `state_dict`.

    An item whose header or pixels cannot be read is dropped, remembered (never retried: a broken
    file stays broken, and re-reading it every epoch wastes I/O) and counted in `skipped`; its
    bucket keeps drawing from the stream until it is full again, so a batch never shrinks.

    Worker processes (`data.workers`, pixelrun/data/loader.py) decode whole batches that this
    object chose, so the batches and the saved position are the same for any number of them.
    """

    def __init__(
        self,
        folder: ImageFolder,
        batch_size: int,
        buckets: list[tuple[int, int]],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        min_side: int = 1,
    ):
        self._init_batching(batch_size, buckets, seed, rank, world_size, min_side)
        if len(folder) < world_size:
            raise ValueError(f"{folder.root}: {len(folder)} item(s) cannot be split over {world_size} ranks")
        self.folder = folder
        self.epoch, self.cursor = 0, 0
        self._bad: set[int] = set()  # item indices

    def _reject(self, i: int, why: str | None = None) -> None:
        self._bad.add(i)
        self._count_skip(str(self.folder.paths[i]) + (f" ({why})" if why else ""))
        if len(self._bad) == len(self.folder):
            raise NoUsableData(
                f"no image under {self.folder.root} could be loaded (first failures: {self.skipped_paths[:5]})"
            )

    def _draw(self) -> None:
        """Move the next item of this rank's stream into its bucket."""
        share = self._epoch_share(self.epoch, len(self.folder))
        if self.cursor >= len(share):
            self.epoch, self.cursor = self.epoch + 1, 0
            share = self._epoch_share(self.epoch, len(self.folder))
        i = int(share[self.cursor])
        self.cursor += 1
        if i in self._bad:
            return
        size = self.folder.size(i)
        if size is None:
            self._reject(i, "unreadable header, or more pixels than the limit")
            return
        small = self._too_small(size)
        if small is not None:
            self._reject(i, small)
            return
        self._enqueue(i, size)

    def _decode(self, i: int, h: int, w: int) -> np.ndarray | None:
        im = self.folder.load(i, target=(h, w))
        return None if im is None else to_array(resize_to_bucket(im, h, w))

    def _usable(self, i: int) -> bool:
        return i not in self._bad

    def _batch(self, idx: list[int], images: list[np.ndarray]) -> Batch:
        return Batch(stack_images(images), [self.folder.captions[i] for i in idx])

    def state_dict(self) -> dict:
        """Position only (plain ints and lists): epoch, cursor, waiting indices per bucket, the
        queue of full buckets and the known-bad items. Loading it into a source built on the same
        folder and settings continues with exactly the batches the original would have produced."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "fill": [list(f) for f in self._fill],
            "ready": list(self._ready),
            "bad": sorted(self._bad),
            "skipped": self.skipped,
            "skipped_paths": list(self.skipped_paths),
            "check": self._check(),
        }

    def _load_position(self, state: dict) -> None:
        saved_n = state["check"].get("n")
        if saved_n != len(self.folder) and {**state["check"], "n": len(self.folder)} == self._check():
            raise ConfigError(
                "data.val_count",
                f"the checkpoint trained on {saved_n} images of {self.folder.root}, {len(self.folder)} train now: "
                f"images were added or removed, or the held-out split changed (data.val_count, or when it is null "
                f"eval.prompts / eval.val_images); set them as they were, or start a new run.dir",
            )
        if state["check"] != self._check():
            raise ValueError(f"state was saved with different settings: {state['check']} vs {self._check()}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._ready = list(map(int, state["ready"]))
        self._bad = set(map(int, state["bad"]))
        self.skipped = int(state["skipped"])
        self.skipped_paths = list(state["skipped_paths"])

    @staticmethod
    def _waiting(fill: list[list[int]]) -> list[list[int]]:
        return [list(map(int, f)) for f in fill]

    def _check(self) -> dict:
        """Settings a saved position is only valid for (a different folder or seed would silently
        reinterpret the indices)."""
        return {
            "n": len(self.folder),
            "batch_size": self.batch_size,
            "buckets": [list(b) for b in self.buckets],
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }
