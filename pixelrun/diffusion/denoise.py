"""What the model predicts from a real image at several noise levels: the picture that says *where*
a model fails. A sample grid shows only the end of a trajectory; blobs there can come from a model
that cannot draw sharp details at low noise, or from one that denoises well at low noise but whose
predictions at mid and high noise ignore what the prompt says (the shapes' kind, say), so the
trajectory has committed to a ragged blob before the details are drawn.
Each row of `samples/denoise.png` is one held-out image and its caption, then the conditional
x-prediction (no guidance) from that image noised to each of DENOISE_TIMES with one fixed draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixelrun.config import Config
from pixelrun.diffusion.objective import add_noise
from pixelrun.diffusion.sampling import initial_noise, to_uint8
from pixelrun.infra.grids import save_grid
from pixelrun.infra.precision import autocast_dtype

DENOISE_TIMES = (0.2, 0.4, 0.6, 0.8)
DENOISE_IMAGES = 8  # rows of samples/denoise.png


@torch.no_grad()
def denoise_rows(
    model, encoder, images: np.ndarray, captions: list[str], cfg: Config, device, *, seed: int, times=DENOISE_TIMES
) -> np.ndarray:
    """uint8 [B, 1 + len(times), H, W, 3]: each real uint8 image [B, H, W, 3], then the model's
    conditional x-prediction from it noised to each time (x_t = (1 - t) x + t * noise_scale * eps,
    one eps per image, drawn from `seed` as the sampler draws its starting noise)."""
    b, h, w, _ = images.shape
    # [-1, 1] as pixelrun.data.to_model_range gives it (data is a layer above this one)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    eps = initial_noise(b, h, w, seed).to(device)
    text, mask = (a.to(device) for a in encoder.encode(captions))
    amp = autocast_dtype(cfg, torch.device(device))
    rows = [images]
    for t in times:
        tt = torch.full((b,), float(t), device=device)
        x_t = add_noise(x, eps, tt, cfg.objective.noise_scale)
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            x_hat = model(x_t, tt, text, mask).prediction.float()
        rows.append(to_uint8(x_hat))
    return np.stack(rows, axis=1)


def save_denoise_grid(rows: np.ndarray, captions: list[str], path: str | Path, times=DENOISE_TIMES) -> Path:
    """One row per image: the real image under its caption, then each prediction under its noise level."""
    b, k = rows.shape[:2]
    labels = [label for caption in captions for label in [caption, *(f"predicted from t = {t:g}" for t in times)]]
    return save_grid(rows.reshape(b * k, *rows.shape[2:]), labels, path, tile=96, columns=k)
