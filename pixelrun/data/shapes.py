"""The built-in procedural "shapes" text-to-image dataset (spec: docs/recipe.md).

It needs no download, exercises every part of text conditioning (colour, kind, size, position,
count) and renders with exact, documented geometry so that `pixelrun.evaluation.shapes_score` can grade a
generated image against the caption it was prompted with. Every sample is a pure function of
(seed, split, index), so runs, ranks and resumptions all see the same data.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pixelrun.data import CountedBatchSource
from pixelrun.data.buckets import to_tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.28}  # d as a fraction of the shorter side
CELLS: list[str] = [  # row-major: index = row * 3 + col
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
]
JITTER = 0.03  # max centre offset per axis, as a fraction of the shorter side
OTHER_DISTANCE = 80.0  # pixels farther than this from every palette colour are "other"
_SUPERSAMPLE = 4  # coverage samples per pixel per axis for anti-aliased edges


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    size: str
    cell: int  # 0..8, row-major


@dataclass(frozen=True)
class SceneSpec:
    shapes: tuple[ShapeSpec, ...]
    background: str
    jitter: tuple[tuple[float, float], ...] = ()  # (dx, dy) per shape, fractions of the shorter side


def _rng(*key: int | str) -> np.random.Generator:
    """A generator keyed by ints and strings. Python's `hash()` is salted per process, so strings
    go through crc32 instead; the result is identical across processes, machines and versions."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % 2**63 for k in key]
    return np.random.default_rng(np.random.SeedSequence(ints))


