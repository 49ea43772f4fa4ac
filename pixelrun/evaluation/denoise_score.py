"""The shapes score of what a model draws *from held-out images* noised to a few levels: it says
where a blob comes from, in numbers, as samples/denoise.png does in pictures.

A sample's kind can be lost at two places. If the kind is low already from t = 0.05, the model
cannot draw the kind even when the image it is shown is nearly clean: the patch decoder has not
learnt what is inside a patch, and no sampler will fix that. If it is high at low noise and falls
by t = 0.5, with the samples' kind lower still, the model redraws what it is shown but does not
decide the kind from the caption while the image is mostly noise. (The CPU recipe's 2,000-step
checkpoint, docs/evaluation.md: kind 0.61 from t = 0.05, 0.45 from t = 0.5, 0.30 from pure noise.)

Each prediction is the conditional x-prediction (no guidance) from one fixed noise draw, as
:func:`pixelrun.diffusion.denoise.denoise_rows` makes it for the grid."""

from __future__ import annotations

import numpy as np

from pixelrun.config import Config
from pixelrun.diffusion.denoise import denoise_rows
from pixelrun.evaluation.heldout import real_images_and_prompts
from pixelrun.evaluation.shapes_score import score_images

DENOISE_SCORE_TIMES = (0.05, 0.2, 0.5)
CHUNK = 32  # images a forward pass: the held-out set may be hundreds


def denoise_scores(
    model, encoder, cfg: Config, device, *, n: int, seed: int, times=DENOISE_SCORE_TIMES, compute: bool = True
) -> dict[str, dict] | None:
    """``{"0.05": shapes score, ...}``: the shapes score of the model's predictions from the first
    ``n`` held-out images noised to each time, against the images' own captions. Chunk k of CHUNK
    images draws its noise from ``seed + k``. Every rank predicts (a sharded model's forward is
    collective); only where ``compute`` is the result scored, elsewhere None."""
    images, captions = real_images_and_prompts(cfg, n)
    was_training = model.training
    model.eval()
    try:
        predictions = np.concatenate(
            [
                denoise_rows(
                    model,
                    encoder,
                    images[k : k + CHUNK],
                    captions[k : k + CHUNK],
                    cfg,
                    device,
                    seed=seed + k // CHUNK,
                    times=times,
                )[:, 1:]
                for k in range(0, len(captions), CHUNK)
            ]
        )
    finally:
        model.train(was_training)
    if not compute:
        return None
    return {f"{t:g}": score_images(list(predictions[:, i]), captions) for i, t in enumerate(times)}


def describe_denoise(scores: dict[str, dict], sampled: dict | None = None) -> str:
    """One line: "drawn from held-out images noised to t = 0.05 / 0.2 / 0.5: kind 0.598 / 0.551 /
    0.461, placed 1.000 / 1.000 / 0.965 (from pure noise: kind 0.301, placed 0.562)"."""

    def each(name: str) -> str:
        return f"{name} " + " / ".join(f"{s[name]:.3f}" for s in scores.values())

    line = f"drawn from held-out images noised to t = {' / '.join(scores)}: {each('kind')}, {each('placed')}"
    if sampled:
        line += f" (from pure noise: kind {sampled['kind']:.3f}, placed {sampled['placed']:.3f})"
    return line
