"""Training from WebDataset shards (`data.source=shards`).

A shard is a `.tar` file whose members are grouped into samples by their name before the first
dot: the layout img2dataset writes (`KEY.jpg|.png|.webp`, `KEY.txt`, `KEY.json`) and the one
`pixelrun data convert` writes (the same, plus `KEY.emb.FIELD.npy` caption embeddings; see
pixelrun/data/convert.py). `data.path` names the shards: a local folder of `.tar` files, a brace
pattern (`/d/{00000..00009}.tar`), `http(s)://` URLs or `pipe:` commands, several joined by `::`.

Shards are streams (no random access, possibly remote), so an epoch is the shards in a seeded
order, each read front to back, and ranks split it by whole shards. A position is (epoch, shard,
samples already read from it): resuming re-reads the start of one shard (and of the shards that
still have samples waiting in a bucket) but decodes nothing twice.

`data.captions` chooses the caption of each sample: comma-separated fields with optional weights,
`txt` (the `.txt` member) or `json.NAME` (the string NAME of the `.json` member), for example
`txt:0.3,json.caption_long:0.7`. Weights are relative. Each sample draws one field from a hash of
(seed, epoch, key), so the choice is reproducible and a sample may get another of its captions in
another epoch. A field the sample lacks (or holds empty) is left out of its draw and the weights
of the present ones are renormalised; a sample with none of the fields is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from pixelrun.config import ConfigError, parse_captions
from pixelrun.data import Batch, NoUsableData, ustar
from pixelrun.data.batching import BucketedBatchSource
from pixelrun.data.buckets import resize_to_bucket, stack_images, to_array
from pixelrun.data.folder import DEFAULT_MAX_PIXELS, load_rgb, read_size

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # looked for in this order
INDEX_FILE = "index.json"  # written by `pixelrun data convert` beside the shards
# String fields of img2dataset's .json that are bookkeeping, never captions.
_NOT_CAPTIONS = frozenset({"url", "key", "status", "error_message", "exif", "sha256", "md5"})


# ----------------------------------------------------------------------------- shards and samples


def _local_path(url: str) -> str | None:
    """The filesystem path of a plain path or file: URL; None for anything remote or a pipe."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    if parsed.scheme == "" and not url.startswith("pipe:"):
        return url
    return None


def expand_shards(spec: str) -> list[str]:
    """The shard URLs of a `data.path` spec: a folder's `*.tar` files in name order, or the spec's
    brace / `::` expansion (webdataset's own). Local shards must exist, so a typo fails at start."""
    if os.path.isdir(spec):
        check_finished(Path(spec))
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in the folder {spec}")
        return urls
    urls = expand_urls(spec)
    for url in urls:
        path = _local_path(url)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"shard {url} does not exist (expanded from {spec!r})")
    return urls


PARTIAL_DIR = ".partial"  # where `pixelrun data convert` writes until its output is complete


def check_finished(folder: Path) -> None:
    """Refuse a folder that `pixelrun data convert` did not finish: its `.partial/` is still there
    (it was stopped while writing or while moving the shards into place), or its `index.json` names
    shards that are missing. A folder of shards written by other tools (no index.json) is used as
    it is."""
    if (folder / PARTIAL_DIR).is_dir():
        raise FileNotFoundError(
            f"{folder} holds an unfinished `pixelrun data convert` ({PARTIAL_DIR}/ is still there"
            f"{'' if (folder / INDEX_FILE).is_file() else ' and there is no index.json'}): run "
            f"the same conversion again"
        )
    try:
        listed = json.loads((folder / INDEX_FILE).read_text()).get("shards") or []
    except (OSError, ValueError, AttributeError):
        return
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}/{INDEX_FILE} lists {len(listed)} shards and {len(missing)} of them are "
            f"missing (first: {missing[0]}): convert again, or restore them"
        )


def _reraise(exn: Exception) -> bool:
    raise exn


def read_samples(url: str, handler: Callable[[Exception], bool] = _reraise) -> Iterator[dict]:
    """The samples of one shard in stored order: dicts of member suffix -> bytes plus `__key__` and
    `__url__`, as webdataset's stream opener, tar expander and key grouping make them. `handler`
    decides whether a read error ends the shard quietly (True) or propagates.

    A local plain tar file is read by `ustar` (5-7x faster here, the same samples); at anything it
    does not handle, webdataset reads the shard on from the first sample `ustar` had not given, and
    reports any damage through `handler` as it always did."""
    path = _local_path(url)
    given = 0
    if path is not None:
        try:
            for sample in ustar.samples(path, url):
                yield sample
                given += 1
            return
        except (ustar.NotPlain, OSError):
            pass
    rest = group_by_keys(
        tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler), handler=handler
    )
    for _ in range(given):
        next(rest, None)
    yield from rest


