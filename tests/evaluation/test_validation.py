"""Validation loss by noise level (pixelrun/evaluation/validation.py): fixed numbers, one bin recomputed by hand
from the held-out images, an exact prediction scoring 0, and the same numbers from an FSDP2-sharded
model on 2 gloo ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import free_port, gloo_rank, tiny_overrides

from pixelrun.config import load_config
from pixelrun.evaluation.validation import BINS, ValidationLoss, bin_noise, bin_times
from pixelrun.model.denoiser import ModelOutput

KEYS = ["val/flow/low", "val/flow/mid", "val/flow/high"]


def _config(tmp_path, encoder_dir, **extra):
    return load_config(
        None, tiny_overrides(tmp_path / "run", encoder_dir, **{"eval.val_images": 6, "train.batch_size": 4, **extra})
    )


def _model(cfg, text_dim):
    """The configured denoiser with its zero-initialised output layers randomised, so x_hat != 0."""
    from pixelrun.model.denoiser import model_from_config

    torch.manual_seed(3)
    model = model_from_config(cfg, text_dim)
    for lin in (model.final_layer.linear, model.final_layer.adaLN_modulation[1]):
        torch.nn.init.normal_(lin.weight, std=0.05)
    return model


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    from pixelrun.model.text import TextEncoder

    return TextEncoder(tiny_encoder_dir, 16, device="cpu")


def test_bins_are_as_written_and_the_numbers_are_fixed(tmp_path, tiny_encoder_dir, encoder):
    assert [(name, lo, hi) for name, lo, hi in BINS] == [("low", 0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("high", 2 / 3, 1)]
    times = bin_times(6, seed=0)
    for name, lo, hi in BINS:  # the six midpoints of each bin, in some fixed order
        np.testing.assert_allclose(sorted(times[name].tolist()), lo + (hi - lo) * (np.arange(6) + 0.5) / 6, atol=1e-7)
    assert not torch.equal(times["low"].argsort(), times["mid"].argsort())  # no image always the least noisy
    cfg = _config(tmp_path, tiny_encoder_dir)
    model = _model(cfg, encoder.dim)
    model.train()
    val = ValidationLoss(cfg, encoder, "cpu")
    first = val(model)
    assert list(first) == KEYS and all(np.isfinite(v) and v > 0 for v in first.values())
    assert val(model) == first and model.training  # same numbers; the model's mode restored
    assert ValidationLoss(cfg, encoder, "cpu")(model) == first  # a new run (a resume) gets them too
    assert list(val(model, prefix="val_ema")) == [k.replace("val/", "val_ema/") for k in KEYS]


def test_one_bin_by_hand_with_velocity_loss(tmp_path, tiny_encoder_dir, encoder):
    from pixelrun.diffusion.objective import velocity_loss
    from pixelrun.evaluation.heldout import real_images_and_prompts

    cfg = _config(tmp_path, tiny_encoder_dir, **{"objective.noise_scale": 2.0})
    model = _model(cfg, encoder.dim).eval()
    got = ValidationLoss(cfg, encoder, "cpu")(model)  # chunks of 4 + 2
    images, captions = real_images_and_prompts(cfg, 6)  # the shapes "eval" split, first 6
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    t = bin_times(6, cfg.seed)["mid"]
    assert ((t >= 1 / 3) & (t < 2 / 3)).all()
    eps = bin_noise(cfg.seed, 1, range(6), (3, 32, 32), "cpu")
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * 2.0 * eps
    text, mask = encoder.encode(captions)
    with torch.no_grad():  # all six at once
        x_hat = model(x_t, t, text, mask).prediction
    expected = velocity_loss(x_hat, x, x_t, t, cfg.objective.t_clamp).item()
    assert got["val/flow/mid"] == pytest.approx(expected, rel=1e-5)
    assert got["val/flow/low"] != pytest.approx(expected, rel=1e-3)  # the bins differ


class _Oracle(torch.nn.Module):
    """Predicts the clean image exactly: it is handed the held-out images and follows the order the
    rows come in (bin by bin, images in held-out order)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x, self.cursor = x, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, text, text_mask=None, **kwargs):
        out = self.x[self.cursor : self.cursor + x_t.shape[0]]
        self.cursor = (self.cursor + x_t.shape[0]) % self.x.shape[0]
        assert out.shape == x_t.shape
        return ModelOutput(out, {})


def test_exact_prediction_scores_zero(tmp_path, tiny_encoder_dir, encoder):
    from pixelrun.evaluation.heldout import real_images_and_prompts

    cfg = _config(tmp_path, tiny_encoder_dir)
    images, _ = real_images_and_prompts(cfg, 6)
    oracle = _Oracle(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert ValidationLoss(cfg, encoder, "cpu")(oracle) == dict.fromkeys(KEYS, 0.0)


def test_a_held_out_set_smaller_than_val_images_lends_all_it_has(tmp_path, tiny_encoder_dir, encoder):
    """The 64 held-out emoji for eval.val_images=65 (a small image folder likewise: the default 32
    must not stop a run on a folder of 10 images)."""
    val = ValidationLoss(
        _config(tmp_path, tiny_encoder_dir, **{"data.source": "emoji", "eval.val_images": 65}), encoder, "cpu"
    )
    assert val.n == 64 and len(val.batch(val.cfg)[3]) == 64


class _Encoded:
    """The tiny encoder's embeddings of the held-out captions, computed in the parent process, so the
    ranks need not load transformers (seconds each on this machine)."""

    def __init__(self, encoder, captions: list[str]):
        self.dim, self.table = encoder.dim, dict(zip(captions, zip(*encoder.encode(captions))))

    def encode(self, captions):
        text, mask = zip(*(self.table[c] for c in captions))
        return torch.stack(text), torch.stack(mask)


def _rank(rank: int, world: int, port: int, cfg_overrides: list[str], encoder: _Encoded, weights: str, out: str):
    from torch.distributed.fsdp import fully_shard

    with gloo_rank(rank, world, port):
        cfg = load_config(None, cfg_overrides)
        model = _model(cfg, encoder.dim)
        model.load_state_dict(torch.load(weights, weights_only=True))
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        values = ValidationLoss(cfg, encoder, "cpu")(model)
        from torch.distributed.tensor import DTensor

        # FSDP2 leaves the root gathered after a forward; validation must leave shards behind
        values["left_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        with open(f"{out}.{rank}", "w") as f:
            json.dump(values, f)


def test_fsdp2_sharded_model_on_two_ranks_gives_the_same_numbers(tmp_path, tiny_encoder_dir, encoder):
    overrides = tiny_overrides(tmp_path / "run", tiny_encoder_dir, **{"eval.val_images": 6, "train.batch_size": 4})
    cfg = load_config(None, overrides)
    model = _model(cfg, encoder.dim)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    val = ValidationLoss(cfg, encoder, "cpu")
    single = val(model)
    encoded = _Encoded(encoder, val.batch(cfg)[3])
    torch.multiprocessing.spawn(
        _rank,
        args=(2, free_port(), overrides, encoded, str(tmp_path / "weights.pt"), str(tmp_path / "values")),
        nprocs=2,
    )
    ranks = [json.loads((tmp_path / f"values.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ran the same rows through the same gathered weights
    assert ranks[0]["left_sharded"]
    for k in KEYS:
        assert ranks[0][k] == pytest.approx(single[k], rel=1e-5), k
