"""samples/denoise.png: each held-out image, then the model's x-prediction from it at each noise level."""

import json

import numpy as np
import torch
from PIL import Image

from pixelrun.config import Config
from pixelrun.diffusion.denoise import denoise_rows, save_denoise_grid
from pixelrun.model.denoiser import ModelOutput


class Echo(torch.nn.Module):
    """Predicts its noisy input: the rows then show the noising itself."""

    def forward(self, x, t, text, mask=None, routing=None, return_features=()):
        return ModelOutput(x, {})


class Encoder:
    def encode(self, captions):
        return torch.zeros(len(captions), 2, 4), torch.ones(len(captions), 2, dtype=torch.bool)


def test_rows_are_the_real_image_then_the_prediction_from_it_noised_to_each_time():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    cfg = Config()
    cfg.objective.noise_scale = 2.0
    rows = denoise_rows(Echo(), Encoder(), images, ["a", "b"], cfg, "cpu", seed=5, times=(0.25, 1.0))
    assert rows.shape == (2, 3, 8, 8, 3) and rows.dtype == np.uint8
    assert (rows[:, 0] == images).all()
    # by hand: x in [-1, 1], x_t = (1 - t) x + t * 2 * eps with eps the sampler's starting noise for seed 5
    x = images.astype(np.float64) / 127.5 - 1
    eps = torch.Generator().manual_seed(5)
    eps = torch.randn((2, 3, 8, 8), generator=eps).permute(0, 2, 3, 1).numpy().astype(np.float64)
    for k, t in enumerate((0.25, 1.0), start=1):
        want = np.round((np.clip((1 - t) * x + t * 2.0 * eps, -1, 1) + 1) * 127.5)
        assert np.abs(rows[:, k].astype(np.float64) - want).max() <= 1  # float32 rounding at .5


def test_grid_puts_each_image_on_a_row_with_its_caption_then_the_noise_levels(tmp_path):
    rows = np.zeros((2, 3, 8, 8, 3), np.uint8)
    path = save_denoise_grid(rows, ["first", "second"], tmp_path / "denoise.png", times=(0.2, 0.6))
    with Image.open(path) as im:
        labels = json.loads(im.info["captions"])
        assert im.width > im.height / 2  # three columns, two rows
    assert labels == [
        "first",
        "predicted from t = 0.2",
        "predicted from t = 0.6",
        "second",
        "predicted from t = 0.2",
        "predicted from t = 0.6",
    ]