def sample_scene(seed: int, split: str, index: int, max_shapes: int = 2) -> SceneSpec:
    """Sample `index` of a split. Distinct colours keep the score unambiguous (one component per
    colour); distinct cells keep shapes from overlapping."""
    if not 1 <= max_shapes <= len(COLOURS):
        raise ValueError(f"max_shapes must be in 1..{len(COLOURS)}, got {max_shapes}")
    rng = _rng(seed, split, index)
    n = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(9, n, replace=False)
    colours = rng.choice(len(COLOURS), n, replace=False)
    kinds = rng.integers(len(KINDS), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    jitter = rng.uniform(-JITTER, JITTER, size=(n, 2))
    shapes = tuple(
        ShapeSpec(KINDS[k], list(COLOURS)[c], list(SIZES)[s], int(cell))
        for k, c, s, cell in zip(kinds, colours, sizes, cells)
    )
    return SceneSpec(shapes, background, tuple((float(dx), float(dy)) for dx, dy in jitter))


def caption(scene: SceneSpec) -> str:
    parts = [f"a {s.size} {s.colour} {s.kind} {CELLS[s.cell]}" for s in scene.shapes]
    return " and ".join(parts) + f" on a {scene.background} background"


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_SHAPE_RE = re.compile(rf"a ({_alt(SIZES)}) ({_alt(COLOURS)}) ({_alt(KINDS)}) ({_alt(CELLS)})")
_CAPTION_RE = re.compile(rf"(.+) on a ({_alt(BACKGROUNDS)}) background")


def parse_caption(text: str) -> SceneSpec:
    """Inverse of `caption` (jitter is not in the text, so it comes back empty = centred).
    Strict on purpose: the scorer must never grade an image against a misread prompt."""
    m = _CAPTION_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a shapes caption (expected '... on a <background> background'): {text!r}")
    shapes = []
    for part in m.group(1).split(" and "):
        sm = _SHAPE_RE.fullmatch(part)
        if not sm:
            raise ValueError(f"not a shapes caption: {part!r} is not 'a <size> <colour> <kind> <position>' in {text!r}")
        size, colour, kind, position = sm.groups()
        shapes.append(ShapeSpec(kind, colour, size, CELLS.index(position)))
    if len({s.colour for s in shapes}) < len(shapes) or len({s.cell for s in shapes}) < len(shapes):
        raise ValueError(f"not a shapes caption: colours and cells must be distinct in {text!r}")
    return SceneSpec(tuple(shapes), m.group(2))


def classify_pixels(image: np.ndarray, background: str) -> np.ndarray:
    """Per-pixel colour class: 0..5 = COLOURS order, 6 = the background, 7 = "other" (farther
    than OTHER_DISTANCE from all). Shared by the scorer and the renderer's edge check."""
    palette = np.array(list(COLOURS.values()) + [BACKGROUNDS[background]], np.float32)
    dist = np.linalg.norm(image[..., None, :].astype(np.float32) - palette, axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > OTHER_DISTANCE] = len(palette)
    return labels


def _inside(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, d: float) -> np.ndarray:
    """Exact point-in-shape test in continuous image coordinates (pixel (i, j) spans
    [j, j+1] x [i, i+1]); the triangle's bounding box is centred on (cx, cy)."""
    u, v = x - cx, y - cy
    if kind == "circle":
        return u * u + v * v <= (d / 2) ** 2
    if kind == "square":
        return (np.abs(u) <= d / 2) & (np.abs(v) <= d / 2)
    # upright isosceles: apex (0, -d/2), base from (-d/2, d/2) to (d/2, d/2); half-width grows d/2 per d
    return (v <= d / 2) & (np.abs(u) <= (v + d / 2) / 2)


def render(scene: SceneSpec, height: int, width: int) -> np.ndarray:
    """Draw a scene as uint8 [H, W, 3] with the exact geometry of docs/recipe.md.

    Edges are anti-aliased by 4x4 supersampled coverage, but an edge pixel whose blend would be
    read as a *third* named colour (orange on white blends into "yellow", yellow on black into
    "orange") is snapped to fully in or out: otherwise a straight edge becomes a line of
    false-colour pixels, which is label noise for training and a phantom shape for the score.
    """
    side = min(height, width)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    img = np.broadcast_to(bg, (height, width, 3)).copy()
    jitter = scene.jitter or ((0.0, 0.0),) * len(scene.shapes)
    offs = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    colour_ids = list(COLOURS)
    for shape, (dx, dy) in zip(scene.shapes, jitter):
        d = SIZES[shape.size] * side
        row, col = divmod(shape.cell, 3)
        cx, cy = (col + 0.5) * width / 3 + dx * side, (row + 0.5) * height / 3 + dy * side
        x0, x1 = max(int(np.floor(cx - d / 2)), 0), min(int(np.ceil(cx + d / 2)), width)
        y0, y1 = max(int(np.floor(cy - d / 2)), 0), min(int(np.ceil(cy + d / 2)), height)
        xs = (np.arange(x0, x1)[:, None] + offs).reshape(-1)
        ys = (np.arange(y0, y1)[:, None] + offs).reshape(-1)
        hit = _inside(shape.kind, xs[None, :], ys[:, None], cx, cy, d)
        cov = hit.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean((1, 3))[..., None]
        under = img[y0:y1, x0:x1]
        colour = np.array(COLOURS[shape.colour], np.float32)
        blend = cov * colour + (1 - cov) * under
        label = classify_pixels(np.round(blend), scene.background)
        ok = np.isin(label, [colour_ids.index(shape.colour), 6, 7])
        ok |= classify_pixels(np.round(under), scene.background) == label
        cov = np.where(ok[..., None], cov, np.round(cov))
        img[y0:y1, x0:x1] = cov * colour + (1 - cov) * under
    return np.round(img).astype(np.uint8)


class ShapesDataset:
    """Random-access view of one split; sample i is the same image at any size."""

    def __init__(self, seed: int = 0, split: str = "train", max_shapes: int = 2):
        self.seed, self.split, self.max_shapes = seed, split, max_shapes

    def scene(self, index: int) -> SceneSpec:
        return sample_scene(self.seed, self.split, index, self.max_shapes)

    def item(self, index: int, height: int, width: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_tensor(render(scene, height, width)), caption(scene)


class ShapesBatchSource(CountedBatchSource):
    """Infinite, deterministic, resumable batches for (distributed) training.

    Global batch k on rank r holds samples (k * world_size + r) * B ... + B - 1, so ranks never
    share a sample and the whole stream is a function of (seed, split, k): restoring
    `next_batch` resumes exactly, with no RNG state to save. With several (height, width)
    buckets, batch k's bucket is drawn from (seed, k), so all ranks use the same size in step k.
    """

    dataset: ShapesDataset

    def __init__(
        self,
        seed: int,
        split: str,
        batch_size: int,
        sizes: list[tuple[int, int]],
        max_shapes: int = 2,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not sizes:
            raise ValueError("sizes needs at least one (height, width) bucket")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset = ShapesDataset(seed, split, max_shapes)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.next_batch = 0

    def indices(self, k: int) -> range:
        start = (k * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def bucket(self, k: int) -> tuple[int, int]:
        if len(self.sizes) == 1:
            return self.sizes[0]
        return self.sizes[int(_rng(self.dataset.seed, self.dataset.split, "bucket", k).integers(len(self.sizes)))]


def fixed_prompts(n: int, seed: int = 1234, max_shapes: int = 2) -> list[str]:
    """The same n held-out ("eval" split) captions every time, for sample grids and the score."""
    return [caption(sample_scene(seed, "eval", i, max_shapes)) for i in range(n)]
