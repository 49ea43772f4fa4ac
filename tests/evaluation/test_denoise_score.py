"""The shapes score of predictions from held-out images (pixelrun/evaluation/denoise_score.py),
checked with models whose answer is known without the code under test: one that returns its noisy
input (right at low noise, wrong at high), one that returns a blank canvas (nothing placed)."""

from types import SimpleNamespace

import pytest
import torch

from pixelrun.config import load_config
from pixelrun.evaluation.denoise_score import denoise_scores, describe_denoise


class _Encoder:
    def encode(self, captions):
        return torch.zeros(len(captions), 2, 8), torch.ones(len(captions), 2, dtype=torch.bool)


class _Returns(torch.nn.Module):
    """A 'denoiser' whose prediction is a fixed function of its noisy input."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x_t, t, text, mask):
        self.calls.append((len(x_t), round(float(t[0]), 3), self.training))
        return SimpleNamespace(prediction=self.fn(x_t))


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["data.resolution=48"])


def test_input_returned_is_right_at_low_noise_and_wrong_at_high(cfg):
    model = _Returns(lambda x_t: x_t).train()
    scores = denoise_scores(model, _Encoder(), cfg, "cpu", n=40, seed=0)
    assert list(scores) == ["0.05", "0.2", "0.5"]
    # x_t = 0.95 x + 0.05 eps: every colour stays within the scorer's distance of its own
    assert scores["0.05"]["placed"] == 1.0 and scores["0.05"]["kind"] >= 0.9
    # half noise: the colours scatter and the components break up
    assert scores["0.5"]["placed"] < 0.5 and scores["0.5"]["kind"] < scores["0.05"]["kind"]
    assert all(s["n"] == 40 for s in scores.values())
    # 40 images in chunks of 32 then 8, each chunk at every time, in eval mode, the mode restored after
    assert [c[:2] for c in model.calls] == [(32, 0.05), (32, 0.2), (32, 0.5), (8, 0.05), (8, 0.2), (8, 0.5)]
    assert not any(c[2] for c in model.calls) and model.training


def test_blank_prediction_places_nothing(cfg):
    scores = denoise_scores(_Returns(torch.zeros_like), _Encoder(), cfg, "cpu", n=8, seed=0)  # mid gray
    assert all(s["placed"] == 0.0 and s["kind"] == 0.0 for s in scores.values())


def test_other_ranks_predict_but_do_not_score(cfg):
    model = _Returns(lambda x_t: x_t)
    assert denoise_scores(model, _Encoder(), cfg, "cpu", n=4, seed=0, compute=False) is None
    assert len(model.calls) == 3  # the forward is collective: every rank runs it


def test_line_names_times_measures_and_samples():
    scores = {"0.05": {"kind": 0.598, "placed": 1.0}, "0.5": {"kind": 0.461, "placed": 0.965}}
    line = describe_denoise(scores, {"kind": 0.301, "placed": 0.562})
    assert line == (
        "drawn from held-out images noised to t = 0.05 / 0.5: kind 0.598 / 0.461, placed 1.000 / 0.965 "
        "(from pure noise: kind 0.301, placed 0.562)"
    )
