"""benchmarks/shapes_blur.py: the shapes score of real images blurred by a Gaussian."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from pixelrun.data.shapes import ShapesDataset, caption, render

_BENCH = Path(__file__).parents[2] / "benchmarks"  # shapes_blur puts itself on sys.path for its sibling import
spec = importlib.util.spec_from_file_location("shapes_blur", _BENCH / "shapes_blur.py")
shapes_blur = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shapes_blur)


def test_blur_keeps_flat_colour_and_sigma_zero_is_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert shapes_blur.blur(image, 0) is image
    flat = np.full((16, 16, 3), (220, 30, 30), np.uint8)
    out = shapes_blur.blur(flat, 1.0)
    assert out.dtype == np.uint8 and np.array_equal(out, flat)  # a Gaussian's weights sum to 1
    edge = np.zeros((16, 16, 3), np.uint8)
    edge[:, 8:] = 255
    assert 0 < shapes_blur.blur(edge, 1.0)[0, 7, 0] < 255  # but an edge spreads


def test_a_one_pixel_blur_turns_real_small_triangles_into_circles_and_keeps_the_rest():
    ds = ShapesDataset(seed=0, split="eval", max_shapes=2)
    scenes = [ds.scene(i) for i in range(48)]
    images = np.stack([render(s, 64, 64) for s in scenes])
    captions = [caption(s) for s in scenes]
    r = shapes_blur.blurred_scores(images, captions, [0.0, 1.0])
    assert r["0"]["kind"] == 1.0 and r["0"]["placed"] == 1.0  # real images read perfectly at 64px
    assert "small triangle" in r["1"]["kind by shape"]
    assert r["1"]["kind by shape"]["small triangle"] < 0.2  # the fill of a blurred apex reads round
    assert r["1"]["placed"] == 1.0 and r["1"]["kind by shape"]["small circle"] == 1.0
