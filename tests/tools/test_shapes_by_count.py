"""benchmarks/shapes_by_count.py: the shapes score split by the number of shapes a prompt asks for."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np

from pixelrun.data.shapes import SceneSpec, ShapesDataset, ShapeSpec, caption, render

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


def test_by_shape_names_what_each_prompted_shape_was_drawn_as():
    # A small square drawn as a circle of the same colour, size and cell, and a large triangle
    # drawn correctly: the square counts once as "drawn as circle", the triangle as itself.
    square = ShapeSpec("square", "red", "small", 0)
    triangle = ShapeSpec("triangle", "blue", "large", 8)
    prompt = SceneSpec((square, triangle), "white")
    drawn = SceneSpec((replace(square, kind="circle"), triangle), "white")
    blank = np.full((48, 48, 3), 255, np.uint8)  # the same prompt, nothing drawn
    r = shapes_by_count.by_count([render(drawn, 48, 48), blank], [caption(prompt)] * 2)["by shape"]
    assert r == {
        "small square": {"shapes": 2, "kind": 0.0, "drawn as": {"circle": 1, "absent": 1}},
        "large triangle": {"shapes": 2, "kind": 0.5, "drawn as": {"triangle": 1, "absent": 1}},
    }
