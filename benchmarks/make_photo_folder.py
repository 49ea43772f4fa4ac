"""Write a folder of photo-sized JPEGs with captions, for the loader benchmark.

No real photo collection ships with this repository, so the images are synthetic but sized and
compressed like web photos: smooth colour fields (upsampled low-resolution noise) plus fine grain,
at 1.5-3 megapixels and the aspect ratios of common cameras, JPEG quality 90. Pure noise would
compress (and decode) far worse than a photo; a flat colour far better; this sits in between, at
roughly 150-400 KB per image like a typical web photo.

    python benchmarks/make_photo_folder.py OUT_DIR [--n 256] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZES = [(1600, 1200), (1200, 1600), (1920, 1080), (1080, 1920), (1500, 1500), (2048, 1365)]  # (width, height)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    detail = rng.normal(0, 1, size=(height // 8, width // 8, 3))
    detail = Image.fromarray(np.clip(128 + 40 * detail, 0, 255).astype(np.uint8), "RGB")
    detail = detail.resize((width, height), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    grain = rng.normal(0, 2, size=(height, width, 1))
    a = 0.75 * np.asarray(base, np.float32) + 0.25 * np.asarray(detail, np.float32) + grain
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.n):
        w, h = SIZES[i % len(SIZES)]
        photo_like(rng, w, h).save(out / f"{i:06d}.jpg", quality=90)
        (out / f"{i:06d}.txt").write_text(f"synthetic photo number {i}, {w}x{h}\n")
    total = sum(p.stat().st_size for p in out.glob("*.jpg"))
    print(f"{args.n} images in {out}, {total / args.n / 1024:.0f} KB each on average")


if __name__ == "__main__":
    main()
