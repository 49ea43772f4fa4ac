"""benchmarks/shapes_by_count.py: the shapes score split by the number of shapes a prompt asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from pixelrun.data.shapes import ShapesDataset, caption, render

spec = importlib.util.spec_from_file_location(
    "shapes_by_count", Path(__file__).parents[2] / "benchmarks/shapes_by_count.py"
)
shapes_by_count = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shapes_by_count)


def test_real_images_score_one_in_each_group_and_a_blank_image_counts_where_its_prompt_belongs():
    ds = ShapesDataset(seed=3, split="eval", max_shapes=2)
    scenes = [ds.scene(i) for i in range(12)]
    captions = [caption(s) for s in scenes]
    images = [render(s, 48, 48) for s in scenes]
    two = [i for i, c in enumerate(captions) if " and " in c]
    assert 0 < len(two) < len(captions)  # both groups present
    images[two[0]] = np.full_like(images[two[0]], 7)  # draws nothing: 0 on every measure
    r = shapes_by_count.by_count(images, captions)
    assert r["one shape"] == {"prompts": 12 - len(two), "placed": 1.0, "exact_set": 1.0, "kind": 1.0, "size": 1.0}
    assert r["two shapes"]["prompts"] == len(two)
    assert r["two shapes"]["kind"] == round(1 - 1 / len(two), 3)
    assert r["all"]["placed"] == round(1 - 1 / 12, 3)
