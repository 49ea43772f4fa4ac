"""The shapes score of a checkpoint split by the number of shapes a prompt asks for.

A mean over all prompts hides two different failures: one-shape prompts test whether the model
draws what the words say (colour, place, size, kind) and two-shape prompts add binding (which
colour goes with which kind and place). Samples the first N held-out captions of the checkpoint's
shapes data (eval.seed, as `pixelrun eval` does) with `pixelrun sample` and prints one JSON object:
each measure's mean over one-shape prompts, two-shape prompts and all of them, and under
"by shape" every prompted shape's size and kind with what it was drawn as (the kind its colour
reads as, or "absent"), which tells a model that cannot draw small shapes from one that swaps kinds.

    python benchmarks/shapes_by_count.py --checkpoint runs/demo --out /tmp/by-count [--prompts 96] [sample.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pixelrun.config import load_config
from pixelrun.data.shapes import KINDS, SIZES, parse_caption
from pixelrun.evaluation.heldout import held_out_captions
from pixelrun.evaluation.shapes_score import MEASURES, read_shapes, score_image

_GROUP = {1: "one shape", 2: "two shapes"}


def by_count(images: list[np.ndarray], captions: list[str]) -> dict:
    groups: dict[str, list[dict]] = {"one shape": [], "two shapes": [], "all": []}
    for image, text in zip(images, captions):
        s = score_image(image, text)
        n = len(parse_caption(text).shapes)  # the dataset's own parser (data.max_shapes may exceed 2)
        groups.setdefault(_GROUP.get(n, f"{n} shapes"), []).append(s)
        groups["all"].append(s)
    out: dict = {
        name: {"prompts": len(rows), **{m: round(float(np.mean([r[m] for r in rows])), 3) for m in MEASURES}}
        for name, rows in groups.items()
        if rows
    }
    out["by shape"] = by_shape(images, captions)
    return out


def by_shape(images: list[np.ndarray], captions: list[str]) -> dict:
    """{"small square": {"shapes": n, "kind": fraction drawn as a square, "drawn as": counts}, ...}
    over every shape of every prompt, for the sizes and kinds that occur."""
    seen: dict[str, list[str]] = {f"{z} {k}": [] for z in SIZES for k in KINDS}
    for image, text in zip(images, captions):
        for s in read_shapes(image, text)[0]:
            seen[f"{s['shape'].size} {s['shape'].kind}"].append(s["drawn"] or "absent")
    return {
        name: {
            "shapes": len(drawn),
            "kind": round(drawn.count(name.split()[1]) / len(drawn), 3),
            "drawn as": {d: drawn.count(d) for d in (*KINDS, "absent") if d in drawn},
        }
        for name, drawn in seen.items()
        if drawn
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="a new or empty folder for the images")
    p.add_argument("--prompts", type=int, default=96)
    args, overrides = p.parse_known_args()
    cfg = load_config(Path(args.checkpoint) / "config.yaml")  # a run, a checkpoint and an export all hold one
    if cfg.data.source != "shapes":
        sys.exit(f"{args.checkpoint} was trained on data.source={cfg.data.source}, not shapes")
    captions = held_out_captions(cfg, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(captions) + "\n")
        # This interpreter's pixelrun, so an unactivated venv (.venv/bin/python benchmarks/...) works too
        cmd = [
            sys.executable,
            "-m",
            "pixelrun",
            "sample",
            "--checkpoint",
            args.checkpoint,
            "--prompts-file",
            str(prompts),
            "--out",
            args.out,
        ]
        subprocess.run([*cmd, *overrides], check=True, stdout=sys.stderr)  # stdout is the JSON alone
    out = Path(args.out)
    images = [np.asarray(Image.open(out / f"{i:03d}.png").convert("RGB")) for i in range(len(captions))]
    print(json.dumps(by_count(images, captions), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
