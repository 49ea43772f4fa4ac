"""Heun and the guidance interval (sample.sampler, sample.guidance_interval): their identities with
plain CFG and with no guidance, their count of model evaluations, and Heun's accuracy."""

import pytest
import torch

from pixelrun.diffusion.sampling import model_evaluations, sample, time_grid
from pixelrun.model.denoiser import ModelConfig, PRXDenoiser


def _fixed_model() -> PRXDenoiser:
    """A small denoiser whose every weight is drawn from one seed (the zero-initialised output layer
    too: a model predicting 0 everywhere would make every sampler exact)."""
    torch.manual_seed(0)
    model = PRXDenoiser(
        ModelConfig(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0, bottleneck_size=None, text_dim=8)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _prompts(b: int = 2):
    g = torch.Generator().manual_seed(1)
    text, mask = torch.randn(b, 4, 8, generator=g), torch.ones(b, 4, dtype=torch.bool)
    return text, mask, torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool)


def _sample(model, **kwargs) -> torch.Tensor:
    text, mask, nt, nm = _prompts()
    return sample(model, text, mask, null_text=nt, null_mask=nm, height=8, width=8, seed=3, **kwargs)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_interval_over_all_of_0_1_is_plain_cfg_bit_for_bit(sampler):
    model = _fixed_model()
    plain = _sample(model, steps=6, guidance=3.0, sampler=sampler)
    assert torch.equal(_sample(model, steps=6, guidance=3.0, sampler=sampler, guidance_interval=(0.0, 1.0)), plain)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_empty_interval_is_guidance_1_bit_for_bit(sampler):
    model = _fixed_model()
    unguided = _sample(model, steps=6, guidance=1.0, sampler=sampler)
    empty = _sample(model, steps=6, guidance=3.0, sampler=sampler, guidance_interval=(0.5, 0.5))
    assert torch.equal(empty, unguided)
    # and a real interval changes the images (the identities above are not vacuous)
    assert not torch.equal(_sample(model, steps=6, guidance=3.0, sampler=sampler, guidance_interval=(0.3, 0.8)), empty)


class CountingModel(torch.nn.Module):
    """Counts model evaluations per image: the rows of every forward batch over the prompts."""

    def __init__(self, model: torch.nn.Module, images: int):
        super().__init__()
        self.model, self.images, self.rows = model, images, 0
        self.cfg = model.cfg

    def forward(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.model(x, *args, **kwargs)


# linear spacing, shift 1, 4 steps: t = 1, .75, .5, .25 evaluated; (0.3, 0.8] guides .75 and .5.
# Euler: 1 + 2 + 2 + 1 = 6. Heun: (1 + 2) + (2 + 2) + (2 + 1) + the last step's Euler 1 = 11.
# Without an interval: Euler 4 x 2 = 8; Heun 3 x (2 + 2) + 2 = 14. Guidance 1: Euler 4, Heun 2 x 3 + 1 = 7.
HAND = [
    ("euler", 3.0, (0.3, 0.8), 6),
    ("heun", 3.0, (0.3, 0.8), 11),
    ("euler", 3.0, None, 8),
    ("heun", 3.0, None, 14),
    ("euler", 1.0, None, 4),
    ("heun", 1.0, None, 7),
    ("heun", 3.0, (0.5, 0.5), 7),
]


@pytest.mark.parametrize("sampler,guidance,interval,expected", HAND)
def test_model_evaluations_match_a_hand_count_and_the_sampler(sampler, guidance, interval, expected):
    assert time_grid(4, 1.0, "linear").tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    kw = dict(sampler=sampler, guidance=guidance, guidance_interval=interval, shift=1.0, spacing="linear")
    assert model_evaluations(4, **kw) == expected
    counting = CountingModel(_fixed_model(), images=2)
    _sample(counting, steps=4, **kw)
    assert counting.rows / counting.images == expected


class GaussianDenoiser(torch.nn.Module):
    """The exact x-prediction for data x0 ~ N(mu, s^2) per pixel, x_t = (1 - t) x0 + t eps: the
    posterior mean mu + c (x_t - (1 - t) mu), c = (1 - t) s^2 / ((1 - t)^2 s^2 + t^2). A fixed model
    whose flow is smooth, as a trained denoiser's is. (On a network of random weights the flow is
    not: there Heun at equal evaluations is no better than Euler, the asymptotics not reached.)"""

    def __init__(self, s: float = 0.5):
        super().__init__()
        self.mu, self.s2 = torch.linspace(-0.5, 0.5, 3 * 8 * 8).reshape(1, 3, 8, 8), s * s

    def forward(self, x, t, text, mask=None, routing=None, return_features=()):
        from pixelrun.model.denoiser import ModelOutput

        t = t.view(-1, 1, 1, 1).float()
        c = (1 - t) * self.s2 / ((1 - t) ** 2 * self.s2 + t**2)
        return ModelOutput(self.mu + c * (x - (1 - t) * self.mu), {})


def test_heun_beats_euler_at_equal_model_evaluations():
    # The error against a 1,000-step Euler reference, unguided so every evaluation is one pass: Heun
    # with n steps costs 2n - 1 evaluations, as many as Euler with 2n - 1 steps. Measured (mean |error|):
    # n=4: Heun 0.063, Euler 0.132; n=8: 0.040, 0.055; n=16: 0.018, 0.024.
    model = GaussianDenoiser()
    reference = _sample(model, steps=1000, guidance=1.0)
    for n in (4, 8, 16):
        assert model_evaluations(n, sampler="heun", guidance=1.0) == model_evaluations(2 * n - 1, guidance=1.0)
        euler = _sample(model, steps=2 * n - 1, guidance=1.0)
        heun = _sample(model, steps=n, guidance=1.0, sampler="heun")
        err_euler, err_heun = (euler - reference).abs().mean(), (heun - reference).abs().mean()
        assert err_heun < err_euler, (n, float(err_heun), float(err_euler))
    assert model_evaluations(16, sampler="heun", guidance=1.0) == 31


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        _sample(_fixed_model(), steps=2, sampler="rk4")