def read_index(urls: list[str]) -> dict | None:
    """The `index.json` that `pixelrun data convert` writes, looked up beside the first shard (a
    local folder or the same http(s) folder); None when there is none, or for `pipe:` specs."""
    first = urls[0]
    if first.startswith("pipe:"):
        return None
    url = first.rsplit("/", 1)[0] + "/" + INDEX_FILE if "/" in first else INDEX_FILE
    path = _local_path(url)
    if path is not None and not os.path.isfile(path):
        return None
    try:
        with gopen(url) as f:
            return json.loads(f.read())
    except Exception:  # no index there (curl's 404, a broken file): the shards still train
        return None


def image_member(sample: dict) -> str | None:
    return next((ext for ext in IMAGE_MEMBERS if ext in sample), None)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def caption_fields(sample: dict) -> dict[str, str]:
    """Every non-empty caption of a sample by field name: `txt`, and `json.NAME` for each string
    value at the top level of its `.json` member (except img2dataset's bookkeeping fields)."""
    out = {}
    if "txt" in sample and _is_utf8(sample["txt"]):  # U+FFFD in place of bad bytes would train on mojibake
        text = sample["txt"].decode("utf-8").strip()
        if text:
            out["txt"] = text
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            out.update(
                {
                    f"json.{k}": v.strip()
                    for k, v in meta.items()
                    if isinstance(v, str) and v.strip() and k not in _NOT_CAPTIONS
                }
            )
    return out


# ----------------------------------------------------------------------------- captions


def _unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from the parts: the same on every machine and Python run (unlike
    hash(), which is salted per process)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_caption(
    available: dict[str, str], fields: list[tuple[str, float]], seed: int, epoch: int, key: str
) -> str | None:
    """The caption field a sample trains with this epoch: a weighted draw among the configured
    fields it has; None if it has none."""
    present = [(f, w) for f, w in fields if f in available]
    if not present:
        return None
    u = _unit_hash(seed, epoch, key) * sum(w for _, w in present)
    for field, weight in present:
        u -= weight
        if u < 0:
            return field
    return present[-1][0]  # u within rounding of the total


# ----------------------------------------------------------------------------- stored embeddings


def embedding_member(field: str) -> str:
    """Member suffix of a caption field's stored embedding (`KEY.emb.txt.npy`)."""
    return f"emb.{field}.npy"


def embedding_match(index: dict | None, fingerprint: str, max_tokens: int) -> tuple[bool, str | None]:
    """Whether the shards' stored caption embeddings can stand in for the configured encoder, and
    the line that tells the user (None when the shards store none). They must come from the same
    encoder and the same max_tokens: a bidirectional encoder's output for a token depends on the
    whole (truncated) caption."""
    stored = (index or {}).get("text_embeddings")
    if not stored:
        return False, None
    if stored["fingerprint"] != fingerprint:
        return False, (
            f"shards: stored text embeddings are for {stored['fingerprint']}, not text.encoder "
            f"{fingerprint}; captions are encoded during training"
        )
    if stored["max_tokens"] != max_tokens:
        return False, (
            f"shards: stored text embeddings use max_tokens {stored['max_tokens']}, not text.max_tokens "
            f"{max_tokens}; captions are encoded during training"
        )
    return True, (
        f"shards: training on the stored text embeddings ({fingerprint}, max_tokens {max_tokens}); "
        f"the text encoder only encodes the empty prompt and the grid prompts"
    )


# How each `--embedding-dtype` is stored in the .npy members: numpy has no bfloat16, so bfloat16
# embeddings are their raw 16-bit patterns as uint16 (index.json names the dtype).
EMBEDDING_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


class StoredEmbeddingError(ConfigError):
    """A stored caption embedding that cannot be used (non-finite values, wrong layout): one line
    naming the sample. Picklable with its key, since a loader worker process may raise it."""

    def __init__(self, name: str, message: str):
        super().__init__("data.path", f"{name}: {message}")
        self.name, self.message = name, message

    def __reduce__(self):
        return type(self), (self.name, self.message)


def stored_embedding_dtype(index: dict | None) -> str:
    """The dtype of the shards' stored embeddings (shards written before it was recorded: float16)."""
    return ((index or {}).get("text_embeddings") or {}).get("dtype", "float16")


