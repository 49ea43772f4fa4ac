"""How sharp a drawing the shapes score's kind reading needs: the score of real held-out images
blurred by a Gaussian of each sigma (in pixels), overall and by prompted size and kind.

The kind is read from a shape's fill ratio (area / bounding box), nearest of circle pi/4, square 1
and triangle 1/2. A small triangle at 48px is 7.7 px across and its anti-aliased fill already sits
near the triangle/circle midpoint (0.64), so a blur too slight to see can turn it into a "circle".
This says how much of a model's kind score is the drawing's sharpness rather than its shape.

    python benchmarks/shapes_blur.py [--resolution 48] [--prompts 256] [--sigmas 0,0.3,0.5,0.7,1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is scripts, not a package
from shapes_by_count import by_shape  # noqa: E402

from pixelrun.config import Config  # noqa: E402
from pixelrun.evaluation.heldout import real_images_and_prompts  # noqa: E402
from pixelrun.evaluation.shapes_score import score_images  # noqa: E402


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 image blurred in space (not across channels), rounded back to uint8; sigma 0 = itself."""
    if sigma == 0:
        return image
    out = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def blurred_scores(images: np.ndarray, captions: list[str], sigmas: list[float]) -> dict:
    """{"0.5": {"placed": ..., "kind": ..., "size": ..., "kind by shape": {"small triangle": ...}}}"""
    out = {}
    for sigma in sigmas:
        b = [blur(im, sigma) for im in images]
        s = score_images(b, captions)
        out[f"{sigma:g}"] = {
            **{m: round(s[m], 3) for m in ("placed", "kind", "size")},
            "kind by shape": {name: v["kind"] for name, v in by_shape(b, captions).items()},
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=48)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--sigmas", default="0,0.3,0.5,0.7,1", help="comma list of Gaussian sigmas in pixels")
    args = p.parse_args()
    cfg = Config()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=args.resolution))
    images, captions = real_images_and_prompts(cfg, args.prompts)  # the held-out split pixelrun eval scores
    sigmas = [float(s) for s in args.sigmas.split(",")]
    print(json.dumps(blurred_scores(images, captions, sigmas), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