def decode_embedding(raw: bytes, dtype: str, name: str) -> torch.Tensor:
    """A stored embedding member -> float32 [tokens, D]. A non-finite value stops training with one
    line naming the sample: a NaN would otherwise spread through every step silently."""
    a = np.load(io.BytesIO(raw), allow_pickle=False)
    if a.ndim != 2 or a.dtype != EMBEDDING_STORAGE[dtype]:
        raise StoredEmbeddingError(
            name,
            f"its stored text embedding is {a.dtype} of shape {list(a.shape)}, not the "
            f"[tokens, dim] {dtype} that index.json describes",
        )
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(a)
    t = t.float()
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise StoredEmbeddingError(
            name,
            f"its stored text embedding has {bad} non-finite value(s) of {t.numel()}; "
            f"convert these shards again (pixelrun data convert refuses such values)",
        )
    return t


def _stored_embedding(sample: dict, available: dict[str, str], field: str) -> bytes | None:
    """The stored embedding of a caption field. `convert` stores a json field whose text equals the
    `txt` caption once, as txt's."""
    raw = sample.get(embedding_member(field))
    if raw is None and field != "txt" and available.get("txt") == available.get(field):
        raw = sample.get(embedding_member("txt"))
    return raw


def _pad_embeddings(arrays: list[torch.Tensor], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trimmed float32 [n_i, D] embeddings -> [B, max_tokens, D] and its mask. The padding rows are
    zeros where the encoder had pad-token outputs; both are masked out of attention, so the model
    sees the same thing."""
    text = torch.zeros(len(arrays), max_tokens, arrays[0].shape[1])
    mask = torch.zeros(len(arrays), max_tokens, dtype=torch.bool)
    for i, a in enumerate(arrays):
        n = min(len(a), max_tokens)
        text[i, :n] = a[:n]
        mask[i, :n] = True
    return text, mask


def resolution_note(index: dict | None, buckets: list[tuple[int, int]]) -> str | None:
    """A line when the shards were converted at another resolution than the one trained at (the
    side of the largest training bucket, which is the square of data.resolution)."""
    stored = (index or {}).get("resolution")
    train = math.isqrt(max(h * w for h, w in buckets))
    if not stored or stored == train:
        return None
    if stored < train:
        return (
            f"shards: converted at {stored}px, below data.resolution {train}: every image is enlarged when read "
            f"(blurry); convert again with --resolution {train}"
        )
    return (
        f"shards: converted at {stored}px, data.resolution is {train}: every image is resized again when read "
        f"(converting with --resolution {train} would read faster)"
    )


def check_caption_fields(index: dict | None, fields: list[tuple[str, float]], captions: str, spec: str) -> None:
    """Refuse, before any work, data.captions whose fields no sample has (when index.json counts the
    caption fields of the samples; shards from elsewhere are checked sample by sample)."""
    counts = (index or {}).get("caption_fields")
    if counts and not any(counts.get(f) for f, _ in fields):
        raise ConfigError(
            "data.captions",
            f"{captions!r}: no sample of {spec} has any of these caption fields; "
            f"they have " + ", ".join(f"{k} ({v})" for k, v in counts.items()),
        )


# ----------------------------------------------------------------------------- the batch source


@dataclass
class _Item:
    """A sample waiting in a bucket: its encoded bytes (small; decoding waits for the batch)."""

    loc: tuple[int, int]  # (shard index, ordinal of the sample in that shard)
    epoch: int  # the epoch it was drawn in (its caption draw depends on it)
    name: str  # url#key, for messages
    image: bytes
    size: tuple[int, int]  # (height, width) from the header
    caption: str
    embedding: bytes | None  # the caption's stored embedding (.npy), when they are in use


class ShardBatchSource(BucketedBatchSource):
    """Infinite, deterministic, resumable batches from WebDataset shards, one aspect bucket per batch.

    Epoch e reads the shards in a permutation seeded by (seed, e); rank r takes positions r,
    r + world_size, ... of it, so ranks never share a sample within an epoch (there must be at
    least as many shards as ranks). Samples join the bucket nearest to their aspect ratio, as in
    FolderBatchSource, and a full bucket is decoded and resized (to the bucket at the configured
    resolution, which shrinks shards written at a higher one) and emitted.

    A broken sample (no image member, image bytes that do not decode, none of the caption fields)
    is dropped, counted in `skipped`, its name kept in `skipped_paths`, and remembered so a later
    epoch does not count it again; its bucket keeps drawing, so a batch never shrinks. A damaged tar
    stream ends that shard and is counted the same way.

    Reading the shards stays in this object, one per rank; worker processes (`data.workers`,
    pixelrun/data/loader.py) decode whole batches from the bytes it read, so no sample is read twice
    and the batches are the same for any number of workers.

    `text_encoder` = (fingerprint, max_tokens) of the configured encoder: when the shards' stored
    caption embeddings match it, batches carry them (`Batch.text`, `Batch.text_mask`) and
    `text_note` says so (or why not).
    """

    def __init__(
        self,
        spec: str,
        batch_size: int,
        buckets: list[tuple[int, int]],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        captions: str = "txt",
        text_encoder: tuple[str, int] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = 1,
    ):
        self._init_batching(batch_size, buckets, seed, rank, world_size, min_side)
        self.spec, self.urls = spec, expand_shards(spec)
        if len(self.urls) < world_size:
            from pixelrun.config import ConfigError

            raise ConfigError(
                "data.path",
                f"{len(self.urls)} shard(s) cannot be split over {world_size} ranks (each "
                f"rank reads whole shards); write more, smaller shards (pixelrun data "
                f"convert --shard-size)",
            )
        self.captions, self.fields = captions, parse_captions(captions)
        self.max_pixels = max_pixels
        index = read_index(self.urls)
        self.count = index.get("count") if isinstance(index, dict) else None  # samples, when convert wrote them
        check_caption_fields(index, self.fields, captions, spec)
        self.use_embeddings, embedding_note = False, None
        self.max_tokens = text_encoder[1] if text_encoder else 0
        self.embedding_dtype = stored_embedding_dtype(index)
        if text_encoder is not None:
            self.use_embeddings, embedding_note = embedding_match(index, *text_encoder)
        # what the run start prints about these shards (sources.make_batch_source says it), one line each
        self.text_note = "\n".join(n for n in (embedding_note, resolution_note(index, self.buckets)) if n) or None
        self.epoch = self.shard_cursor = self.ordinal = 0
        self._good = 0  # usable samples drawn this epoch: an epoch without any means nothing ever will be
        self._stream: Iterator[dict] | None = None
        self._bad: set[tuple[int, int]] = set()  # (shard, ordinal); (shard, -1) = a read error in that shard

    # -- reading

    def _read(self, shard: int) -> Iterator[dict]:
        def on_error(exn: Exception) -> bool:  # a damaged stream ends (or skips part of) this shard only
            self._skip((shard, -1), f"{self.urls[shard]} (read error: {exn.args[0] if exn.args else exn!r})")
            return True

        return read_samples(self.urls[shard], on_error)

    def _next_sample(self) -> tuple[tuple[int, int], dict]:
        """The next sample of this rank's stream and its (shard, ordinal), moving on to the next
        shard and epoch as each ends."""
        while True:
            share = self._epoch_share(self.epoch, len(self.urls))
            if self.shard_cursor >= len(share):
                if self._good == 0:
                    raise NoUsableData(
                        f"no usable sample in this rank's shards of {self.spec} "
                        f"(first failures: {self.skipped_paths[:5]})"
                    )
                self.epoch, self.shard_cursor, self.ordinal, self._good = self.epoch + 1, 0, 0, 0
                continue
            shard = int(share[self.shard_cursor])
            if self._stream is None:
                self._stream = self._read(shard)
                for _ in range(self.ordinal):  # resuming inside this shard: pass what it already gave
                    next(self._stream, None)
            sample = next(self._stream, None)
            if sample is None:
                self.shard_cursor, self.ordinal, self._stream = self.shard_cursor + 1, 0, None
                continue
            self.ordinal += 1
            return (shard, self.ordinal - 1), sample

    def _prepare(self, loc: tuple[int, int], epoch: int, sample: dict) -> _Item | str:
        """A sample ready for its bucket, or why it cannot be used. Only the image header is read."""
        name = f"{sample['__url__']}#{sample['__key__']}"
        ext = image_member(sample)
        if ext is None:
            return f"{name} (no image member)"
        size = read_size(io.BytesIO(sample[ext]), self.max_pixels)
        if size is None:
            return f"{name} (unreadable image)"
        small = self._too_small(size)
        if small is not None:
            return f"{name} ({small})"
        available = caption_fields(sample)
        field = choose_caption(available, self.fields, self.seed, epoch, sample["__key__"])
        if field is None:
            if any(f == "txt" for f, _ in self.fields) and "txt" in sample and not _is_utf8(sample["txt"]):
                return f"{name} (its txt caption is not UTF-8 text)"
            return f"{name} (none of the caption fields {self.captions})"
        embedding = _stored_embedding(sample, available, field) if self.use_embeddings else None
        return _Item(loc, epoch, name, sample[ext], size, available[field], embedding)

    def _skip(self, loc: tuple[int, int], what: str) -> None:
        if loc in self._bad:
            return
        self._bad.add(loc)
        self._count_skip(what)

    def _draw(self) -> None:
        """Move the next usable sample of this rank's stream into its bucket."""
        loc, sample = self._next_sample()
        if loc in self._bad:
            return
        item = self._prepare(loc, self.epoch, sample)
        if isinstance(item, str):
            self._skip(loc, item)
            return
        self._good += 1
        self._enqueue(item, item.size)

    # -- batches
    def _decode(self, item: _Item, h: int, w: int) -> np.ndarray | None:
        im = load_rgb(io.BytesIO(item.image), self.max_pixels, target=(h, w))
        return None if im is None else to_array(resize_to_bucket(im, h, w))

    def _batch(self, items: list[_Item], images: list[np.ndarray]) -> Batch:
        text = mask = None
        stored = [it.embedding for it in items if it.embedding is not None]
        if self.use_embeddings and len(stored) == len(items):
            text, mask = _pad_embeddings(
                [decode_embedding(e, self.embedding_dtype, it.name) for e, it in zip(stored, items)], self.max_tokens
            )
        return Batch(stack_images(images), [it.caption for it in items], text, mask)

    def _reject(self, item: _Item) -> None:
        self._skip(item.loc, f"{item.name} (image does not decode)")

    def _usable(self, item: _Item) -> bool:
        return item.loc not in self._bad

    def preview_captions(self, n: int) -> list[str]:
        """The first n usable captions of the dataset in shard order (the same on every rank; for
        the sample grids)."""
        out: list[str] = []
        for shard in range(len(self.urls)):
            for ordinal, sample in enumerate(read_samples(self.urls[shard], lambda exn: True)):
                if len(out) >= n:
                    return out
                item = self._prepare((shard, ordinal), 0, sample)
                if not isinstance(item, str):
                    out.append(item.caption)
        return out

    # -- position
    def state_dict(self) -> dict:
        """Position only (plain ints and lists): the stream position, each waiting sample as
        [shard, ordinal, epoch], the queue of full buckets and the known-bad samples."""
        return {
            "epoch": self.epoch,
            "shard_cursor": self.shard_cursor,
            "ordinal": self.ordinal,
            "good": self._good,
            "fill": [[[*it.loc, it.epoch] for it in f] for f in self._fill],
            "ready": list(self._ready),
            "bad": sorted(list(b) for b in self._bad),
            "skipped": self.skipped,
            "skipped_paths": list(self.skipped_paths),
            "check": self._check(),
        }

    def _load_position(self, state: dict) -> None:
        if state["check"] != self._check():
            raise ValueError(f"state was saved with different settings: {state['check']} vs {self._check()}")
        self.epoch, self.shard_cursor = int(state["epoch"]), int(state["shard_cursor"])
        self.ordinal, self._good = int(state["ordinal"]), int(state["good"])
        self._stream = None  # reopened at (shard_cursor, ordinal) by the next draw
        self._ready = list(map(int, state["ready"]))
        self._bad = {(int(s), int(o)) for s, o in state["bad"]}
        self.skipped, self.skipped_paths = int(state["skipped"]), list(state["skipped_paths"])

    def __getstate__(self) -> dict:
        """A copy for a worker process started by spawn or forkserver: the open tar stream stays here."""
        return {**self.__dict__, "_stream": None}

    def _waiting(self, fill: list[list[list[int]]]) -> list[list[_Item]]:
        """The waiting samples' bytes, which a position does not hold: each shard that has some is
        read again up to the last one needed."""
        wanted: dict[int, dict[int, int]] = {}  # shard -> {ordinal: epoch}
        for bucket in fill:
            for shard, ordinal, epoch in bucket:
                wanted.setdefault(int(shard), {})[int(ordinal)] = int(epoch)
        found: dict[tuple[int, int], _Item | str] = {}
        for shard, ordinals in wanted.items():
            last = max(ordinals)
            for ordinal, sample in enumerate(self._read(shard)):
                if ordinal in ordinals:
                    found[(shard, ordinal)] = self._prepare((shard, ordinal), ordinals[ordinal], sample)
                if ordinal == last:
                    break
        out = []
        for bucket in fill:
            got = [found.get((int(s), int(o))) for s, o, _ in bucket]
            items = [it for it in got if isinstance(it, _Item)]
            if len(items) < len(got):
                raise ValueError(f"the shards of {self.spec} changed since this position was saved")
            out.append(items)
        return out

    def _check(self) -> dict:
        """Settings a saved position is only valid for (not the shards' location: a dataset may move)."""
        return {
            "shards": len(self.urls),
            "batch_size": self.batch_size,
            "buckets": [list(b) for b in self.buckets],
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "captions": self.captions,
        }
